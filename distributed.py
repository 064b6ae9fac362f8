"""The process group: what every multi-process path (training's DDP / FSDP2, checkpoints, inference's tensor
parallelism) asks of torch.distributed, in one place.

torchrun starts N processes and tells each, in its environment, RANK (0..N-1 over all nodes), WORLD_SIZE (N) and
LOCAL_RANK (its index on its node, which picks its GPU). One process without torchrun is rank 0 of 1, and every
function here then does nothing at all, so single-process code reads the same as the distributed one.
"""

import os
import sys

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(kind: str = "") -> str:
    """This rank's device: under torchrun its own GPU `cuda:LOCAL_RANK`, else `kind` ("": cuda when there is one)."""
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    if not kind.startswith("cuda") or "RANK" not in os.environ:
        return kind
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= torch.cuda.device_count():
        raise SystemExit(f"error: LOCAL_RANK {local}, but this node has {torch.cuda.device_count()} GPUs: give "
                         f"torchrun --nproc-per-node at most the GPU count of each node")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def setup(kind: str = "") -> tuple[int, int, torch.device]:
    """(rank, world size, device), with the process group created under torchrun: NCCL on GPUs, gloo on CPU."""
    device = torch.device(rank_device(kind))
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank(), world_size(), device


def finish():
    """Ends the process group after a run that succeeded on every rank. The barrier first: a rank that tears down
    its gloo connections while another still completes the last collective on them can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def quiet_other_ranks():
    """Only rank 0 prints: the others' stdout and stderr go nowhere (they compute the same answer and the same
    errors; torchrun still reports a rank that fails and its exit code)."""
    if rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_object(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def device_sum(value, device, dtype=torch.float32) -> torch.Tensor:
    """Sum over ranks of a number or tensor, as a tensor on the device; launches the all-reduce without waiting."""
    t = value if torch.is_tensor(value) else torch.tensor(value, dtype=dtype, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t
