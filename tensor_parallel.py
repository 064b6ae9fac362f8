"""Tensor parallelism for inference: the decoder split over the N processes of `torchrun --nproc_per_node N`, with
PyTorch's own engine (torch.distributed.tensor.parallel, DTensor). Gloo on CPU, NCCL on GPUs (one GPU per rank).

Per decoder block, Megatron-LM's split (as torchtitan and gpt-fast do it); x is replicated on every rank:

    x (B, T, D)
      q_proj, k_proj, v_proj   ColwiseParallel  -> (B, T, H/N * hd), (B, T, KV/N * hd): this rank's heads, so
                                                   RoPE, the KV cache and attention are local
      o_proj                   RowwiseParallel  -> partial sums, all-reduce -> (B, T, D)
      gate_proj, up_proj       ColwiseParallel  -> (B, T, I/N)
      down_proj                RowwiseParallel  -> partial sums, all-reduce -> (B, T, D)

Two all-reduces of (B, T, D) per block; norms and the residual stream are computed on every rank alike.

The output head is split over the vocabulary (ColwiseParallel, logits all-gathered to (B, T, V) on every rank, so
all ranks pick the same next token): it is read whole for every token (1.25B of LLaVA-NeXT-72B's 72B parameters, a
quarter of Qwen2-0.5B's), so splitting it divides a per-token cost. A tied head is a view of this rank's rows of the
embedding. The embedding stays replicated: a lookup reads B rows, not the matrix, and splitting it would add an
all-reduce per step to save memory alone (2.5 GB of bf16 per rank at 72B). The vision tower and projector stay
replicated too: they run once per image, and are 0.4B parameters even at 72B.

Loading: parallelize_module runs on the meta-device model, before any weight exists, and gives each split parameter
its placement; convert.load_weights then hands every tensor of a split layer, memory-mapped, to `load_shard`, which
copies this rank's block only. No rank ever holds more than its share of a split matrix.
"""

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from distributed import world_size


class TensorParallelError(ValueError):
    """A model that cannot be split over this many ranks; the message says why and what to do."""


def check_heads(cfg, n: int):
    """Each rank must hold whole attention heads and whole key/value heads."""
    if cfg.num_heads % n or cfg.num_kv_heads % n:
        raise TensorParallelError(
            f"tensor parallelism over {n} ranks needs the head counts to divide by {n}, but this model has "
            f"{cfg.num_heads} attention heads and {cfg.num_kv_heads} key/value heads: run with --nproc_per_node "
            f"set to a common divisor of {cfg.num_heads} and {cfg.num_kv_heads}")


def shard_decoder(model: nn.Module, device: str) -> nn.Module:
    """Split the meta-device `model`'s decoder (and an untied head) over the ranks; convert.load_pretrained's
    `prepare`. Creates the process group (env:// from torchrun) once the split is known to be possible."""
    n, text = world_size(), model.cfg.text
    check_heads(text, n)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    mesh = init_device_mesh(torch.device(device).type, (n,))
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for block in model.language_model.layers:
        parallelize_module(block, mesh, plan)
        for name in plan:
            _loads_shards(block.get_submodule(name))
    if model.lm_head is not None:
        parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
        _loads_shards(model.lm_head)
    # from here on the config describes this rank's shard: the KV cache and attention see H/N and KV/N heads
    text.num_heads, text.num_kv_heads = text.num_heads // n, text.num_kv_heads // n
    model.tp_mesh = mesh
    return model


def shard_tied_head(model: nn.Module) -> nn.Module:
    """After loading: a tied model gets a split head whose shard is a view of this rank's rows of the embedding."""
    if model.lm_head is None:
        embed = model.language_model.embed_tokens.weight  # (V, D), replicated
        with torch.device("meta"):
            model.lm_head = nn.Linear(embed.shape[1], embed.shape[0], bias=False)
        parallelize_module(model.lm_head, model.tp_mesh, ColwiseParallel(output_layouts=Replicate()))
        load_shard(model.lm_head, "weight", embed, embed.dtype, embed.device)
    return model


def _loads_shards(module: nn.Module):
    module.load_weight = functools.partial(load_shard, module)  # convert._assign calls it instead of assigning


def load_shard(module: nn.Module, name: str, tensor: torch.Tensor, dtype, device):
    """Replace the meta DTensor `module.<name>` by this rank's block of the full `tensor` (a memory-mapped
    checkpoint tensor: slicing it reads only the block's bytes), keeping the placement parallelize_module chose."""
    param = getattr(module, name)
    mesh, placements = param.device_mesh, param.placements
    local = tensor
    for placement in placements:
        if isinstance(placement, Shard):  # DTensor splits as torch.chunk does (the last block may be shorter)
            local = local.chunk(mesh.size(), dim=placement.dim)[mesh.get_local_rank()]
    local = local.to(device=device, dtype=dtype).contiguous()
    stride = torch.empty(tensor.shape, device="meta").stride()  # the full tensor's, contiguous
    shard = DTensor.from_local(local, mesh, placements, run_check=False, shape=tensor.shape, stride=stride)
    setattr(module, name, nn.Parameter(shard, requires_grad=False))
