"""The bandwidth bound of decoding, shared by bench.py and peer_llama_cpp.py: at batch 1 a decode step reads every
weight once, so tokens/s can be at most (copy bandwidth) / (bytes a step reads); and random weights that keep a
benchmark model's activations O(1), so that its greedy tokens are not decided by near-ties."""

import math
import time

import torch


def copy_bandwidth() -> float:
    """GB/s of a 512 MiB fp32 copy, counting the bytes read and the bytes written."""
    a = torch.rand(128 << 20)
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / min(times[1:]) / 1e9


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes one decode step must read: every decoder matrix and norm, the output head, and the KV cache, each in
    its stored dtype (int8 layers: 1 byte a weight, plus their scales; int4: half a byte, plus a scale and zero
    point per group; int8-dynamic ones keep it packed, outside their parameters)."""
    t = model.cfg.text
    packed = sum(m.in_features * m.out_features for m in [*model.language_model.modules(), model.lm_head]
                 if getattr(m, "packed", None) is not None)
    tensors = [p for n, p in model.language_model.named_parameters() if "embed_tokens" not in n]
    tensors += [b for n, b in model.language_model.named_buffers() if n.endswith(("scales", "scales_and_zeros"))]
    if model.lm_head is not None:
        tensors += list(model.lm_head.parameters()) + list(model.lm_head.buffers())
    else:  # tied: the embedding matrix, read whole to score every token
        tensors.append(model.language_model.embed_tokens.weight)
    dtype = model.language_model.embed_tokens.weight.dtype  # the compute dtype, which the KV cache is in
    kv = 2 * t.num_layers * t.num_kv_heads * t.head_dim * context * dtype.itemsize
    return sum(x.numel() * x.element_size() for x in tensors) + packed + kv


def order_one_weights(model):
    """Vectors near 1 (norms) or 0 (biases), matrices with rows of unit norm on average: activations stay O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape) * 0.05 + (1.0 if "norm" in name else 0.0))
            else:
                p.copy_(torch.randn(p.shape) / math.sqrt(p[0].numel()))
