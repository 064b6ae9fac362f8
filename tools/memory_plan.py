"""The memory plan: what one GPU holds while train.py runs a stage, before anything is launched.

    python train.py --plan --recipe llava-next-stage2 --model llava-hf/llava-v1.6-34b-hf --fsdp --bf16 \
        --gpus 8 --gpu-memory 80GB

The model is built on the meta device (shapes, no memory; only config.json is read) and prepared as train.py
prepares it (LoRA, which parameters learn), so the parameter, gradient and optimizer bytes are exact:

    parameters   FSDP2 keeps ceil(rows / GPUs) rows of every tensor on each GPU (fp32; a LoRA base in bf16 with
                 --bf16); DDP a whole replica
    gradients    fp32, learning parameters only, sharded like them (train.py reduce-scatters every micro-batch)
    optimizer    AdamW's exp_avg and exp_avg_sq, fp32, sharded like the parameters

and two estimates:

    in flight    FSDP2's gathered units (the root's embeddings and head, two blocks: the one computing and the one
                 prefetched) in the compute dtype, their unsharded gradients before the reduce-scatter; under
                 autocast (no FSDP2 mixed precision) its cached bf16 copy of every weight
    activations  per sample of max_len tokens and a largest image (every crop of the widest grid): what autograd
                 keeps for backward, counted tensor by tensor for model.py's blocks (bf16 with --bf16), or, with
                 --gradient-checkpointing, each block's input plus one block recomputed, in the decoder and in a
                 vision tower that trains (a frozen tower keeps nothing for backward, checkpointed or not)

The largest micro-batch that fits is (usable - fixed) // activations per sample, usable being the GPU's memory less
a reserve for the CUDA context, NCCL buffers and the allocator's fragmentation.
"""

import math
from dataclasses import dataclass

import torch

from export import parse_size

RESERVE_FRACTION, RESERVE_BYTES = 0.05, 1 << 30  # 5% + 1 GiB of every GPU is not planned for
GPUS_PER_NODE = 8


@dataclass
class Plan:
    gpus: int
    gpu_memory: int
    sharded: bool  # FSDP2 (else DDP replicas)
    param_count: int
    trainable_count: int
    params: int  # bytes per GPU
    grads: int
    optimizer: int
    in_flight: int
    activations: int  # per sample, as configured (gradient checkpointing or not)
    activations_checkpointed: int  # per sample with --gradient-checkpointing
    tokens: int  # per sample
    crops: int  # per sample

    @property
    def fixed(self) -> int:
        return self.params + self.grads + self.optimizer + self.in_flight

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1 - RESERVE_FRACTION)) - RESERVE_BYTES

    def largest_micro_batch(self, per_sample: int) -> int:
        return max(0, (self.usable - self.fixed) // per_sample)


# ----------------------------------------------------------------------------------------------------------------
# The model, on the meta device, as train.py prepares it


def planned_config(cfg):
    """The LlavaConfig train.py would build for these flags, from config files only."""
    from anyres import parse_grid_pinpoints
    from convert import KNOWN_TOWERS, config_of, read_config, stage1_config

    if cfg.model:
        out = config_of(cfg.model)
    elif cfg.llm:  # a stage-1 start: the LLM's config and the tower's, as convert.load_parts assembles them
        tower = (KNOWN_TOWERS[cfg.vision_tower], cfg.vision_tower) if cfg.vision_tower in KNOWN_TOWERS else \
            read_config(cfg.vision_tower, "tower")
        out = stage1_config(read_config(cfg.llm, "LLM"), tower, cfg.projector_type, cfg.image_aspect_ratio or "square")
    else:
        raise SystemExit("error: --plan needs --model (a LLaVA checkpoint) or --llm (a base LLM for stage 1)")
    if cfg.image_aspect_ratio:
        out.image_aspect_ratio = cfg.image_aspect_ratio
    if cfg.grid_pinpoints:
        out.grid_pinpoints = parse_grid_pinpoints(cfg.grid_pinpoints, out.vision.image_size)
    return out


def meta_model(cfg, prepare):
    """Llava on the meta device with train.py's LoRA and trainable flags: `prepare` is train.prepare_stage, handed in
    by train.py so that the two files do not import each other (GPUs assumed: a LoRA base is bf16 with --bf16)."""
    from model import Llava

    with torch.device("meta"):
        model = Llava(planned_config(cfg))
    prepare(model, cfg, bf16_base=cfg.bf16)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Bytes


def local_numel(p, gpus: int, sharded: bool) -> int:
    """Elements of `p` on one GPU: FSDP2 shards dim 0 into chunks of ceil(rows / GPUs), padded to equal size."""
    if not sharded or p.dim() == 0:
        return p.numel()
    rows = p.shape[0]
    return math.ceil(rows / gpus) * (p.numel() // rows if rows else 0)


def plan(cfg, gpus: int, gpu_memory: int, model) -> Plan:
    """The bytes one of `gpus` GPUs holds for `model` (a meta_model) under these flags."""
    sharded = cfg.fsdp
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    param_bytes = sum(local_numel(p, gpus, sharded) * p.element_size() for p in params)
    grad_bytes = sum(local_numel(p, gpus, sharded) * 4 for p in trainable)
    optimizer_bytes = sum(local_numel(p, gpus, sharded) * 8 for p in trainable)
    act = 2 if cfg.bf16 else 4
    tokens, crops = sample_shape(model.cfg, cfg.max_len)
    per_sample = activation_bytes(model, tokens, crops, act, checkpointed=False)
    per_sample_ckpt = activation_bytes(model, tokens, crops, act, checkpointed=True)
    return Plan(gpus=gpus, gpu_memory=gpu_memory, sharded=sharded, param_count=sum(p.numel() for p in params),
                trainable_count=sum(p.numel() for p in trainable), params=param_bytes, grads=grad_bytes,
                optimizer=optimizer_bytes, in_flight=in_flight_bytes(model, cfg, act, sharded),
                activations=per_sample_ckpt if cfg.gradient_checkpointing else per_sample,
                activations_checkpointed=per_sample_ckpt, tokens=tokens, crops=crops)


def in_flight_bytes(model, cfg, act: int, sharded: bool) -> int:
    blocks = [*model.language_model.layers, *(model.vision_tower.layers if model.vision_tower else [])]
    if not sharded:  # DDP: its gradient buckets copy every learning gradient; autocast caches bf16 weight copies
        buckets = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        return buckets + (sum(p.numel() * 2 for p in model.parameters() if p.dtype == torch.float32) if cfg.bf16 else 0)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    block_trainable = max(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)
    # gathered: the root (kept after forward) and two blocks; gradients: two blocks unsharded in fp32
    return (root + 2 * block) * act + 2 * block_trainable * 4


def sample_shape(mcfg, max_len: int) -> tuple[int, int]:
    """(tokens, crops) of the planned sample: max_len tokens, one image as large as the widest grid tiles it."""
    from anyres import num_image_tokens, tiles_with_anyres

    if mcfg.vision is None:
        return max_len, 0
    C = mcfg.vision.image_size
    if not tiles_with_anyres(mcfg, 1) or not mcfg.grid_pinpoints:
        return max_len, 1
    w, h = max(mcfg.grid_pinpoints, key=lambda p: p[0] * p[1])
    num_image_tokens((w, h), mcfg)  # the grid must be one the model can express
    return max_len, 1 + (w // C) * (h // C)


def activation_bytes(model, tokens: int, crops: int, act: int, checkpointed: bool) -> int:
    """Bytes autograd keeps for backward for one sample (see the module docstring)."""
    t = model.cfg.text
    s, h, kv, i = tokens, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
    f32 = 4
    # RMSNorm: its fp32 input (x.float()), the normalised value, the weighted output (the next matmul's input)
    norm = s * t.hidden_size * (f32 + 2 * act) if act != f32 else s * t.hidden_size * 3 * f32
    attn = s * act * (h + 2 * kv) + s * act * h + s * act * h + t.num_heads * s * f32  # q k v, out, o_proj input, lse
    mlp = 4 * s * i * act  # gate, silu(gate), up, their product
    layer = 2 * norm + attn + mlp
    vocab = t.vocab_size
    head = s * vocab * f32 * 2 + s * vocab * act  # fp32 log-softmax kept, its gradient, the logits (upper bound)
    if checkpointed:  # each block's input, and one block's working set while it is recomputed
        decoder = t.num_layers * s * t.hidden_size * act + layer
    else:
        decoder = t.num_layers * layer
    out = decoder + head + norm  # + the final norm
    if crops and model.vision_tower is not None:
        v = model.cfg.vision
        P = v.side ** 2 + (v.kind == "clip")
        if model.vision_tower.trains():  # a frozen tower's forward records no graph: it keeps nothing
            vit_layer = P * act * (9 * v.hidden_size + 4 * v.intermediate_size)  # 2 LN inputs, q k v out, inputs; MLP
            if checkpointed:  # VisionTower.forward, as the decoder: each block's input and one block recomputed
                out += crops * (v.num_layers * P * v.hidden_size * act + vit_layer)
            else:
                out += crops * v.num_layers * vit_layer
        if any(p.requires_grad for p in model.projector.parameters()):
            out += crops * P * act * (v.hidden_size + 2 * t.hidden_size)  # its input, GELU's input, linear_2's input
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def gb(n: int) -> str:
    return f"{n / 1e9:8.2f} GB"


def report(cfg, p: Plan) -> str:
    if p.sharded:
        mode = f"FSDP2 over {p.gpus} GPU{'s' if p.gpus > 1 else ''}"
        if p.gpus > GPUS_PER_NODE:
            mode += f", {math.ceil(p.gpus / GPUS_PER_NODE)} nodes of {GPUS_PER_NODE}"
    else:
        mode = (f"DDP over {p.gpus} GPUs" if p.gpus > 1 else "one GPU") + " (whole replicas)"
    precision = "bf16 compute, fp32 master weights" if cfg.bf16 else "fp32"
    lora = f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""
    ckpt = " (--gradient-checkpointing)" if cfg.gradient_checkpointing else ""
    lines = [f"memory plan: {cfg.model or cfg.llm}, stage {cfg.stage}{lora}, {mode}, {precision}",
             f"  {p.param_count / 1e9:.2f} B parameters, {p.trainable_count / 1e9:.3f} B learn; "
             f"a sample: {p.tokens} tokens, {p.crops} crops",
             f"  per GPU of {p.gpu_memory / 1e9:.0f} GB ({p.usable / 1e9:.1f} GB planned for):",
             f"    parameters        {gb(p.params)}",
             f"    gradients         {gb(p.grads)}",
             f"    optimizer state   {gb(p.optimizer)}   AdamW m and v, fp32",
             f"    in flight         {gb(p.in_flight)}   estimate: gathered units and their gradients",
             f"    activations       {gb(p.activations)}   estimate, per sample{ckpt}"]
    b = p.largest_micro_batch(p.activations)
    if b:
        verdict = "fits" if b >= cfg.micro_batch_size else "does not"
        lines.append(f"  largest micro-batch that fits: {b} (--micro-batch-size {cfg.micro_batch_size} {verdict})")
    else:
        lines.append("  does NOT fit, even at micro-batch 1")
    if not cfg.gradient_checkpointing:
        lines.append(f"  with --gradient-checkpointing: activations {gb(p.activations_checkpointed).strip()} "
                     f"per sample, largest micro-batch {p.largest_micro_batch(p.activations_checkpointed)}")
    if not b and not p.sharded:
        lines.append("  shard the model and optimizer across the GPUs with --fsdp")
    return "\n".join(lines)


def main(cfg, prepare):
    gpus = cfg.gpus or (torch.cuda.device_count() or 1)
    print(report(cfg, plan(cfg, gpus, parse_size(cfg.gpu_memory, "--gpu-memory"), meta_model(cfg, prepare))))
