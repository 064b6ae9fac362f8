"""Where one decode step's time goes, per mode: matrix products, the output head, attention over the KV cache, the
norms, the other tensor ops, and what is left (Python and PyTorch's dispatch between ops). Run by hand.

    python bench/profile_decode.py                       # the 0.45B Llama of bench/peer_llama_cpp.py, 2 threads
    python bench/profile_decode.py --model small --modes fp32,int4

For each mode (loaded as infer.py loads it): a 32-token prompt, 8 warm-up steps, then --steps decode steps under
torch.profiler. Module hooks label each layer's call (record_function), so a label's time is its whole call,
Python included: "layers" every decoder projection, "head" the output head, "norm" the RMSNorms; "attention" is
the SDPA op; "rest" the step's remaining wall time (RoPE, the cache write, the embedding, the residual adds, the
Python of the blocks and of the loop, sampling). "outside ATen" cuts across these: the step's wall time that no
ATen op accounts for (Python, module calls, dispatch). The profiler slows each call: tok/s is also measured
without it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import generate as generation  # noqa: E402
import quantize  # noqa: E402
from peer_llama_cpp import decode_flags, llama_folder, load_ours  # noqa: E402
from model import RMSNorm  # noqa: E402

LAYERS = (torch.nn.Linear, quantize.Int8Linear, quantize.Int4Linear)
LABELS = ("layers", "head", "norm")


def label(model):
    """Hooks that open a record_function around every labelled module's call; returns their handles."""
    handles = []
    for name, module in model.named_modules():
        kind = ("head" if name == "lm_head" else "layers" if isinstance(module, LAYERS)
                else "norm" if isinstance(module, RMSNorm) else None)
        if kind:
            def enter(m, args, kind=kind):
                m._label = record_function(kind)
                m._label.__enter__()

            def leave(m, args, out):
                m._label.__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def steps(model, n: int):
    """A generator primed past its prompt: each next() is one decode step."""
    prompt = torch.randint(10, 1000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = generation.generate(model, prompt, max_new_tokens=n + 9)
    next(tokens)  # the prefill
    return tokens


def profile_mode(model, n: int) -> dict:
    """ms per step of each part (module docstring), and tok/s without the profiler."""
    tokens = steps(model, 2 * n + 8)
    for _ in range(8):
        next(tokens)
    t0 = time.perf_counter()
    for _ in range(n):
        next(tokens)
    rate = n / (time.perf_counter() - t0)
    handles = label(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            next(tokens)
        wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    events = prof.key_averages()
    inclusive = {e.key: e.cpu_time_total / 1e3 / n for e in events}  # ms per step
    aten = sum(e.self_cpu_time_total for e in events if e.key not in LABELS) / 1e3 / n
    parts = {k: inclusive.get(k, 0.0) for k in LABELS}
    parts["attention"] = inclusive.get("aten::scaled_dot_product_attention", 0.0)
    parts["rest"] = wall * 1e3 / n - sum(parts.values())
    parts["outside ATen"] = wall * 1e3 / n - aten
    top = sorted((e for e in events if e.key not in LABELS), key=lambda e: -e.self_cpu_time_total)[:4]
    return {"tok/s": rate, "ms/step": 1e3 / rate, "profiled ms/step": wall * 1e3 / n, **parts,
            "top ops": ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / n:.2f}" for e in top)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decode_flags(p)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="profiles per mode; the median of each figure is printed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = llama_folder(Path(args.cache_dir), args.model == "small")
    columns = ["tok/s", "ms/step", "profiled ms/step", "layers", "head", "attention", "norm", "rest", "outside ATen"]
    print("| mode | " + " | ".join(columns) + " | largest ops (self ms/step) |\n|" + "---|" * (len(columns) + 2))
    for mode in args.modes.split(","):
        model = load_ours(folder, mode)
        runs = [profile_mode(model, args.steps) for _ in range(args.repeats)]
        med = {c: statistics.median(r[c] for r in runs) for c in columns}
        print(f"| {mode} | " + " | ".join(f"{med[c]:.2f}" for c in columns) + f" | {runs[-1]['top ops']} |", flush=True)
        del model


if __name__ == "__main__":
    main()
