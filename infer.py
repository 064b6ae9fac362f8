"""Ask a released LLaVA model about images:  python infer.py IMAGE [IMAGE ...] "PROMPT" [--model NAME]
                                        or a video:  python infer.py --video CLIP.mp4 --frames 16 "PROMPT"

    prompt text --data.render_prompt--> chat string --data.tokenize--> ids with IMAGE_TOKEN runs (1, T)
    images --anyres.process_image--> crops;  model prefill (1, T) -> first token;  then one token per step
    against the KV cache until a stop token or --max-new-tokens.

The answer streams to stdout; everything else goes to stderr. --json prints one JSON object instead.
--quantize int8 stores the decoder's matrices in int8, int8-dynamic also rounds each token's activations to int8 (the
fast CPU path), int4 stores them in 4 bits (quantize.py); `torchrun --nproc_per_node N infer.py ...`
splits the decoder over N processes, one GPU each or gloo on CPU (tensor_parallel.py); only rank 0 prints.
"""

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

import chat
import distributed
import quantize
import tensor_parallel
from anyres import ImageTooLarge, add_knob_flags, knobs_from_flags, process_images, process_video
from chat_template import default_template, eos_token_ids, load_tokenizer, past_vocab
from convert import DEFAULT_MODEL, CheckpointError, load_pretrained
from data import TEMPLATES, SampleError, load_image, load_video, place_visuals, render_prompt, stop_token_ids, tokenize
from generate import generate, stream_answer
from model import fuse_projections


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, then the prompt (put <image> where an image belongs; "
                                              "images without a placeholder go before the text); --chat: images only")
    add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, counts and timings")
    p.add_argument("--video", default=None, help="a video: mp4/webm/mkv/... (needs PyAV: pip install av), an animated "
                                                 "GIF/WebP, or a folder of frames; <video> in the prompt places it")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly from --video (OneVision: 32)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA's fast path; the first tokens "
                                                          "wait for the compiler)")
    chat.add_flags(p)
    p.error = lambda message: sys.exit(f"error: {message}; see python infer.py --help")  # one line, not usage + error
    return p.parse_args(argv)


def add_model_flags(p):
    """The flags that pick and load a model; serve.py takes the same ones."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name (see README), hub repo id, or local folder")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None, help="chat format (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--compat", choices=["original", "transformers"], default="original",
                   help="preprocess as the original LLaVA code (default) or as the transformers processor")
    p.add_argument("--quantize", choices=quantize.MODES, default=None,
                   help="int8: weight-only decoder and output head, quantised while loading (quantize.py); "
                        "int8-dynamic: also each token's activations in int8, the fast path on a CPU; "
                        "int4: 4-bit weights in groups of 32, each with a scale and zero point")
    add_knob_flags(p)


# ----------------------------------------------------------------------------------------------------------------
# Checks of the request, each ending the program with one line that names the flag and what it takes


def check_flags(args) -> str:
    """Refuse generation flags out of range before anything is loaded; returns the device to run on."""
    checks = [
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1"),
        (math.isfinite(args.temperature) and args.temperature >= 0,
         f"--temperature {args.temperature}: expected a number >= 0 (0 = greedy)"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: expected 0 < p <= 1 (1 = sample from every token)"),
        (args.frames >= 1, f"--frames {args.frames}: expected an integer >= 1 (frames sampled from --video)"),
    ]
    for ok, message in checks:
        if not ok:
            sys.exit(f"error: {message}")
    return pick_device(args)


def pick_device(args) -> str:
    """--device checked against what this torch sees (default: cuda if available)."""
    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"error: --device {args.device!r}: not a device name; use cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        sys.exit(f"error: --device {args.device}: this torch ({torch.__version__}) sees no such device; "
                 "use --device cpu")
    return args.device


def fit_context(args, model, input_ids, processed) -> int:
    """How many tokens to generate: --max-new-tokens, cut to what is left of the context window (said on stderr).
    A prompt that fills the window on its own is refused: the model was never trained on positions past it."""
    window, n = model.cfg.text.max_position_embeddings, len(input_ids)
    if n >= window:
        visual = sum(im.num_tokens for im in processed)
        sys.exit(f"error: the prompt is {n} tokens ({visual} of them for the images and video) but {args.model} reads "
                 f"at most {window} (max_position_embeddings); shorten the prompt, give fewer or smaller images, "
                 f"fewer --frames, or lower the image token budget (--max-grid, --token-threshold)")
    if n + args.max_new_tokens > window:
        print(f"note: {n} prompt tokens + --max-new-tokens {args.max_new_tokens} pass the context window of {window}; "
              f"generating at most {window - n}", file=sys.stderr)
    return min(args.max_new_tokens, window - n)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_visuals(args) -> tuple[str, list, list | None, list[str]]:
    """(prompt with one <image> per visual, images, video frames or None, kinds in prompt order) from the command
    line; an unreadable file is a one-line error."""
    if not args.inputs:
        sys.exit("error: give the image files and then the prompt (or --chat, or --batch-file)")
    *image_paths, prompt = args.inputs
    if Path(prompt).suffix.lower() in IMAGE_SUFFIXES and Path(prompt).is_file():
        sys.exit(f"error: the last argument {prompt!r} is an image file, but the prompt goes last: "
                 f"python infer.py IMAGE... \"PROMPT\"")
    try:
        images = [load_image(path) for path in image_paths]
        frames = load_video(args.video, args.frames) if args.video else None
        prompt, kinds = place_visuals(prompt, len(images), frames is not None)
    except SampleError as e:
        sys.exit(f"error: {e}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    return prompt, images, frames, kinds


def compute_dtype(args, device: str):
    return getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))


def load(args, kinds=("image",)):
    """(model, tokenizer, its eos ids, template) from the model flags alone (add_model_flags): what serve.py loads."""
    device = distributed.rank_device(pick_device(args))
    return load_model(args, device, compute_dtype(args, device), list(kinds))


def load_model(args, device: str, dtype, kinds):
    """(model, tokenizer, its eos ids, template) with the command line's token-budget knobs applied; int8
    (--quantize) or split over the ranks of torchrun (tensor_parallel.py) as each weight is read."""
    parallel = distributed.world_size() > 1
    if parallel and args.quantize:
        sys.exit(f"error: --quantize {args.quantize} does not combine with tensor parallelism yet: run it in one "
                 "process (LLaVA-NeXT-72B in int8 fits one 141 GB GPU)")
    if args.quantize == "int8-dynamic" and (device != "cpu" or not quantize.dynamic_available()):
        sys.exit("error: --quantize int8-dynamic runs on x86 CPUs (PyTorch's fbgemm kernels); "
                 + ("on a GPU use --quantize int8" if device != "cpu" else "use --quantize int8 on this machine"))
    if args.quantize == "int4" and torch.device(device).type not in ("cpu", "cuda"):
        sys.exit(f"error: --quantize int4 runs on CPU and CUDA (PyTorch's int4 kernels); on {device} use "
                 "--quantize int8")
    if getattr(args, "compile", False) and torch.device(device).type == "cpu":
        sys.exit("error: --compile is for CUDA: on a CPU the compiled decode step measured no faster than eager "
                 "(int8 and int4 several times slower; docs/results/2026-12-07-cpu-decode.md); drop --compile")
    if args.quantize == "int8-dynamic" and getattr(args, "compile", False):
        sys.exit("error: --compile cannot trace int8-dynamic's packed fbgemm layers; drop --compile or use "
                 "--quantize int8")
    prepare = (functools.partial(tensor_parallel.shard_decoder, device=device) if parallel
               else functools.partial(quantize.quantized_layers, mode=args.quantize) if args.quantize else None)
    try:
        model, folder = load_pretrained(args.model, revision=args.revision, dtype=dtype, device=device,
                                        compat=args.compat, prepare=prepare)
        tokenizer, eos = load_tokenizer(folder, args.model), eos_token_ids(folder)
        template = args.template or default_template(args.model, tokenizer, folder)
    except (CheckpointError, tensor_parallel.TensorParallelError) as e:
        sys.exit(f"error: {e}")
    if parallel:
        tensor_parallel.shard_tied_head(model)
    else:
        if args.quantize:
            quantize.quantize_tied_head(model)
        fuse_projections(model)
    if kinds and model.vision_tower is None:
        sys.exit(f"error: {args.model} is a text-only model; it cannot take images or videos")
    if knobs := knobs_from_flags(args):
        try:
            model.cfg.higher_anyres = dataclasses.replace(model.cfg.higher_anyres, **knobs)
        except ValueError as e:
            sys.exit(f"error: {e}")
    return model, tokenizer, eos, template


def main(argv=None):
    args = parse_args(argv)
    distributed.quiet_other_ranks()  # under torchrun only rank 0 prints
    device = distributed.rank_device(check_flags(args))
    dtype = compute_dtype(args, device)
    if args.chat or args.batch_file:
        status = chat.run(args, device, dtype, load_model)
        distributed.finish()
        return status
    prompt, images, frames, kinds = read_visuals(args)

    timings = {}
    t0 = time.perf_counter()
    model, tokenizer, eos, template = load_model(args, device, dtype, kinds)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # several images: each padded to a square (anyres.tiles_with_anyres)
    try:
        stills = iter(process_images(images, model.cfg))
    except ImageTooLarge as e:
        sys.exit(f"error: {e}; crop or resize it first")
    processed = [process_video(frames, model.cfg) if kind == "video" else next(stills) for kind in kinds]
    input_ids = tokenize(tokenizer, render_prompt(template, [("user", prompt)]), [im.num_tokens for im in processed],
                         model.cfg.compat)
    if problem := past_vocab(tokenizer, input_ids, model.cfg.text.vocab_size):
        sys.exit(f"error: {problem}")
    timings["preprocess_s"] = time.perf_counter() - t0
    print(f"{args.model}: template {template}, {len(input_ids)} prompt tokens "
          f"({sum(im.num_tokens for im in processed)} for {len(images)} image{'s' * (len(images) != 1)}"
          + (f" and a video of {len(frames)} frames" if frames else "") + ")", file=sys.stderr)

    max_new_tokens = fit_context(args, model, input_ids, processed)
    stop = set() if args.ignore_eos else stop_token_ids(tokenizer, template, eos)
    t0 = time.perf_counter()
    tokens = generate(model, input_ids, processed, max_new_tokens=max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, stop_ids=stop, seed=args.seed, compile=args.compile)
    out, timings["first_token_s"] = stream_answer(tokenizer, tokens, stop, show=not args.json)
    total = time.perf_counter() - t0
    timings["decode_tok_per_s"] = (len(out) - 1) / (total - timings["first_token_s"]) if len(out) > 1 else None
    answer = tokenizer.decode([t for t in out if t not in stop]).strip()
    if args.json:
        # each image appears once, as IMAGE_TOKEN (-200), like the original code's prompts
        compact = tokenize(tokenizer, render_prompt(template, [("user", prompt)]), [1] * len(processed),
                           model.cfg.compat)
        print(json.dumps({"answer": answer, "prompt_token_ids": compact, "output_token_ids": out,
                          "image_tokens": [im.num_tokens for im in processed], "timings": timings}))
    else:
        sys.stdout.write("\n")
    print(f"prefill {timings['first_token_s']:.2f} s, {len(out)} tokens"
          + (f", {timings['decode_tok_per_s']:.1f} tok/s" if timings["decode_tok_per_s"] else ""), file=sys.stderr)
    distributed.finish()


if __name__ == "__main__":
    main()
