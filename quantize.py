"""int8 weight-only quantisation: the decoder's matrices and the output head stored as int8, one scale per output
channel, while activations stay in the compute dtype (gpt-fast's WeightOnlyInt8Linear, applied at load time).

    W (out, in) float  ->  q (out, in) int8,  s (out,)   W ~ q * s[:, None],   s = max_j |W_ij| / 127
    x (..., in) -> y = (x @ q.T) * s  (..., out)            one matrix-vector product per token when decoding

Error bound. q = round(W / s) moves each weight by at most s/2 (no weight is clipped: |W_ij| / s <= 127), so output
i of a layer moves by at most  s_i / 2 * ||x||_1. The CPU kernel below also rounds x and its result to bf16, adding
127 s_i 2^-9 ||x||_1 + 2^-9 |y_i|; tests/test_quantize.py checks the sum layer by layer on real weights. Both are
worst cases: rounding errors of random sign add up to about s_i / sqrt(12) * ||x||_2 instead.

Why: a decode step reads every weight once, so at batch 1 its speed is the memory bandwidth divided by the weights'
bytes; int8 reads a quarter of fp32 and half of bf16 (LLaVA-NeXT-72B: ~73 GB instead of ~145 GB in bf16, one 141 GB
GPU). The vision tower and projector stay in the compute dtype: they run once per image, in the compute-bound
prefill, where int8 storage saves memory but no time.

Kernels. On CPU (rows of a multiple of 8 values, as in every released model), torch._weight_int8pack_mm reads the
int8 matrix directly; its x86 kernels (AVX2, AVX-512) are vectorised for bfloat16 activations only (fp32 ones fall
to a scalar loop ~10x slower than fp32 MKL), so an fp32 model's activations are rounded to bf16 for the product
and its result widened back. Elsewhere (CUDA) the plain dequantise-matmul F.linear(x, q.to(x.dtype)) * s, which
torch.compile fuses into one kernel that reads int8 (eager, it materialises the matrix each call: slower than bf16).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantize_per_channel(w: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (q (out, in) int8, scales (out,) in `dtype`), symmetric, zero point 0."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    # divide by the scale as stored: rounded to bf16 it may be up to 2^-9 smaller than max/127, and max / scale still
    # stays below 127.5, so the clamp never bites and every weight moves by at most scale / 2
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear: `weight` int8 (out, in), `scales` (out,) and `bias` in the compute dtype.

    Built on the meta device, its weight is a float placeholder of the checkpoint's shape, so that convert.py checks
    names and shapes as for any layer; `load_weight` then quantises the tensor read from the checkpoint, one layer at
    a time, so the full-precision model never exists in memory."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
        self.register_buffer("scales", torch.empty(out_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=None):
        layer = cls(weight.shape[1], weight.shape[0], bias is not None)
        dtype = dtype or weight.dtype
        layer.load_weight("weight", weight, dtype, weight.device)
        if bias is not None:
            layer.load_weight("bias", bias, dtype, weight.device)
        return layer

    def load_weight(self, name: str, tensor: torch.Tensor, dtype, device):
        """convert.load_weights hands each checkpoint tensor of this layer here instead of assigning it."""
        if name == "weight":
            q, scales = quantize_per_channel(tensor.to(device), dtype)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.scales = scales
        else:
            self.bias = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)

    def forward(self, x):  # (..., in) -> (..., out)
        if x.device.type == "cpu" and self.in_features % 8 == 0:  # the kernel reads rows in aligned blocks of 8
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in), see the module docstring
            if x2.data_ptr() % 16:  # a view into a row's middle: the kernel's aligned loads would fault
                x2 = x2.clone()
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales.to(torch.bfloat16))  # (M, out)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def int8_layers(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of the language model, and the output head, for an Int8Linear; call on the meta-device
    model before its weights are loaded (convert.load_pretrained's `prepare`). A tied head has no matrix of its own
    yet: `quantize_tied_head` adds it once the embedding is loaded."""
    for module in list(model.language_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.in_features, child.out_features, child.bias is not None))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear(model.lm_head.in_features, model.lm_head.out_features)
    return model


def quantize_tied_head(model: nn.Module) -> nn.Module:
    """A model whose head is its embedding matrix (the 0.5B Qwen models): give it an int8 copy as its head, as the
    head is read whole for every token (a quarter of Qwen2-0.5B's weights) while the embedding is only looked up."""
    if model.lm_head is None:
        embed = model.language_model.embed_tokens.weight
        model.lm_head = Int8Linear.from_float(embed, dtype=embed.dtype)
    return model
