"""int8 weight-only quantisation: the decoder's matrices and the output head stored as int8, one scale per output
channel, while activations stay in the compute dtype (gpt-fast's WeightOnlyInt8Linear, applied at load time).

    W (out, in) float  ->  q (out, in) int8,  s (out,)   W ~ q * s[:, None],   s = max_j |W_ij| / 127
    x (..., in) -> y = (x @ q.T) * s  (..., out)            one matrix-vector product per token when decoding

Each weight moves by at most s/2, so output i moves by at most s_i / 2 * ||x||_1; the bf16 kernel adds its own
rounding (2^-8 relative). A decode step reads every weight once, so int8 (a quarter of fp32's bytes, half of bf16's)
is faster where bandwidth bounds it. float16 keeps the scales in fp32 and multiplies in fp32 (its range holds neither
tiny scales nor x @ q.T). int8-dynamic also rounds each token's activations to 8 bits, for fbgemm's int8 dot
products on CPU (7-bit weights, so its int16 sums never saturate). The bounds, the float16 case and the kernels are
worked through in docs/quantization.md.

int4 stores the decoder's matrices in 4 bits, in groups of GROUP_SIZE inputs with a scale and a zero point each
(gpt-fast's WeightOnlyInt4Linear, torchao's int4 weight-only; llama.cpp's Q4_1 has the same form):

    W (out, in) -> q (out, in) in 0..15, s, z (in / 32, out)     W ~ (q - 8) * s + z  within each group of 32 inputs

Each weight moves by at most s/2 (the grid covers its group with half a step to spare), so output i moves by at most
sum over groups g of s_gi / 2 * ||x_g||_1; the kernel adds bf16's rounding as int8's does. The output head stays
int8 (llama.cpp keeps it at 6 or 8 bits in its 4-bit files). PyTorch's own aten kernels are called directly: torchao
wraps the same ones, and is not worth a dependency for two calls.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int8-dynamic", "int4")  # --quantize: weight-only; + per-token int8 activations (CPU); 4-bit
GROUP_SIZE = 32  # int4: inputs per scale and zero point (as Q4_0/Q4_1); 128 would not divide SmolLM2's 576
DYNAMIC_QMAX = 63  # int8-dynamic's weights use 7 bits, so that its 8-bit activations never saturate (see above)


def quantize_per_channel(w: torch.Tensor, dtype, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (q (out, in) int8 in [-qmax, qmax], scales (out,) in `dtype`), symmetric, zero point 0."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / qmax).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype(dtype))
    # divide by the scale as stored: rounded to bf16 it may be up to 2^-8 smaller than max/qmax, and max / scale still
    # stays below qmax + 1/2, so the clamp never bites and every weight moves by at most scale / 2
    q = torch.round(w / scales.float()[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scales


def scale_dtype(dtype):
    """The scales' dtype for a model in `dtype`: fp16 cannot hold a scale below 6e-8 (see the module docstring)."""
    return torch.float32 if dtype == torch.float16 else dtype


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear: `weight` int8 (out, in), `scales` (out,) and `bias` in the compute dtype (scales in
    fp32 for fp16); for int8-dynamic `packed` holds the matrix instead, in fbgemm's layout (`weight` is None).

    Built on the meta device, its weight is a float placeholder of the checkpoint's shape, so that convert.py checks
    names and shapes as for any layer; `load_weight` then quantises the tensor read from the checkpoint, one layer at
    a time, so the full-precision model never exists in memory."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dynamic: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.packed = None  # int8-dynamic: the int8 matrix in fbgemm's packed layout, which replaces `weight`
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
        self.register_buffer("scales", torch.empty(out_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=None, dynamic=False):
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, dynamic)
        dtype = dtype or weight.dtype
        layer.load_weight("weight", weight, dtype, weight.device)
        if bias is not None:
            layer.load_weight("bias", bias, dtype, weight.device)
        return layer

    def load_weight(self, name: str, tensor: torch.Tensor, dtype, device):
        """convert.load_weights hands each checkpoint tensor of this layer here instead of assigning it."""
        if name == "weight":
            q, scales = quantize_per_channel(tensor.to(device), dtype, DYNAMIC_QMAX if self.dynamic else 127)
            self.scales = scales
            if self.dynamic:
                self.packed, self.weight = pack_for_fbgemm(q, scales), None
            else:
                self.weight = nn.Parameter(q, requires_grad=False)
        else:
            self.bias = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)

    @classmethod
    def concat(cls, layers: list) -> "Int8Linear":
        """One layer computing `layers`' outputs side by side (model.fuse_projections): per-output-channel scales
        concatenate with the rows; fbgemm's packed matrices are unpacked, joined and packed again."""
        first = layers[0]
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), first.bias is not None,
                    first.dynamic)
        fused.scales = torch.cat([layer.scales for layer in layers])
        if first.dynamic:
            rows = [torch.ops.quantized.linear_unpack(layer.packed)[0].int_repr() for layer in layers]
            fused.packed, fused.weight = pack_for_fbgemm(torch.cat(rows), fused.scales), None
        else:
            fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=False)
        return fused

    def forward(self, x):  # (..., in) -> (..., out)
        if self.packed is not None:  # int8-dynamic
            x2 = x.reshape(-1, self.in_features).float()  # (M, in)
            if len(x2) == 1:  # one token (decoding): fbgemm's one range is already its own
                y = torch.ops.quantized.linear_dynamic(x2, self.packed, False)  # False: 8-bit activations
            else:  # a prompt: each row divided by its larger side, so that every token gets (nearly) its own range
                lo, hi = x2.aminmax(dim=1, keepdim=True)  # (M, 1) each
                major = torch.where(hi >= -lo, hi, lo)
                major = torch.where(major == 0, 1.0, major)  # a row of zeros
                y = torch.ops.quantized.linear_dynamic(x2 / major, self.packed, False) * major
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        elif (x.device.type == "cpu" and self.in_features % 8 == 0 and x.numel() < 48 * self.in_features
              and not torch.compiler.is_compiling()):
            # the kernel reads rows in aligned blocks of 8; from 48 rows on (a prompt) the plain product below is
            # faster, as it is where torch.compile traces the layer
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in), see the module docstring
            if x2.data_ptr() % 16:  # a view into a row's middle: the kernel's aligned loads would fault
                x2 = x2.clone()
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales.to(torch.bfloat16))  # (M, out)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        elif x.dtype == torch.float16:  # x @ q.T overflows fp16 before the scale brings it back (module docstring)
            y = (F.linear(x.float(), self.weight.float()) * self.scales).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{'int8-dynamic' if self.dynamic else 'int8'}")


def dynamic_available() -> bool:
    """fbgemm's int8 kernels ship in PyTorch's x86 builds."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def pack_for_fbgemm(q: torch.Tensor, scales: torch.Tensor):
    """(out, in) int8 + (out,) scales -> fbgemm's packed matrix (its own copy; the caller drops q)."""
    with warnings.catch_warnings():  # PyTorch marks its quantised tensor type deprecated; the packing needs one
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q.cpu(), scales.double().cpu(),
                                                      torch.zeros(len(scales), dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


# ----------------------------------------------------------------------------------------------------------------
# int4: group-wise 4-bit weights


def quantize_groupwise(w: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (q (out, in) int32 in 0..15, scales_and_zeros (in / group, out, 2) bf16), the kernels' layout.

    Each group's grid z + (q - 8) s, q in 0..15, is centred on the group's range: z = (lo + hi) / 2 + s / 2. The
    step s >= (hi - lo) / 15 covers the range; s >= |centre| / 127 keeps z's bf16 rounding (2^-9 |z|) within a
    quarter step, so that with s and z as stored the range still lies inside the grid and no weight is clipped."""
    out, n = w.shape
    g = w.float().reshape(out, n // group, group)
    lo, hi = g.amin(-1), g.amax(-1)  # (out, in / group)
    centre = (lo + hi) / 2
    scale = torch.maximum((hi - lo) / 15, centre.abs() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scale = scale.to(torch.bfloat16).float()  # quantise against the values the kernel will read
    zero = (centre + scale / 2).to(torch.bfloat16).float()
    q = (torch.round((g - zero[..., None]) / scale[..., None]) + 8).clamp(0, 15).to(torch.int32).reshape(out, n)
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def dequantize_groupwise(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int = GROUP_SIZE) -> torch.Tensor:
    """The inverse: (out, in) fp32 weights, (q - 8) * s + z per group."""
    out, n = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, in / group) each
    return ((q.reshape(out, n // group, group).float() - 8) * s[..., None] + z[..., None]).reshape(out, n)


def int4_fits(in_features: int, out_features: int) -> bool:
    """The CPU packing takes whole groups of inputs and outputs in multiples of 16."""
    return in_features % GROUP_SIZE == 0 and out_features % 16 == 0


class Int4Linear(nn.Module):
    """A drop-in for nn.Linear: `weight` the 4-bit matrix packed for the device's kernel (uint8 on CPU, int32 on
    CUDA; opaque layouts), `scales_and_zeros` (in / GROUP_SIZE, out, 2) bf16, `bias` in the compute dtype. Built on
    the meta device and filled by `load_weight`, one layer at a time, as Int8Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
        self.register_buffer("scales_and_zeros", torch.empty(in_features // GROUP_SIZE, out_features, 2, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=None):
        layer = cls(weight.shape[1], weight.shape[0], bias is not None)
        layer.load_weight("weight", weight, dtype or weight.dtype, weight.device)
        if bias is not None:
            layer.load_weight("bias", bias, dtype or weight.dtype, weight.device)
        return layer

    def load_weight(self, name: str, tensor: torch.Tensor, dtype, device):
        if name == "weight":
            q, self.scales_and_zeros = quantize_groupwise(tensor.to(device))
            self.weight = nn.Parameter(pack_int4(q), requires_grad=False)
        else:
            self.bias = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)

    @classmethod
    def concat(cls, layers: list) -> "Int4Linear | None":
        """One layer computing `layers`' outputs side by side (model.fuse_projections), or None. Both packed layouts
        lead with the outputs in blocks (CPU: 64 outputs, the last block shorter; CUDA: tiles of 8), so the packed
        matrices join along their first dimension where every layer but the last fills whole blocks; the groups'
        scales and zeros join along the outputs."""
        first = layers[0]
        block = 8 if first.weight.device.type == "cuda" else 64
        if any(layer.out_features % block for layer in layers[:-1]):
            return None
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), first.bias is not None)
        fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        fused.scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=False)
        return fused

    def forward(self, x):  # (..., in) -> (..., out)
        # the kernels take bf16 activations (the x86 ones are vectorised for bf16 only) and round the result to bf16
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in)
        if x2.device.type == "cuda":  # tinygemm; untested here (no GPU in CI)
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, GROUP_SIZE, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, GROUP_SIZE, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int4"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int32 in 0..15 -> the device kernel's packed matrix."""
    if q.device.type == "cuda":  # two values a byte, then tinygemm's tiles (inner k-tiles as gpt-fast picks them)
        tiles = 8 if q.shape[1] % 128 == 0 else 4 if q.shape[1] % 64 == 0 else 2
        return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # 1: the CPU op ignores it


def quantized_layers(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Swap every nn.Linear of the language model for `mode`'s layer (MODES), and the output head for an Int8Linear
    (int8-dynamic's for that mode); call on the meta-device model before its weights are loaded
    (convert.load_pretrained's `prepare`). int4 keeps a layer whose shape its kernel cannot pack in int8. A tied
    head has no matrix of its own yet: `quantize_tied_head` adds it once the embedding is loaded."""
    dynamic = mode == "int8-dynamic"

    def swap(child):
        if mode == "int4" and int4_fits(child.in_features, child.out_features):
            return Int4Linear(child.in_features, child.out_features, child.bias is not None)
        return Int8Linear(child.in_features, child.out_features, child.bias is not None, dynamic)

    for module in list(model.language_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, swap(child))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear(model.lm_head.in_features, model.lm_head.out_features, dynamic=dynamic)
    return model


def quantize_tied_head(model: nn.Module) -> nn.Module:
    """A model whose head is its embedding matrix (the 0.5B Qwen models): give it an int8 copy as its head, as the
    head is read whole for every token (a quarter of Qwen2-0.5B's weights) while the embedding is only looked up."""
    if model.lm_head is None:
        embed = model.language_model.embed_tokens.weight
        dynamic = any(isinstance(m, Int8Linear) and m.dynamic for m in model.language_model.modules())
        model.lm_head = Int8Linear.from_float(embed, dtype=embed.dtype, dynamic=dynamic)
    return model
