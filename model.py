"""The LLaVA model: a ViT vision tower, the connector, and a Llama-family decoder, written from scratch.

How an image reaches the language model:

    crops (N, 3, C, C)        every crop of every image (anyres.py makes them)
      -> VisionTower          (N, n*n, D_vision)       n = C / patch, CLS dropped, features of an inner layer
      -> Projector            (N, n*n, D_llm)          connector.py
      -> merge_image_features (T_img, D_llm) per image  anyres.py: grid, unpad, newline, anyres_max
      -> spliced into the token embeddings where the prompt holds IMAGE_TOKEN placeholders
      -> Decoder              (B, T, D_llm) -> logits (B, T, V)

Placeholders: a prompt holds one IMAGE_TOKEN (-200, the original LLaVA's IMAGE_TOKEN_INDEX) per image
*token*, i.e. each image's placeholder is already expanded to the exact count that image will produce
(anyres.num_image_tokens). Known lengths up front make batching, labels and the KV cache simple; the
model checks that the count it splices equals the count the prompt reserved.

One decoder covers Llama-2/Vicuna, Mistral, Yi, Llama-3 and Qwen1.5/Qwen2: they differ only in the
numbers of `TextConfig` (q/k/v bias, grouped-query heads, RoPE theta, RMSNorm eps, tied embeddings).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from anyres import HigherAnyRes, ProcessedImage, merge_image_features, pool_features
from connector import Projector

IMAGE_TOKEN = -200  # placeholder id for one image-feature position; never looked up in the embedding table


# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class VisionConfig:
    kind: str = "clip"  # "clip": CLS token, pre-LayerNorm, quick-GELU.  "siglip": no CLS, tanh-GELU, conv bias
    image_size: int = 336  # crop size C
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    num_layers: int = 23  # layers actually computed: the features come out of the last one
    layer_norm_eps: float = 1e-5
    select_feature: str = "patch"  # "patch": drop the CLS token; "full": keep every token

    @property
    def side(self) -> int:  # n: feature-map side of one crop (24 for CLIP-336, 27 for SigLIP-384)
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen1.5 / Qwen2
    tie_word_embeddings: bool = False  # the 0.5B Qwen models
    max_position_embeddings: int = 4096
    family: str = ""  # "llama", "mistral" or "qwen2": the transformers class export.py names ("" = from qkv_bias)


@dataclass
class LlavaConfig:
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    # "pad" (LLaVA-1.5: mean-colour square), "square" (the tower's own resize/crop), "anyres",
    # "anyres_max_<N>" (OneVision: shrink grids beyond ~N crops of tokens back to N)
    image_aspect_ratio: str = "anyres"
    grid_pinpoints: list = field(default_factory=list)  # [[a, b], ...] exactly as in the checkpoint's config
    merge_type: str = "spatial_unpad"  # "flat" (LLaVA-1.5, no newline) or "spatial_unpad"
    # "original": what the code the weights were trained with does; "transformers": what the HF processor does.
    # The differences are listed in the README and handled in anyres.py.
    compat: str = "original"
    higher_anyres: HigherAnyRes = field(default_factory=HigherAnyRes)  # token-budget knobs (anyres.py)

    @property
    def has_newline(self) -> bool:
        return "unpad" in self.merge_type


# ----------------------------------------------------------------------------------------------------------------
# Vision tower: CLIP ViT-L/14-336 and SigLIP SO400M/14-384 share one pre-LN ViT; the flags of VisionConfig
# select the differences.


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (N, L, D)
        q, k, v = (rearrange(p(x), "N L (h d) -> N h L d", h=self.num_heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.out_proj(rearrange(y, "N h L d -> N L (h d)"))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.kind = cfg.kind

    def forward(self, x):
        x = self.fc1(x)
        # CLIP was trained with quick-GELU x*sigmoid(1.702x); SigLIP with the tanh approximation of GELU
        x = x * torch.sigmoid(1.702 * x) if self.kind == "clip" else F.gelu(x, approximate="tanh")
        return self.fc2(x)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """Returns the features LLaVA uses: the output of layer `num_layers` (no final norm), CLS dropped.

    CLIP: hidden state -2 of 24 layers = the output of layer 23, so layer 24 is never built.
    SigLIP: the released LLaVA towers keep 26 of 27 layers and drop the attention-pooling head.
    Neither model's `post_layernorm` touches these features.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.hidden_size, cfg.side
        is_clip = cfg.kind == "clip"
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size, bias=not is_clip)
        self.class_embedding = nn.Parameter(torch.empty(d)) if is_clip else None
        # _weight: skip nn.Embedding's random init, as every value is loaded or set by init_fresh (on the meta
        # device that init would import the whole torch._dynamo package, ~2 s of every checkpoint load)
        self.position_embedding = nn.Embedding(n * n + is_clip, d, _weight=torch.empty(n * n + is_clip, d))
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if is_clip else None  # sic: CLIP's spelling
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        # training the tower (stage 1.5, OneVision's 37 crops): recompute each block in backward; a frozen tower
        # keeps nothing for backward anyway
        self.gradient_checkpointing = False

    def forward(self, pixels):  # (N, 3, C, C)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, D, n, n)
        x = rearrange(x, "N D h w -> N (h w) D")
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # (N, 1 + n*n, D)
        x = x + self.position_embedding.weight
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled() and self.trains()
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        if self.cfg.select_feature == "patch" and self.class_embedding is not None:
            x = x[:, 1:]
        return x  # (N, n*n, D)

    def trains(self) -> bool:  # tools/memory_plan.py asks the same question
        return any(p.requires_grad for p in self.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Decoder: pre-norm RMSNorm, rotary positions (the Hugging Face rotate-half layout the checkpoints were saved in),
# grouped-query attention, SwiGLU MLP.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 and cast back before the weight, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin tables (B, T, head_dim) for absolute positions (B, T); computed in fp32."""
    even = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (even / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, h, T, hd), cos/sin (B, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys and values of every layer, pre-allocated for `max_len` positions: (layers, B, kv_heads, max_len, hd).

    `length` counts the positions already written; the decoder advances it after each forward. The compiled
    decode step (generate.py, "Fast path") instead names the slot to write as a tensor, so that one compiled graph
    serves every step: a Python int that changed each token would be baked into the graph and recompile it.
    """

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype, device):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k, v, slot=None):
        """k, v (B, kv_heads, T, hd) -> the keys/values to attend over.

        slot None: write at `length`, return the written prefix (B, kv_heads, length + T, hd).
        slot (T,) tensor: write there and return the whole buffer (B, kv_heads, max_len, hd), a fixed shape;
        the caller's mask hides the slots not written yet."""
        if slot is not None:
            self.k[layer].index_copy_(2, slot, k)
            self.v[layer].index_copy_(2, slot, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions; this step needs {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.qkv_proj = None  # fuse_projections: q, k and v in one product (inference)

    def forward(self, x, cos, sin, mask, cache, slot=None):  # x (B, T, D)
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rearrange(q, "B T (h d) -> B h T d", d=self.cfg.head_dim)
        k = rearrange(k, "B T (h d) -> B h T d", d=self.cfg.head_dim)
        v = rearrange(v, "B T (h d) -> B h T d", d=self.cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, slot)  # (B, kv_heads, S, hd)
        gqa = self.cfg.num_heads != self.cfg.num_kv_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                           enable_gqa=gqa)
        return self.o_proj(rearrange(y, "B h T d -> B T (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # fuse_projections: gate and up in one product (inference)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, slot=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(padding_mask, T: int, past: int, device):
    """Boolean (B, 1, T, S) mask: causal over S = past + T positions and blind to padding; None when the
    plain causal rule (or no rule, for one new token) is exact, so SDPA can take its fast path."""
    if padding_mask is None and (T == 1 or past == 0):
        return None
    S = past + T
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :S].bool()
    # a padding query sees nothing and its softmax would be NaN; let it see itself (its output is never used)
    idx = torch.arange(T, device=mask.device)
    mask[:, :, idx, past + idx] = True
    return mask


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = nn.Embedding(V, D, _weight=torch.empty(V, D))  # no random init: see VisionTower
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # training: recompute each block in backward instead of storing it

    def forward(self, x, position_ids, padding_mask=None, cache=None, slot=None):  # x (B, T, D) embeddings
        """padding_mask (B, >= S) marks real tokens over the cache positions and these T (extra columns ignored).
        slot: see KVCache.update; given, x is one new token per row and it attends over the whole cache."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if slot is None:
            past = cache.length if cache is not None else 0
            mask = attention_mask(padding_mask, x.shape[1], past, x.device)
        else:  # fixed-shape mask (B or 1, 1, 1, max_len): the slots written so far, minus padding
            max_len = cache.k.shape[3]
            mask = (torch.arange(max_len, device=x.device) <= slot)[None, None, None, :]
            if padding_mask is not None:
                mask = mask & padding_mask[:, None, None, :max_len].bool()
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, slot)
        if cache is not None and slot is None:  # the static path's caller counts (an int here would recompile)
            cache.length += x.shape[1]
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# LLaVA


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        # cfg.vision is None for a plain language model (a base LLM before stage 1, or a text-only check)
        self.vision_tower = VisionTower(cfg.vision) if cfg.vision else None
        self.projector = (Projector(cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size)
                          if cfg.vision else None)
        # one learned vector in LLM space, appended after every row of an image's feature grid
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size)) if cfg.vision and cfg.has_newline else None
        self.language_model = Decoder(cfg.text)
        self.lm_head = (None if cfg.text.tie_word_embeddings
                        else nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False))

    def output_embeddings(self):
        return self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h):  # (..., D) -> (..., V)
        # the head as a module where there is one, so that an int8 or tensor-parallel head (quantize.py,
        # tensor_parallel.py) computes its own product
        return F.linear(h, self.language_model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def encode_images(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """All crops of all images (and video frames) through the tower in one batch, then each image through the
        projector, pooled if it is a video (or if the knobs say so), and merged on its own."""
        device = self.language_model.embed_tokens.weight.device
        pixels = torch.cat([im.pixels for im in images]).to(device)  # (N, 3, C, C)
        features = self.vision_tower(pixels)  # (N, n*n, D_vision)
        knobs, out = self.cfg.higher_anyres, []
        for f, im in zip(features.split([im.pixels.shape[0] for im in images]), images):
            pool = im.video or knobs.pool_images
            if pool and knobs.pool_position == "before":
                f = pool_features(f, knobs)
            f = self.projector(f)  # (crops, n*n, D)
            if pool and knobs.pool_position == "after":
                f = pool_features(f, knobs)  # (crops, m*m, D)
            out.append(merge_image_features(f, im, self.image_newline, self.cfg))
        return out

    def embed(self, input_ids, images: list[ProcessedImage] | None = None):
        """Token embeddings (B, T, D) with the image features written over the IMAGE_TOKEN positions."""
        is_image = input_ids == IMAGE_TOKEN
        rows = self.language_model.embed_tokens.weight.shape[0]
        # a borrowed tokenizer.json can know ids past the embedding (chat_template.past_vocab, which the commands
        # check first); checked here off the GPU only, where it costs no wait for the device
        if input_ids.device.type == "cpu" and input_ids.numel() and (top := int(input_ids.max())) >= rows:
            raise ValueError(f"token id {top} is past the model's {rows} embedding rows (vocab_size)")
        x = self.language_model.embed_tokens(input_ids.clamp(min=0))
        if images:
            features = torch.cat(self.encode_images(images)).to(x.dtype)  # (total image tokens, D)
            if features.shape[0] != int(is_image.sum()):
                raise ValueError(f"the prompt reserves {int(is_image.sum())} image positions but the images produce "
                                 f"{features.shape[0]} features: expand placeholders with anyres.num_image_tokens")
            x = x.masked_scatter(is_image[..., None], features)
        elif is_image.any():
            raise ValueError("the prompt holds image placeholders but no images were given")
        elif (self.vision_tower is not None and torch.is_grad_enabled()
              and any(p.requires_grad for p in self.projector.parameters())):
            # a text-only batch in training still runs one blank crop through tower and projector, weighted 0, as
            # the original does: every rank's autograd graph then holds the same parameters, as DDP/FSDP expect
            C = self.cfg.vision.image_size
            blank = torch.zeros(1, 3, C, C, device=x.device, dtype=x.dtype)
            unused = self.projector(self.vision_tower(blank)).sum()
            if self.image_newline is not None:
                unused = unused + self.image_newline.sum()
            x = x + 0 * unused.to(x.dtype)
        return x

    def forward(self, input_ids, images=None, *, position_ids=None, padding_mask=None, cache=None, num_logits=None,
                logits_at=None):
        """input_ids (B, T) with IMAGE_TOKEN runs -> logits (B, T, V), or (B, num_logits, V) for the last ones only,
        or (N, V) at the N positions a boolean (B, T) `logits_at` marks.

        padding_mask (B, S) marks real tokens (1) over the cache positions plus these T; it is needed only for
        left-padded batches (batched generation). Training's batches are right-padded and pass none: a real token
        attends only to earlier positions, all real, so the causal rule alone is exact there and SDPA can take
        its flash kernels, which accept no mask; the pad positions' outputs are garbage that no loss reads.
        position_ids default to past + arange(T). Training asks for logits only where a label is learned: image
        and prompt positions never reach the (V, D) head, whose logits would otherwise be the largest tensor of the
        step (8 samples of 1,850 tokens at Qwen's 152k vocabulary: 8.4 GiB in fp32).
        """
        B, T = input_ids.shape
        x = self.embed(input_ids, images)
        if position_ids is None:
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        h = self.language_model(x, position_ids, padding_mask, cache)
        if num_logits is not None:
            h = h[:, -num_logits:]
        if logits_at is not None:
            h = h[logits_at]  # (N, D)
        return self.logits(h)


# ----------------------------------------------------------------------------------------------------------------
# Fresh weights: for a model trained from scratch (the toy) and for the parts stage 1 adds to pretrained ones


def init_fresh(model: nn.Module, device="cpu", dtype=torch.float32, std: float = 0.02):
    """Give every parameter still on the meta device real memory and an initial value: normal(0, std) matrices
    and embeddings, zero biases, unit norms, and `image_newline` ~ randn / sqrt(D) as in the original."""
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if not any(p.is_meta for p in params.values()):
            continue
        module.to_empty(device=device, recurse=False)  # this module's own parameters only; loaded ones stay
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(dtype)
            with torch.no_grad():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                elif name == "image_newline":
                    p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[0]))
                else:
                    p.normal_(0.0, std)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Inference: fused projections


def fuse_projections(model: Llava) -> Llava:
    """Each decoder layer's q/k/v products become one product, and gate/up another: the same weights side by side,
    so the same outputs (up to the kernels' summation order). Decoding one token is bandwidth- and call-bound; this
    cuts the matrix calls of a token from 7 to 4 a layer. For inference only: the fused layers replace the original
    ones, whose names the checkpoints, training and tensor parallelism use. Quantised layers (quantize.py) fuse
    through their own `concat`; layers that cannot be joined stay as they are."""
    for block in model.language_model.layers:
        attn, mlp = block.self_attn, block.mlp
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        if (qkv := concat_linears(parts)) is not None:
            attn.qkv_proj, attn.qkv_sizes = qkv, [p.out_features for p in parts]
            del attn.q_proj, attn.k_proj, attn.v_proj
        if (gate_up := concat_linears([mlp.gate_proj, mlp.up_proj])) is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
    return model


def concat_linears(layers: list) -> nn.Module | None:
    """One layer whose output is the `layers`' outputs (same input) concatenated; None where they cannot be joined
    (different kinds: int4 keeps a shape its kernel cannot pack in int8)."""
    first = layers[0]
    if len({type(layer) for layer in layers}) > 1:
        return None
    if not isinstance(first, nn.Linear):
        return type(first).concat(layers)
    fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=False)
    return fused
