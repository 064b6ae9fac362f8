"""The fast paths give the same answers as the readable eager one (correctness only; bench/bench.py measures speed):
the static-cache decode step equals the dynamic cache, the compiled step equals the eager step without recompiling
per token, and a left-padded batch equals its prompts run one by one."""

import shutil

import pytest
import torch
from conftest import photo

import generate as generation
from anyres import process_image
from convert import load_pretrained
from model import IMAGE_TOKEN, KVCache


@pytest.fixture(scope="module")
def qwen(tiny):
    model, _ = load_pretrained(str(tiny("next_qwen2")))  # GQA, q/k/v biases, tied head
    return model


def prompt(model, sizes, text):
    """text[:2] + one IMAGE_TOKEN run per image + text[2:], and the processed images."""
    images = [process_image(photo(*s, seed=s[0]), model.cfg) for s in sizes]
    return list(text[:2]) + [IMAGE_TOKEN] * sum(im.num_tokens for im in images) + list(text[2:]), images


def eager_and_static(model, ids, images, steps, step_fn, max_len):
    """Greedy decoding from one prefill, with the eager dynamic-cache step and with `step_fn` (the static-cache
    step, compiled or not) on a copy of the cache: (tokens, logits) of each, logits (steps, V)."""
    T = len(ids)
    cache = KVCache(model.cfg.text, 1, max_len, torch.float32, "cpu")
    with torch.inference_mode():
        first = model(torch.tensor([ids]), images, cache=cache, num_logits=1)[:, -1]
        static = KVCache(model.cfg.text, 1, max_len, torch.float32, "cpu")
        static.k.copy_(cache.k), static.v.copy_(cache.v)
        static.length = cache.length
        runs = []
        for c, static_path in ((cache, False), (static, True)):
            logits, tokens = first, []
            out = []
            for step in range(steps):
                tokens.append(int(logits.argmax()))
                token, pos = torch.tensor([[tokens[-1]]]), torch.tensor([[T + step]])
                if static_path:
                    logits = step_fn(model, token, pos, torch.tensor([c.length]), c).clone()
                    c.length += 1
                else:
                    logits = model(token, position_ids=pos, cache=c, num_logits=1)[:, -1]
                out.append(logits[0])
            runs.append((tokens, torch.stack(out)))
    return runs


def test_static_cache_step_equals_dynamic_cache(qwen):
    ids, images = prompt(qwen, [(45, 30)], (5, 6, 7, 8))
    (tokens, logits), (static_tokens, static_logits) = eager_and_static(qwen, ids, images, 10, generation.decode_step,
                                                                        len(ids) + 10)
    assert static_tokens == tokens
    assert (static_logits - logits).abs().max() <= 1e-5


compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                              reason="torch.compile on CPU needs a C++ compiler (g++) for inductor's kernels")


@compiler
def test_compiled_step_equals_eager_without_recompiling(qwen):
    torch._dynamo.reset()
    step = generation.compiled_decode_step("cpu")
    ids, images = prompt(qwen, [(30, 70)], (5, 6, 7, 8))
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new graph for a later token would raise
        # 256 slots: the size generate() rounds this prompt's cache up to, so the graph serves it too
        (tokens, logits), (compiled_tokens, compiled_logits) = eager_and_static(qwen, ids, images, 10, step, 256)
    assert compiled_tokens == tokens
    assert (compiled_logits - logits).abs().max() <= 1e-4
    # through generate(): the same tokens, and one cache shape (rounded to 256 slots) means one graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert list(generation.generate(qwen, ids, images, max_new_tokens=10, compile=True)) == tokens


def batch_prompts(model):
    """Different lengths and image counts: two images, none (text only), one."""
    return [prompt(model, [(45, 30), (20, 75)], (5, 6, 7, 8)),
            prompt(model, [], (9, 10, 11, 12, 13, 14, 15, 16, 17)),
            prompt(model, [(130, 36)], (20, 21, 22))]


def test_batch_equals_one_by_one(qwen):
    prompts = batch_prompts(qwen)
    alone = [list(generation.generate(qwen, ids, images, max_new_tokens=8)) for ids, images in prompts]
    assert len({len(ids) for ids, _ in prompts}) == 3  # really padded
    batched = generation.generate_batch(qwen, [ids for ids, _ in prompts], [images for _, images in prompts],
                                        max_new_tokens=8)
    assert batched == alone


def test_batch_stops_each_row_at_its_stop_token(qwen):
    prompts = batch_prompts(qwen)
    alone = [list(generation.generate(qwen, ids, images, max_new_tokens=8)) for ids, images in prompts]
    stop = alone[1][2]  # the text-only prompt's third token
    batched = generation.generate_batch(qwen, [ids for ids, _ in prompts], [images for _, images in prompts],
                                   max_new_tokens=8, stop_ids={stop})
    for row, full in zip(batched, alone):
        expected = full[:full.index(stop) + 1] if stop in full else full
        assert row == expected


@compiler
def test_compiled_batch_equals_one_by_one(qwen):
    prompts = batch_prompts(qwen)
    alone = [list(generation.generate(qwen, ids, images, max_new_tokens=8)) for ids, images in prompts]
    batched = generation.generate_batch(qwen, [ids for ids, _ in prompts], [images for _, images in prompts],
                                   max_new_tokens=8, compile=True)
    assert batched == alone


def test_one_row_bf16_decode_leaves_onednn_for_the_gemv(tiny, monkeypatch):
    # bf16 on CPU, one row: ATen's reduced-precision GEMV (2x oneDNN's brgemm per token, measured); batches, fp32
    # models and prompts keep oneDNN. The tokens are those of the same bf16 model decoded with oneDNN throughout.
    model, _ = load_pretrained(str(tiny("next_llama")), dtype=torch.bfloat16)
    fp32, _ = load_pretrained(str(tiny("next_llama")))
    with generation.gemv_context(model, 1):
        assert not torch.backends.mkldnn.enabled
    for other in (generation.gemv_context(model, 2), generation.gemv_context(fp32, 1)):
        with other:
            assert torch.backends.mkldnn.enabled
    seen = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(torch.backends.mkldnn.enabled) or real(*a, **k))
    ids = [5, 6, 7, 8, 9, 10]
    tokens = list(generation.generate(model, ids, max_new_tokens=6))
    assert seen == [True] + [False] * 5  # the prefill on oneDNN, each decode step off it
    monkeypatch.setattr(generation, "gemv_context", lambda *a: torch.backends.mkldnn.flags(enabled=True))
    assert list(generation.generate(model, ids, max_new_tokens=6)) == tokens
