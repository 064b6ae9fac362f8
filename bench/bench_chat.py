"""Benchmark of chat.py: a chat turn on the KV cache against the original CLI's re-prefill, and question files in
batches against one at a time. Run by hand, not in CI.

    python bench/bench_chat.py            # a mid-sized random model (fp32, CPU): about a minute on 2 cores
    python bench/bench_chat.py --small    # tiny sizes, seconds

Random weights built in memory (numbers do not depend on the values); LLaVA-1.5 "pad" layout, one crop per image.

    S1  time to the first token of chat turn 2 (a 12-word question after a 1-image turn 1 and its answer):
        chat.Session (prefills only the new turn on the cache) against what llava/serve/cli.py does every turn
        (re-encode the image, prefill the whole history). Medians over --repeats, the two taking turns.
    S2  question-file throughput, questions/s, for --questions single-image questions of --new-tokens greedy tokens:
        generate_batch at --batch-size against batch 1 (every token generated; no early stop), medians over
        --repeats, taking turns.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
from anyres import process_image  # noqa: E402
from data import render_prompt, tokenize  # noqa: E402
from generate import generate, generate_batch  # noqa: E402
from model import Llava, LlavaConfig, TextConfig, VisionConfig, init_fresh  # noqa: E402
from chat import Session  # noqa: E402
from tests.conftest import photo  # noqa: E402
from tests.tiny_checkpoints import make_tokenizer  # noqa: E402


def build(small: bool):
    if small:
        vision = VisionConfig(image_size=56, patch_size=8, hidden_size=64, intermediate_size=128, num_heads=4,
                              num_layers=2)
        text = TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16)
    else:  # a CLIP-336/14 grid (576 tokens per image) with a narrower tower, and a 8-layer 512-wide decoder
        vision = VisionConfig(image_size=336, patch_size=14, hidden_size=512, intermediate_size=2048, num_heads=8,
                              num_layers=8)
        text = TextConfig(vocab_size=320, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                          num_kv_heads=8, head_dim=64)
    cfg = LlavaConfig(vision=vision, text=text, image_aspect_ratio="pad", merge_type="flat")
    with torch.device("meta"):
        model = Llava(cfg)
    return init_fresh(model).eval(), make_tokenizer("next_llama")  # the tiny byte-level BPE: 320 ids


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def chat_turn(model, tokenizer, image, repeats):
    """(cache reuse s, re-prefill s) to the first token of turn 2."""
    question = "What colour is the object in the upper left corner of this picture, and is it big?"
    reuse, again = [], []
    for _ in range(repeats + 1):  # the first round warms up
        session = Session(model, tokenizer, "vicuna_v1", stop=set())
        list(session.ask("Describe the image.", [image], max_new_tokens=16))
        turn2 = session.ask(question, max_new_tokens=1)
        reuse.append(timed(lambda: list(turn2)))
        history = session.ids[:-1]  # everything up to turn 2's generation prompt
        again.append(timed(lambda: list(generate(model, history, session.images, max_new_tokens=1))))
    return statistics.median(reuse[1:]), statistics.median(again[1:]), len(session.ids)


def question_file(model, tokenizer, images, batch_size, new_tokens, repeats):
    """(questions/s one at a time, questions/s in batches) with every answer `new_tokens` long."""
    prompts, processed = [], []
    for i, image in enumerate(images):
        p = process_image(image, model.cfg)
        text = f"<image>\nQuestion {i}: what is in the picture?\nAnswer the question using a single word or phrase."
        prompts.append(tokenize(tokenizer, render_prompt("vicuna_v1", [("user", text)]), [p.num_tokens]))
        processed.append([p])
    run = lambda b: [generate_batch(model, prompts[s:s + b], processed[s:s + b],  # noqa: E731
                                    max_new_tokens=new_tokens)
                     for s in range(0, len(prompts), b)]
    run(batch_size)  # warm-up
    one, batched = [], []
    for _ in range(repeats):  # taking turns, so that both see the same machine load
        one.append(timed(lambda: run(1)))
        batched.append(timed(lambda: run(batch_size)))
    return len(prompts) / statistics.median(one), len(prompts) / statistics.median(batched)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build(args.small)
    images = [photo(320 + 16 * i, 240, seed=i) for i in range(args.questions)]
    reuse, again, length = chat_turn(model, tokenizer, images[0], args.repeats)
    print(f"S1 chat turn 2, first token: cache reuse {reuse * 1e3:.1f} ms, re-prefill of {length} positions and the "
          f"image {again * 1e3:.1f} ms: {again / reuse:.1f}x")
    one, batched = question_file(model, tokenizer, images, args.batch_size, args.new_tokens, args.repeats)
    print(f"S2 question file, {args.questions} questions x {args.new_tokens} tokens: batch 1 {one:.2f} q/s, batch "
          f"{args.batch_size} {batched:.2f} q/s: {batched / one:.2f}x")


if __name__ == "__main__":
    main()
