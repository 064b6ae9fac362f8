"""Benchmark: this code against transformers, and both against what the machine can do. Run by hand, not in CI.

    python bench/bench.py                  # CLIP-L/336 tower + Qwen2-0.5B-sized decoder (random weights, fp32, CPU)
    python bench/bench.py --small          # a tiny model: the same measurements in about a minute
    python bench/bench.py --json out.json  # also write the figures as one JSON object

Both sides load the same random LLaVA-NeXT checkpoint in the llava-hf layout, written once by transformers into
--cache-dir: ours with convert.load_pretrained(compat="transformers"), theirs with
LlavaNextForConditionalGeneration. Every figure is a median over --repeats runs after one warm-up run, with ours
and theirs taking turns, so that both see the same machine load; compare the ratios, not the absolute numbers,
on a shared machine.

    P1  decode tok/s: batch 1, greedy, 64 new tokens after a 32-token text prompt (time from the first to the
        last new token). Ours eager (infer.py's default); with --compile also the compiled decode step
        (infer.py --compile), printed beside it (on CPU it does not pay: see docs/results/2026-11-22-speed.md).
        Roofline: every weight the decoder reads per token (all non-embedding matrices + the output head + the
        KV cache) / the machine's copy bandwidth.
    P1v with --quantize int8 and/or --dtype bfloat16: that variant of ours (infer.py's same flags) in the same
        interleaved rounds as P1, against transformers fp32 and against our fp32; its roofline counts its own
        bytes (1 per int8 weight, 2 per bf16 one).

    python bench/bench.py --only P1 --quantize int8            # int8 weights vs fp32, ours and transformers'
    python bench/bench.py --only P1 --quantize int8-dynamic    # int8 weights and activations (the CPU fast path)
    python bench/bench.py --only P1 --dtype bfloat16           # bf16 on CPU
    python bench/bench.py --only P1 --peer llama.cpp           # every mode against llama.cpp (peer_llama_cpp.py)
    P2  time to first token for a 672x672 image (pixels already processed: preprocessing is P3): vision tower,
        projector, prefill of 2928 image + 32 text positions, one greedy token.
        Roofline: the matrix FLOPs of that work / the machine's fp32 matmul rate.
    P3  AnyRes preprocessing, images/s, of a 2048x1536 photo-like image: ours (compat "transformers") against
        transformers' PIL-backend LlavaNextImageProcessor; the pixels must be identical.
    P4  one training step (forward + backward + AdamW) on 2 text samples of --train-len tokens, decoder trained,
        tower and projector frozen: samples/s and the process's peak RSS (each side in its own process).
    P5  checkpoint load: seconds, and the peak RSS the load adds over the weights' size on disk (each load in a
        fresh process, after one warm-up load so that both read from the page cache).
        Roofline: the weights' bytes / the copy bandwidth (a load has to touch every byte at least once).

transformers is imported only here, inside the functions of the "theirs" side: the model code never needs it.
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import quantize  # noqa: E402
from model import IMAGE_TOKEN, fuse_projections  # noqa: E402
from roofline import copy_bandwidth, decode_bytes_per_token, order_one_weights  # noqa: E402

IMAGE_TOKEN_ID = 151646  # the id llava-hf's Qwen checkpoints give <image>; any id inside the vocabulary works


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint both sides load


def model_sizes(small: bool) -> dict:
    """Tower, decoder and crop sizes. Default: CLIP ViT-L/14-336 and Qwen2-0.5B (as in LLaVA-OneVision-0.5B)."""
    if small:
        return dict(vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                image_size=56, patch_size=14, projection_dim=64),
                    text=dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2))
    return dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768),
                text=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2))


def pinpoints(crop: int) -> list:
    return [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop], [3 * crop, crop], [crop, 3 * crop]]


def build_checkpoint(folder: Path, small: bool):
    """A random LLaVA-NeXT (CLIP + Qwen2, tied head) saved by transformers with its PIL image processor."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, Qwen2Config
    from transformers import LlavaNextImageProcessorPil

    sizes = model_sizes(small)
    crop = sizes["vision"]["image_size"]
    text = Qwen2Config(**sizes["text"], rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       max_position_embeddings=32768, use_sliding_window=False)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**sizes["vision"]), text_config=text,
                          image_token_index=IMAGE_TOKEN_ID % sizes["text"]["vocab_size"], vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          image_grid_pinpoints=pinpoints(crop), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg)
    order_one_weights(model)  # so that greedy tokens are not decided by near-ties
    model.save_pretrained(folder)
    LlavaNextImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                               image_grid_pinpoints=pinpoints(crop)).save_pretrained(folder)


def checkpoint(cache_dir: Path, small: bool) -> Path:
    folder = cache_dir / ("llava-next-small" if small else "llava-next-clip-l-qwen2-0.5b")
    if not (folder / "preprocessor_config.json").exists():
        print(f"writing random weights to {folder} (once)", file=sys.stderr)
        build_checkpoint(folder, small)
    return folder


def load_theirs(folder: Path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_their_processor(folder: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(folder), backend="pil")


def load_ours(folder: Path, dtype=torch.float32, quantize_mode=None):
    import functools

    from convert import load_pretrained

    prepare = functools.partial(quantize.quantized_layers, mode=quantize_mode) if quantize_mode else None
    model = load_pretrained(str(folder), compat="transformers", dtype=dtype, prepare=prepare)[0]
    return fuse_projections(quantize.quantize_tied_head(model) if quantize_mode else model)  # as infer.load_model


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A colour gradient with noise: resampling filters give distinct results on it, unlike flat colours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / (width - 1), y / (height - 1), (x + y) / (width + height - 2)], -1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Machine limits


def matmul_rate(n: int = 4096) -> float:
    """GFLOP/s of an n x n fp32 matrix product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:]) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# Work per figure, for the rooflines


def prefill_flops(model, crops: int, image_tokens: int, text_tokens: int) -> float:
    """Multiply-adds x 2 of the vision tower (the layers LLaVA reads), the projector, the decoder over every
    position (causal attention counted as half) and the output head for the last position."""
    v, t = model.cfg.vision, model.cfg.text
    L = v.side**2 + 1  # CLS + patches
    tower_linear = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vision = 2 * crops * L * tower_linear + crops * v.num_layers * 4 * L * L * v.hidden_size
    projector = 2 * crops * (L - 1) * (v.hidden_size * t.hidden_size + t.hidden_size**2)
    T = image_tokens + text_tokens
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    layer_linear = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    decoder = 2 * T * t.num_layers * layer_linear + t.num_layers * 2 * T * T * q  # 4 T^2 q / 2 (causal)
    return vision + projector + decoder + 2 * t.hidden_size * t.vocab_size


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers


def interleaved(fns: dict, repeats: int) -> dict:
    """Run each of `fns` once as warm-up, then `repeats` rounds taking turns; -> name -> median figure. A callable
    that returns a float gives its own figure (P1's tok/s); otherwise the figure is the call's duration in seconds."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            dt = out if isinstance(out, float) else time.perf_counter() - t0
            if r > 0:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


class TokenClock:
    """A transformers streamer that timestamps each new token (put() gets the prompt first, then each token)."""

    def __init__(self):
        self.stamps, self.tokens = [], []

    def put(self, value):
        self.stamps.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: a spawned child inherits its parent's peak
    through fork and exec there, so a child of a process that held both models would report their peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process (its own peak RSS); returns what fn returns."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


# ----------------------------------------------------------------------------------------------------------------
# P1, P2: decoding and time to first token (both models in this process)


def bench_decode(ours, theirs, new_tokens: int, repeats: int, compile: bool, variant=None):
    import generate as generation

    vocab = ours.cfg.text.vocab_size
    prompt = torch.randint(10, min(vocab, 1000), (32,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {}

    def ours_run(compiled, model=ours, key=None):
        def run():
            stamps, tokens = [], []
            for token in generation.generate(model, prompt, max_new_tokens=new_tokens, compile=compiled):
                stamps.append(time.perf_counter())
                tokens.append(token)
            results[key or ("ours_compiled" if compiled else "ours")] = tokens
            return (len(stamps) - 1) / (stamps[-1] - stamps[0])
        return run

    def theirs_run():
        clock = TokenClock()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
        results["theirs"] = [t for step in clock.tokens[1:] for t in step]
        return (len(clock.stamps) - 2) / (clock.stamps[-1] - clock.stamps[1])

    fns = {"ours": ours_run(False), "theirs": theirs_run}
    if compile:
        fns["ours_compiled"] = ours_run(True)
    if variant is not None:
        fns["variant"] = ours_run(False, variant, "variant")
    rates = interleaved(fns, repeats)  # medians of the tok/s each run returns
    same = all(results[k] == results["theirs"] for k in fns if k != "variant")
    # int8 / bf16 change the numbers: on random weights a near-tie may flip, so the variant is reported apart
    rates["variant_same_tokens"] = results.get("variant") == results["theirs"]
    return rates, same, len(prompt)


def bench_first_token(ours, theirs, processor, crop: int, repeats: int):
    import generate as generation
    from anyres import process_image

    image = photo(2 * crop, 2 * crop, seed=1)
    processed = process_image(image, ours.cfg)
    pixels = processor(images=image, return_tensors="pt")
    vocab = min(ours.cfg.text.vocab_size, 1000)
    text = torch.randint(10, vocab, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = text[:2] + [IMAGE_TOKEN] * processed.num_tokens + text[2:]
    their_ids = torch.tensor([[theirs.config.image_token_id if t == IMAGE_TOKEN else t for t in ids]])
    firsts = {}

    def ours_run():
        firsts["ours"] = next(generation.generate(ours, ids, [processed], max_new_tokens=1))

    def theirs_run():
        with torch.inference_mode():
            out = theirs.generate(input_ids=their_ids, attention_mask=torch.ones_like(their_ids), max_new_tokens=1,
                                  do_sample=False, pad_token_id=0, pixel_values=pixels["pixel_values"],
                                  image_sizes=pixels["image_sizes"])
        firsts["theirs"] = int(out[0, -1])

    seconds = interleaved({"ours": ours_run, "theirs": theirs_run}, repeats)
    return seconds, firsts["ours"] == firsts["theirs"], processed


# ----------------------------------------------------------------------------------------------------------------
# P3: preprocessing


def bench_preprocess(ours, processor, size, repeats: int):
    from anyres import process_image

    image = photo(*size, seed=2)
    mine, theirs = process_image(image, ours.cfg), processor(images=image, return_tensors="pt")
    identical = torch.equal(mine.pixels, theirs["pixel_values"][0][: mine.pixels.shape[0]])
    seconds = interleaved({"ours": lambda: process_image(image, ours.cfg),
                           "theirs": lambda: processor(images=image, return_tensors="pt")}, repeats)
    return seconds, identical


# ----------------------------------------------------------------------------------------------------------------
# P4, P5: in child processes, one side each, so that each peak RSS belongs to one side


def train_child(side: str, folder: str, threads: int, seq_len: int, steps: int):
    """Median seconds of one training step (2 samples of seq_len tokens) and the process's peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_ours(Path(folder)) if side == "ours" else load_theirs(Path(folder))
    model.train()
    decoder = model.language_model if side == "ours" else model.model.language_model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():  # the tied head is the embedding matrix, in the decoder on both sides
        p.requires_grad_(True)
    vocab = model.cfg.text.vocab_size if side == "ours" else model.config.text_config.vocab_size
    ids = torch.randint(10, vocab, (2, seq_len))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        if side == "ours":
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        else:
            loss = model(input_ids=ids, labels=ids).loss  # shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), peak_rss_bytes(), loss.item()


def load_child(side: str, folder: str, threads: int):
    """Seconds to load the checkpoint, and the RSS before loading and at its peak."""
    torch.set_num_threads(threads)
    if side == "theirs":
        import transformers  # noqa: F401  (imported before the clock starts, as ours is)
    else:
        import convert  # noqa: F401
    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_ours(Path(folder)) if side == "ours" else load_theirs(Path(folder))
    # touch one value in every 4 KiB page, so that weights mapped lazily from the file count as loaded
    total = sum(float(p.detach().reshape(-1)[:: 4096 // p.element_size()].sum()) for p in model.parameters())
    seconds = time.perf_counter() - t0
    assert math.isfinite(total)
    return seconds, before, peak_rss_bytes()


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny model (quick check of the script)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=min(os.cpu_count(), 2) if os.cpu_count() else 2,
                   help="torch threads for both sides (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure and side, after one warm-up")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--train-len", type=int, default=256, help="tokens per training sample (P4)")
    p.add_argument("--compile", action="store_true", help="P1 also with the compiled decode step (compiles first)")
    p.add_argument("--only", default="P1,P2,P3,P4,P5", help="comma-separated subset of P1..P5")
    p.add_argument("--quantize", choices=quantize.MODES, default=None,
                   help="P1 also with int8 weights (P1v), as infer.py's --quantize")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="P1 also in this compute dtype (P1v; float32 alone adds no variant)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "llava-bench"),
                   help="where the random checkpoint is written once")
    p.add_argument("--peer", choices=["llama.cpp"], default=None,
                   help="P1 also: each of our modes against llama.cpp on the same weights (bench/peer_llama_cpp.py; "
                        "builds it once into CACHE_DIR/llama.cpp)")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    folder = checkpoint(Path(args.cache_dir), args.small)
    weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    bandwidth, gflops = copy_bandwidth(), matmul_rate(1024 if args.small else 4096)
    report = {"machine": {"threads": args.threads, "copy_GB_per_s": round(bandwidth, 1),
                          "matmul_fp32_GFLOP_per_s": round(gflops, 1), "cpu_count": os.cpu_count(),
                          "load_average": os.getloadavg()},
              "model": "small" if args.small else "CLIP-L/336 + Qwen2-0.5B-sized decoder, fp32",
              "weights_bytes": weight_bytes}
    print(f"machine: {args.threads} threads, copy {bandwidth:.1f} GB/s, fp32 matmul {gflops:.0f} GFLOP/s, "
          f"load average {os.getloadavg()[0]:.2f}; weights {weight_bytes / 1e9:.2f} GB")
    rows = []

    def figure(key, name, ours, theirs, unit, higher_is_better, roofline_share=None, **extra):
        ratio = ours / theirs if higher_is_better else theirs / ours
        report[key] = {"ours": ours, "theirs": theirs, "ratio": round(ratio, 3), "unit": unit,
                       "roofline_share": None if roofline_share is None else round(roofline_share, 3), **extra}
        share = "" if roofline_share is None else f"{100 * roofline_share:.0f}%"
        rows.append((key, name, f"{ours:.3g} {unit}", f"{theirs:.3g} {unit}", f"{ratio:.2f}x", share))
        print(f"{key} {name}: ours {ours:.4g} {unit}, theirs {theirs:.4g} {unit}, ratio {ratio:.2f}x"
              + (f", {share} of roofline" if share else "") + "".join(f", {k} {v}" for k, v in extra.items()),
              flush=True)

    if only & {"P1", "P2", "P3"}:
        ours, theirs, processor = load_ours(folder), load_theirs(folder), load_their_processor(folder)
        crop = ours.cfg.vision.image_size
        if "P1" in only:
            dtype = getattr(torch, args.dtype)
            variant = (load_ours(folder, dtype, args.quantize)
                       if args.quantize or dtype != torch.float32 else None)
            rates, same, context = bench_decode(ours, theirs, args.new_tokens, args.repeats, args.compile, variant)
            roof = bandwidth * 1e9 / decode_bytes_per_token(ours, context + args.new_tokens)
            extra = {"ours_compiled": round(rates["ours_compiled"], 3)} if args.compile else {}
            figure("P1", "decode (batch 1, greedy)", rates["ours"], rates["theirs"], "tok/s", True,
                   rates["ours"] / roof, roofline_tok_per_s=round(roof, 2), same_tokens=same, **extra)
            if variant is not None:
                name = " + ".join(([args.quantize] if args.quantize else []) + [args.dtype])
                roof = bandwidth * 1e9 / decode_bytes_per_token(variant, context + args.new_tokens)
                figure("P1v", f"decode {name} (vs transformers fp32)", rates["variant"], rates["theirs"], "tok/s",
                       True, rates["variant"] / roof, roofline_tok_per_s=round(roof, 2),
                       ratio_to_ours_fp32=round(rates["variant"] / rates["ours"], 3),
                       same_tokens_as_fp32=rates["variant_same_tokens"])
                del variant
        if "P2" in only:
            seconds, same, processed = bench_first_token(ours, theirs, processor, crop, args.repeats)
            flops = prefill_flops(ours, processed.pixels.shape[0], processed.num_tokens, 32)
            roof = flops / (gflops * 1e9)
            figure("P2", f"first token, {2 * crop}x{2 * crop} image", seconds["ours"], seconds["theirs"], "s", False,
                   roof / seconds["ours"], roofline_s=round(roof, 2), tflop=round(flops / 1e12, 3), same_token=same)
        if "P3" in only:
            size = (512, 384) if args.small else (2048, 1536)
            seconds, identical = bench_preprocess(ours, processor, size, args.repeats)
            figure("P3", f"AnyRes preprocessing {size[0]}x{size[1]}", 1 / seconds["ours"], 1 / seconds["theirs"],
                   "img/s", True, identical_pixels=identical)
        del ours, theirs

    if "P1" in only and args.peer == "llama.cpp":
        import peer_llama_cpp

        for model_name in ["small"] if args.small else ["llama-0.45b", "smollm2"]:
            peer = peer_llama_cpp.compare(Path(args.cache_dir) / "llama.cpp", model_name, args.threads, args.repeats,
                                          bandwidth)
            report[f"P1 llama.cpp {model_name}"] = peer
            print(peer_llama_cpp.table(peer, f"P1 against llama.cpp: {model_name}, {args.threads} threads"), flush=True)

    if "P4" in only:
        runs = {side: in_child(train_child, side, str(folder), args.threads, args.train_len, args.repeats)
                for side in ("ours", "theirs")}
        figure("P4", f"train step, 2 x {args.train_len} tokens", 2 / runs["ours"][0], 2 / runs["theirs"][0],
               "samples/s", True, peak_rss_ours_GB=round(runs["ours"][1] / 1e9, 2),
               peak_rss_theirs_GB=round(runs["theirs"][1] / 1e9, 2))

    if "P5" in only:
        for side in ("ours", "theirs"):
            in_child(load_child, side, str(folder), args.threads)  # warm-up: the file is now in the page cache
        loads = {"ours": [], "theirs": []}
        for _ in range(args.repeats):
            for side in loads:
                loads[side].append(in_child(load_child, side, str(folder), args.threads))
        med = {s: statistics.median(r[0] for r in runs) for s, runs in loads.items()}
        over = {s: statistics.median((r[2] - r[1]) / weight_bytes for r in runs) for s, runs in loads.items()}
        figure("P5", "checkpoint load", med["ours"], med["theirs"], "s", False,
               weight_bytes / (bandwidth * 1e9) / med["ours"],
               peak_rss_over_weights_ours=round(over["ours"], 3), peak_rss_over_weights_theirs=round(over["theirs"], 3))

    print("\n| | figure | ours | transformers | ours/theirs | share of roofline |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
