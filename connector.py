"""The connector: the small network that maps vision-tower features into the LLM's embedding space.

    vision features (N, n*n, D_vision) -> projector -> (N, n*n, D_llm)

LLaVA-1 used a single linear layer; LLaVA-1.5 showed a two-layer MLP ("mlp2x_gelu") is clearly better,
and every release since (1.6 / NeXT, Interleave, OneVision) uses it. The projector runs on every crop
independently, *before* AnyRes reassembles the crops into a grid, so the grid, the unpadding, the
`image_newline` vector and any interpolation all live in LLM space (see anyres.py).
"""

import re

import torch.nn as nn


class Projector(nn.Module):
    """`mm_projector_type` "linear" or "mlp{N}x_gelu" (N linear layers with exact-erf GELU between them).

    Parameter names follow the llava-hf layout (`linear_1`, `linear_2`, ...); the single-linear variant is
    `linear`. convert.py maps the original `mm_projector.{0,2}` names onto these.
    """

    def __init__(self, projector_type: str, vision_dim: int, llm_dim: int):
        super().__init__()
        self.projector_type = projector_type
        if projector_type == "linear":
            self.linear = nn.Linear(vision_dim, llm_dim)
            return
        match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
        if not match:
            raise ValueError(f"unsupported mm_projector_type {projector_type!r}: expected 'linear' or 'mlp<N>x_gelu'")
        depth = int(match.group(1))
        dims = [vision_dim] + [llm_dim] * depth
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.depth = depth
        self.act = nn.GELU()  # exact erf GELU, as in the original nn.GELU() and transformers' "gelu"

    def forward(self, x):  # (N, L, D_vision) -> (N, L, D_llm)
        if self.projector_type == "linear":
            return self.linear(x)
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x
