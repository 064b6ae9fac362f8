"""Generation: the loop that turns a prompt (and its images) into new tokens, one batch of prompts at a time.

    prompts (B lists of ids, IMAGE_TOKEN runs where images go), left-padded to (B, T)
      --prefill: the model over all T positions, the KV cache filled--> logits (B, V) of the next token
      --one step per new token: (B, 1) tokens at each row's own position against the cache--> logits (B, V)
    sample: greedy (argmax) at temperature 0, else nucleus sampling

`generate` yields one prompt's tokens as they come; `generate_batch` runs several prompts together (each with its
own images) and returns the same greedy tokens as one at a time. The compiled decode step (--compile) is marked
"Fast path" below; the eager loop is the reference.
"""

import contextlib
import sys
import time

import torch

from model import KVCache


def sample(logits, temperature: float, top_p: float, generator) -> int:
    """Next token from logits (V,): greedy at temperature 0 (no softmax needed), else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def gemv_context(model, batch: int):
    """The context for one decode step. A bf16/fp16 model on CPU decoding one row: oneDNN off, so that each
    matrix-vector product takes ATen's reduced-precision GEMV (fp32 sums) rather than oneDNN's brgemm matmul, which
    measured 2x slower there (docs/results/2026-12-07-cpu-decode.md); prompts and batches keep oneDNN."""
    weight = model.language_model.embed_tokens.weight  # the compute dtype
    gemv = batch == 1 and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
    return torch.backends.mkldnn.flags(enabled=False) if gemv else contextlib.nullcontext()


def generate(model, input_ids: list[int], images=None, *, max_new_tokens=256, temperature=0.0, top_p=1.0,
             stop_ids=(), seed=0, compile=False):
    """Yields new token ids one at a time (the stop token included, if reached)."""
    for step in generation_loop(model, [input_ids], [images or []], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, compile=compile):
        yield step[0]
        if step[0] in stop_ids:
            return


def generate_batch(model, prompts: list[list[int]], images: list[list] | None = None, *, max_new_tokens=256,
                   temperature=0.0, top_p=1.0, stop_ids=(), seed=0, compile=False) -> list[list[int]]:
    """Several prompts in one batch, each with its own images (a list per prompt, possibly empty) -> the new ids of
    each prompt (its stop token included, if reached). Greedy results equal `generate` run on each prompt alone."""
    outs, done = [[] for _ in prompts], [False] * len(prompts)
    for step in generation_loop(model, prompts, images or [[] for _ in prompts], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, compile=compile):
        for i, token in enumerate(step):
            if not done[i]:
                outs[i].append(token)
                done[i] = token in stop_ids
        if all(done):
            break
    return outs


@torch.inference_mode()
def generation_loop(model, prompts, images, *, max_new_tokens, temperature, top_p, seed, compile=False):
    """The generation loop for a batch of B prompts: yields B new token ids per step, until stopped from outside.

    Prompts are left-padded to one length T, so every row's next token is written at the same cache slot:

        ids          (B, T)          pad pad p0 p1 p2 | q0 q1 q2 q3 q4      (pad = any id; it is masked)
        padding_mask (B, T + new)    0   0   1  1  1  | 1  1  1  1  1 ...    allocated once, ones for the future
        position_ids (B, T)          0   0   0  1  2  | 0  1  2  3  4        each row counts its own tokens

    then each step feeds (B, 1) tokens at position `length of the row so far`. With one prompt there is no
    padding and no mask at all (SDPA's causal fast path).
    """
    embed = model.language_model.embed_tokens.weight  # never quantised: its dtype is the compute dtype
    device, dtype = embed.device, embed.dtype
    B, T = len(prompts), max(len(p) for p in prompts)
    max_len = T + max_new_tokens
    if compile:  # a few cache shapes serve many prompts: each new shape compiles the decode step once more
        max_len = -(-max_len // 256) * 256
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    padding_mask = torch.ones(B, max_len, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, device=device)
        padding_mask[i, :T - len(p)] = False
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,) real tokens per row
    if all(len(p) == T for p in prompts):
        padding_mask = None
    position_ids = (torch.arange(T, device=device) - (T - lengths)[:, None]).clamp(min=0)  # (B, T)
    cache = KVCache(model.cfg.text, B, max_len, dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    flat_images = [im for row in images for im in row]  # embed() fills IMAGE_TOKEN runs in row-major order
    logits = model(ids, flat_images or None, position_ids=position_ids, padding_mask=padding_mask, cache=cache,
                   num_logits=1)[:, -1]  # prefill (B, V)
    step_fn = None
    if compile:
        step_fn = compiled_decode_step(device)
        if device.type == "cuda":  # CUDA graphs read the cache in place instead of copying it in every replay
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
    for step in range(max_new_tokens):
        tokens = [sample(row, temperature, top_p, generator) for row in logits]
        yield tokens
        if step == max_new_tokens - 1:
            return
        token = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
        position_ids = (lengths + step)[:, None]
        if step_fn is None:  # the readable eager step: attends over the written prefix only
            with gemv_context(model, B):
                logits = model(token, position_ids=position_ids, padding_mask=padding_mask, cache=cache,
                               num_logits=1)[:, -1]
        else:
            slot = torch.tensor([cache.length], device=device)
            # clone: out of the compiled graph's memory, which the next step reuses
            logits = step_fn(model, token, position_ids, slot, cache, padding_mask).clone()
            cache.length += 1


# ----------------------------------------------------------------------------------------------------------------
# Fast path (--compile): an addition to the eager loop above, which stays the reference. Only the decode step is
# compiled: one token per row, so its shapes never change during a generation (the cache is pre-allocated and the
# slot to write is a tensor, not a Python int). Prefill, whose length varies with every prompt, stays eager.
# On CUDA "reduce-overhead" replays the step as a CUDA graph, removing the per-kernel launch cost that dominates
# decoding a small batch; on CPU inductor fuses the element-wise work between the matrix-vector products.


def decode_step(model, token, position_ids, slot, cache, padding_mask=None):
    """token, position_ids (B, 1); slot (1,) the cache slot to write -> logits (B, V) of the next token."""
    x = model.language_model.embed_tokens(token)
    h = model.language_model(x, position_ids, padding_mask, cache, slot=slot)
    return model.logits(h[:, -1])


_compiled_steps = {}


def compiled_decode_step(device):
    kind = torch.device(device).type
    if kind not in _compiled_steps:
        mode = "reduce-overhead" if kind == "cuda" else None
        _compiled_steps[kind] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _compiled_steps[kind]


def stream_answer(tokenizer, tokens, stop, show: bool) -> tuple[list[int], float | None]:
    """Consume the generated tokens, writing the text to stdout as it grows when `show`; (ids, seconds to the first)."""
    out, shown, first = [], "", None
    t0 = time.perf_counter()
    for token in tokens:
        if not out:
            first = time.perf_counter() - t0
        out.append(token)
        if show and token not in stop:
            text = tokenizer.decode([t for t in out if t not in stop])
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    return out, first
