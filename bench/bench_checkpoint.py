"""Checkpoint memory: what a save costs each rank beyond the training state it already holds, for the way train.py
saves (checkpoint.py: DCP shards per rank + the streamed llava-hf export) against gathering the full model and
optimizer state on rank 0 first (the way it used to). A stack of square Linear layers under FSDP2 stands in for
the decoder; the figures scale with its size, the ratios are what matter.

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc-per-node 2 bench/bench_checkpoint.py \\
        [--layers 8 --width 2048 --shard-size 64MB]

Prints, per rank, the peak resident memory above the level before each save (CPU, gloo). The environment variable
keeps glibc from recycling freed buffers inside the heap, where a later phase would reuse them unseen.
"""

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export import parse_size, write_weights  # noqa: E402


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every 2 ms from /proc."""

    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back first, or the next phase reuses it unseen
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="Linear layers of the stand-in model")
    p.add_argument("--width", type=int, default=2048, help="their input and output width")
    p.add_argument("--shard-size", default="64MB", help="--max-shard-size of the llava-hf export")
    args = p.parse_args()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, args.width)).sum().backward()
    optimizer.step()
    state_bytes = 3 * sum(p.numel() * 4 for p in model.parameters())  # weights + two Adam moments, all ranks
    folder = Path(tempfile.mkdtemp(prefix="bench-ckpt-")) if rank == 0 else None
    folder = Path(broadcast(str(folder) if folder else None))

    results = {}
    dist.barrier()
    with PeakRSS() as m:  # the old way: full model + optimizer state gathered to rank 0, then written
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            # stand-in for the write; the gather is the point
            torch.save({"model": msd, "optim": osd}, folder / "full.pt")
        del msd, osd
        dist.barrier()
    results["gather to rank 0"] = m.peak - m.base
    with PeakRSS() as m:  # train.py: each rank writes its own shard
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd["state"]}, checkpoint_id=folder / "dcp")
        del msd, osd
    results["DCP shards"] = m.peak - m.base
    with PeakRSS() as m:  # train.py's llava-hf export: one tensor gathered at a time
        write_weights(dict(model.state_dict()), folder / "hf" if rank == 0 else None, parse_size(args.shard_size))
        dist.barrier()
    results["streamed llava-hf export"] = m.peak - m.base
    for r in range(world):
        if r == rank:
            print(f"rank {rank}: model + AdamW state {state_bytes / 1e6:.0f} MB over {world} ranks; peak RSS above "
                  f"the level before the save: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in results.items()),
                  flush=True)
        dist.barrier()
    if rank == 0:
        shutil.rmtree(folder)
    dist.destroy_process_group()


def broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    main()
