"""Decode with q/k/v and gate/up fused (model.fuse_projections, as infer.py loads every model) against the same
checkpoint unfused, per mode, in one process. Run by hand.

    python bench/bench_fuse.py                           # the 0.45B Llama of bench/peer_llama_cpp.py, 2 threads
    python bench/bench_fuse.py --modes int4 --rounds 8

Each round decodes 64 greedy tokens after a 32-token prompt with one model, then the other (peer_llama_cpp's
ours_decode), so that both see the same machine; the medians of the rounds and their ratio are printed, with each
side's spread, which on a shared machine is often wider than the effect.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
from peer_llama_cpp import decode_flags, llama_folder, load_ours, ours_decode  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decode_flags(p)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = llama_folder(Path(args.cache_dir), args.model == "small")
    print("| mode | unfused tok/s (spread) | fused tok/s (spread) | fused / unfused |\n|---|---|---|---|")
    for mode in args.modes.split(","):
        models = {"unfused": load_ours(folder, mode, fuse=False), "fused": load_ours(folder, mode)}
        rates = {name: [] for name in models}
        for model in models.values():
            ours_decode(model, 8)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                rates[name].append(ours_decode(model))
        med = {name: statistics.median(r) for name, r in rates.items()}
        cells = [f"{med[n]:.1f} ({min(rates[n]):.1f}-{max(rates[n]):.1f})" for n in models]
        print(f"| {mode} | {cells[0]} | {cells[1]} | {med['fused'] / med['unfused']:.2f}x |", flush=True)
        del models


if __name__ == "__main__":
    main()
