"""Training: the LLaVA stages on plain PyTorch, one process or many (torchrun: DDP, or FSDP2 with --fsdp).

    LLaVA JSON records --data.SupervisedDataset--> (ids, labels, images)
                       --data.global_batches--> this rank's micro-batches
    micro-batch (B, T) --Llava--> logits --cross-entropy over answer tokens, / answer tokens in the global batch-->
    backward per micro-batch (gradients sync on the last) -> clip -> AdamW, one learning rate per module -> cosine

The stages (which parameters learn is `set_trainable`):
    1    alignment: only the projector learns, on image-caption pairs (LCS-558K with the `plain` template)
    1.5  the whole model, on high-quality detailed captions (OneVision's "mid" stage)
    2    the whole model, on instructions; --freeze-vision-tower keeps the tower fixed (LLaVA-1.5, Interleave)

    python train.py [--seed N]                       the toy life cycle on CPU (toy/lifecycle.py;
                                                     data from toy/world.py)
    python train.py --recipe llava-v1.5-stage1       a real stage (recipes.py; flags override its values)
    torchrun --nproc_per_node 8 train.py --recipe llava-next-stage2 --model runs/stage1/final
             --data mix.json --image-folder /data --fsdp --bf16

Checkpoints (checkpoint.py) hold the trainer state each rank writes in parallel (DCP); --resume continues from
the newest with any number of processes: bit-identically with the same process count and layout, within ~1e-4
with another (the gradients are summed in another order). output_dir/final is the llava-hf folder infer.py and the
next stage read; its config.json keeps the chat template the stage trained with, which the next stage then uses.
"""

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed
import lora
from anyres import add_knob_flags, knobs_from_flags, parse_grid_pinpoints
from chat_template import default_template, load_tokenizer
from checkpoint import (Preemption, check_output_dir, latest_checkpoint, publish_final, resume_from,
                        save_checkpoint)
from convert import CheckpointError, load_parts, load_pretrained
from data import IGNORE_INDEX, PLACEMENTS, TEMPLATES, SupervisedDataset, collate, global_batches, load_records
from distributed import device_sum
from metrics import StepLog
from recipes import RECIPES, fetch_recipe_data


def flag(default, help: str):
    """A TrainConfig field and the --help of its flag (arg_parser reads it, as anyres.add_knob_flags does)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    stage: str = flag("2", "1 | 1.5 | 2")
    data: str = flag("", "LLaVA JSON / JSONL, or a mixture spec (data.load_records)")
    image_folder: str = flag("", "image paths in the records are relative to this")
    model: str = flag("", "continue from a LLaVA checkpoint: folder, hub id or short name")
    llm: str = flag("", "instead of --model, start stage 1 from a base LLM (folder or hub id) and --vision-tower")
    vision_tower: str = flag("openai/clip-vit-large-patch14-336", "the vision tower joined to --llm (folder or hub id)")
    projector_type: str = flag("mlp2x_gelu", "the projector of a fresh stage 1 (the only one the llava-hf layout "
                                             "holds)")
    pretrained_projector: str = flag("", "a stage-1 projector (mm_projector.bin or a checkpoint folder) for --llm "
                                         "starts")
    image_aspect_ratio: str = flag("", "override the model's: pad | square | anyres | anyres_max_N")
    grid_pinpoints: str = flag("", "override the model's, e.g. '(1x1),...,(6x6)'")
    knobs: dict = field(default_factory=dict, metadata={"help": "Higher-AnyRes knobs (--max-grid, --pool, ...: "
                                                                "anyres.HigherAnyRes)"})
    video_folder: str = flag("", "video paths in the records are relative to this (default: --image-folder)")
    frames: int = flag(32, "frames sampled uniformly from each video (OneVision's frames_upbound)")
    image_placement: str = flag("interleaved", "several images: where the text puts them | front | mixed "
                                               "(data.place_images)")
    template: str = flag("", "chat format of the samples (default: the model's own: its config.json's, else its "
                             "preset's or tokenizer's)")
    output_dir: str = flag("runs/train", "checkpoints/, final/ and metrics.jsonl; on several nodes a shared filesystem")
    epochs: int = flag(1, "passes over --data")
    max_steps: int = flag(0, "0: run the epochs")
    global_batch_size: int = flag(128, "samples per optimizer step, over all ranks")
    micro_batch_size: int = flag(4, "per rank; accumulation = global / (micro * ranks)")
    lr: float = flag(2e-5, "LLM (and projector / tower unless set)")
    projector_lr: float = flag(0.0, "0: same as --lr")
    vision_lr: float = flag(0.0, "0: same as --lr")
    weight_decay: float = flag(0.0, "AdamW decay of matrices (never biases, norms or vectors)")
    warmup_ratio: float = flag(0.03, "linear warm-up over this share of the steps, then cosine to zero")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this")
    max_len: int = flag(2048, "tokens per sample, image tokens included; longer ones are cut (skipped if the cut "
                              "falls in an image)")
    freeze_vision_tower: bool = flag(False, "stages 1.5/2: keep the vision tower fixed")
    bf16: bool = flag(False, "bf16 compute: FSDP2 mixed precision with --fsdp on GPUs, else autocast (fp32 weights "
                             "and AdamW)")
    gradient_checkpointing: bool = flag(False, "recompute each decoder block (and vision block, if it trains) in "
                                               "backward")
    compile: bool = flag(False, "torch.compile each decoder block")
    fsdp: bool = flag(False, "FSDP2 (fully_shard per decoder / vision block, then the root) instead of DDP")
    save_every: int = flag(500, "steps between checkpoints (output_dir/checkpoints/step-N)")
    keep_last: int = flag(2, "checkpoints kept; older ones are deleted (0: keep every one)")
    hf_checkpoints: bool = flag(False, "also write each checkpoint in the llava-hf layout (infer.py reads it); final/"
                                       " always is")
    max_shard_size: str = flag("5GB", "largest safetensors file of a llava-hf folder, e.g. 5GB, 200KB (more: "
                                      "model-0000k-of-0000n)")
    resume: bool = flag(False, "continue from the newest checkpoint in output_dir, with any number of processes")
    overwrite: bool = flag(False, "start over in an output_dir that holds another run's checkpoints or final/: "
                                  "deletes them")
    stop_after: int = flag(0, "end this run after N steps (a time slot, or a test of --resume)")
    seed: int = flag(0, "of the data order and any fresh weights")
    group_by_modality_length: bool = flag(True, "image and text-only samples in separate global batches, sorted by "
                                                "length")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of the samples seen so far cannot be used")
    num_workers: int = flag(-1, "data-loading processes per rank (-1: 4 on GPUs, 0 on CPU)")
    quiet: bool = flag(False, "no progress bar")
    peak_tflops: float = flag(0.0, "for MFU: the accelerator's dense bf16 peak per device (0: looked up for known "
                                   "GPUs)")
    device: str = flag("", "cpu or cuda; empty: cuda when there is one (each rank takes cuda:LOCAL_RANK)")
    lora_rank: int = flag(0, "> 0: train LoRA adapters of this rank (lora.py) and the projector; everything else "
                             "frozen")
    lora_alpha: float = flag(0.0, "the update is scaled by alpha / rank (0: 2 x rank, finetune_lora.sh's 256 / 128)")
    lora_dropout: float = flag(0.05, "on the adapters' input (LLaVA's default)")
    lora_targets: str = flag("", "comma-separated decoder linears, e.g. q_proj,v_proj "
                                 "(empty: all seven, as LLaVA does)")
    plan: bool = flag(False, "print the memory plan per GPU for these flags (tools/memory_plan.py) and exit; nothing "
                             "is loaded")
    gpus: int = flag(0, "--plan: GPUs in all, across nodes (0: this machine's)")
    gpu_memory: str = flag("80GB", "--plan: memory of one GPU")

    def __post_init__(self):
        """Refuse, before anything is loaded, the values that would fail only later (after step 1, at a video)."""
        checks = [
            (self.stage in ("1", "1.5", "2"), f"--stage {self.stage}: expected one of 1, 1.5, 2"),
            (self.global_batch_size >= 1, f"--global-batch-size {self.global_batch_size}: expected an integer >= 1"),
            (self.micro_batch_size >= 1, f"--micro-batch-size {self.micro_batch_size}: expected an integer >= 1"),
            (self.save_every >= 1, f"--save-every {self.save_every}: expected an integer >= 1 (steps apart)"),
            (self.keep_last >= 0, f"--keep-last {self.keep_last}: expected an integer >= 0 (0 keeps every checkpoint)"),
            (0 <= self.max_bad_fraction <= 1, f"--max-bad-fraction {self.max_bad_fraction}: expected 0 <= f <= 1"),
            (self.frames >= 1, f"--frames {self.frames}: expected an integer >= 1 (frames sampled from each video)"),
            (self.image_placement in PLACEMENTS,
             f"--image-placement {self.image_placement}: expected one of {', '.join(PLACEMENTS)}"),
            (self.lora_rank >= 0, f"--lora-rank {self.lora_rank}: expected an integer >= 1 (0: no LoRA)"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout {self.lora_dropout}: expected 0 <= p < 1")]
        for ok, message in checks:
            if not ok:
                raise SystemExit(f"error: {message}; see python train.py --help")


# ----------------------------------------------------------------------------------------------------------------
# What learns, and how fast


def prepare_stage(model, cfg: TrainConfig, bf16_base: bool):
    """LoRA adapters where asked, then which parameters learn (tools/memory_plan.py prepares its meta model with
    this too)."""
    if cfg.lora_rank:
        add_lora(model, cfg, bf16_base)
    set_trainable(model, cfg)


def add_lora(model, cfg: TrainConfig, bf16_base: bool):
    """Adapters on the decoder's linears; on GPUs with --bf16 the frozen base is stored in bf16 (2 bytes a weight)."""
    lora.inject(model, cfg.lora_rank, lora.alpha(cfg), cfg.lora_dropout, lora.targets(cfg))
    if bf16_base:
        for name, p in model.named_parameters():
            if not (lora.is_lora(name) or name.startswith("projector.")):
                p.data = p.data.to(torch.bfloat16)


def set_trainable(model, cfg: TrainConfig):
    """Stage 1: the projector only. Stages 1.5 and 2: everything, the vision tower unless frozen. LoRA: the
    adapters and the projector."""
    for name, p in model.named_parameters():
        if cfg.lora_rank:
            p.requires_grad_(lora.is_lora(name) or name.startswith("projector."))
        elif cfg.stage == "1":
            p.requires_grad_(name.startswith("projector."))
        elif name.startswith("vision_tower."):
            p.requires_grad_(not cfg.freeze_vision_tower)
        else:
            p.requires_grad_(True)


def param_groups(model, cfg: TrainConfig):
    """One AdamW group per module kind with its own learning rate; no weight decay on biases, norms and vectors."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "projector" if "projector." in name else "vision" if "vision_tower." in name else "llm"
        lr = {"projector": cfg.projector_lr, "vision": cfg.vision_lr}.get(kind) or cfg.lr
        decay = cfg.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((kind, decay), {"params": [], "lr": lr, "base_lr": lr, "weight_decay": decay, "name": kind})
        groups[(kind, decay)]["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over the first warmup_ratio of the steps, then cosine to zero (HF Trainer's schedule)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# The model and the data, on this rank


def build_model(cfg: TrainConfig, device):
    """(model, tokenizer, the model's own chat template) to train: a LLaVA checkpoint to continue, or a base LLM +
    tower + fresh projector."""
    if cfg.model:
        model, folder = load_pretrained(cfg.model, device=device)
        tokenizer = load_tokenizer(folder, cfg.model)
        own = default_template(cfg.model, tokenizer, folder)
    elif cfg.llm:
        model, folder = load_parts(cfg.llm, cfg.vision_tower, cfg.projector_type, cfg.pretrained_projector,
                                   cfg.image_aspect_ratio or "square", cfg.grid_pinpoints, device=device)
        tokenizer = load_tokenizer(folder, cfg.llm)
        own = default_template(cfg.llm, tokenizer, folder)
    else:
        raise SystemExit("error: give --model (a LLaVA checkpoint to continue) or --llm (a base LLM for stage 1)")
    if cfg.image_aspect_ratio:
        model.cfg.image_aspect_ratio = cfg.image_aspect_ratio
    if cfg.grid_pinpoints:
        model.cfg.grid_pinpoints = parse_grid_pinpoints(cfg.grid_pinpoints, model.cfg.vision.image_size)
    if cfg.knobs:  # saved with the checkpoints, so inference reads the budget the model was trained with
        model.cfg.higher_anyres = dataclasses.replace(model.cfg.higher_anyres, **cfg.knobs)
    return model, tokenizer, own


def parallelize(model, cfg: TrainConfig, device, world: int):
    """DDP, or FSDP2 sharding each decoder and vision block and then the rest; optionally compile each block.
    FSDP2 applies under torchrun even to one process: its mixed precision is how a single GPU trains in bf16 too."""
    if cfg.compile:  # fast path: compile the repeated blocks, keep the data-dependent splicing eager
        for block in [*model.language_model.layers, *(model.vision_tower.layers if model.vision_tower else [])]:
            block.compile()
    if cfg.fsdp and dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 on GPUs: each unit is all-gathered and computed in bf16, gradients are reduce-scattered in fp32 and the
        # fp32 shards are AdamW's master weights (16 bytes per parameter / GPUs, torchtitan's default policy)
        mp = (MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mixed_precision(cfg, device)
              else MixedPrecisionPolicy())
        for block in [*model.language_model.layers, *(model.vision_tower.layers if model.vision_tower else [])]:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mixed_precision(cfg: TrainConfig, device) -> bool:
    """--bf16 --fsdp on GPUs: FSDP2's bf16 policy instead of fp32 weights under autocast."""
    return cfg.bf16 and cfg.fsdp and device.type == "cuda" and dist.is_initialized()


def on_gpu(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "" and torch.cuda.is_available())


def build_dataset(cfg: TrainConfig, model, tokenizer):
    """(dataset, per-sample modality lengths, steps per epoch, total steps) of --data."""
    records = load_records(cfg.data)
    dataset = SupervisedDataset(records, cfg.image_folder, tokenizer, cfg.template, model.cfg, cfg.max_len,
                                video_folder=cfg.video_folder, num_frames=cfg.frames,
                                image_placement=cfg.image_placement)
    steps_per_epoch = len(records) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {cfg.data} has {len(records)} samples, "
                         f"fewer than one global batch ({cfg.global_batch_size})")
    return dataset, dataset.modality_lengths(), steps_per_epoch, cfg.max_steps or steps_per_epoch * cfg.epochs


def micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: micro-step a on rank r takes slot a * world + r."""
    slots = [batch[i: i + micro] for i in range(0, len(batch), micro)]
    return [slots[a * world + rank] for a in range(len(slots) // world)]


def batch_loader(dataset, lengths, cfg: TrainConfig, start: int, total: int, steps_per_epoch: int, rank: int,
                 world: int, pad_id: int):
    """This rank's collated micro-batches from step `start` to `total`, in order. The order is a pure function of
    (seed, epoch) and each sample of its index, so --num-workers N (processes that read, tile and tokenise ahead
    of the GPU) gives the same batches as 0, and a resumed run picks up exactly where the killed one was."""
    from torch.utils.data import DataLoader

    plan, schedules = [], {}
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in schedules:
            schedules = {epoch: global_batches(lengths, cfg.global_batch_size, cfg.seed, epoch,
                                               cfg.group_by_modality_length)}
        plan += micro_batches(schedules[epoch][index], rank, world, cfg.micro_batch_size)
    workers = cfg.num_workers
    if workers < 0:  # GPUs: read, tile and tokenise off the main process, which then only launches kernels
        workers = min(4, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if on_gpu(cfg) else 0
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after the tokenizer ran
    # its own generator: a DataLoader iterator otherwise draws its workers' base seed from the global RNG, which a
    # resumed run has just restored and dropout (LoRA's) then draws from, so the resumed run would drift
    return iter(DataLoader(dataset, batch_sampler=plan, collate_fn=functools.partial(collate, pad_id=pad_id),
                           num_workers=workers, prefetch_factor=4 if workers else None, pin_memory=on_gpu(cfg),
                           generator=torch.Generator().manual_seed(cfg.seed)))


def count_bad_samples(batches, counters, cfg: TrainConfig, device, rank: int):
    """Count (and report by id) the samples that could not be used; stop when they are too many.

    Checked after every global batch, from the first on: the run stops once the bad samples seen are more than a
    data set with exactly --max-bad-fraction bad ones would show by chance (its mean plus three standard
    deviations, binomially), so a mostly broken data set stops at its first batch, while one unlucky batch of a
    healthy set does not end a long run; with many samples this is the plain fraction."""
    for b in batches:
        counters["samples"] += b["size"] + len(b["bad"])
        counters["truncated"] += len(b["notes"])
        for sample_id, kind, detail in b["bad"]:
            counters["bad"][kind] = counters["bad"].get(kind, 0) + 1
            if len(counters["bad_ids"]) < 1000:
                counters["bad_ids"].append(sample_id)
            if rank == 0 and not cfg.quiet:
                print(f"skipping sample {sample_id!r}: {detail}", file=sys.stderr)
    seen = device_sum(counters["samples"], device, torch.float64).item()
    bad = device_sum(sum(counters["bad"].values()), device, torch.float64).item()
    f = cfg.max_bad_fraction
    if bad > f * seen + 3 * math.sqrt(seen * f * (1 - f)):
        recent = "; ".join([f"{sample_id!r}: {kind}" for b in batches for sample_id, kind, _ in b["bad"]][:10])
        raise SystemExit(f"error: {int(bad)} of {int(seen)} samples could not be used ({counters['bad']}), more than "
                         f"--max-bad-fraction {f} allows; fix the data or raise the flag. First ids: "
                         f"{counters['bad_ids'][:10]}; in the last batch: {recent}")


# ----------------------------------------------------------------------------------------------------------------
# The loop: one optimizer step, then the stage


def optimizer_step(parallel_model, model, optimizer, batches, cfg: TrainConfig, factor: float, device, world: int):
    """Forward and backward over this rank's micro-batches, then clip and one AdamW step at lr x `factor`.
    Returns (mean loss per answer token over the global batch, gradient norm), both still on the device: nothing
    here waits for the GPU, so the next micro-batch is queued while this one runs (StepLog reads them once a step)."""
    # each answer token weighs the same whatever micro-batch or rank it lands in: divide by the global count (counted
    # on the host from the CPU labels, summed over ranks on the device; fp32 holds these integers exactly)
    targets = device_sum(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches), device).clamp(min=1)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 and not mixed_precision(cfg, device)
                else nullcontext())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for a, b in enumerate(batches):
        context = nullcontext()
        if world > 1 and not cfg.fsdp and a < len(batches) - 1:
            context = parallel_model.no_sync()  # DDP: all-reduce once, on the last micro-batch
        # FSDP2 reduce-scatters every micro-batch: skipping it would hold the whole model's gradients unsharded in
        # fp32 until the last one, which is what sharding is there to avoid (DeepSpeed's ZeRO-3 does the same)
        labels = b["labels"].to(device, non_blocking=True)
        learned = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))  # (B, T): position t predicts token t + 1
        with context, autocast:
            # no padding_mask: batches are right-padded, so the causal rule alone is exact for every real token and
            # SDPA takes its flash / memory-efficient kernels; pad positions never reach the loss (logits_at)
            logits = parallel_model(b["input_ids"].to(device, non_blocking=True), b["images"] or None,
                                    logits_at=learned)  # (N, V)
            loss = F.cross_entropy(logits.float(), labels[:, 1:][learned[:, :-1]], reduction="sum")
        (loss * world / targets).backward()  # DDP and FSDP average over ranks; this undoes it
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return device_sum(loss_sum, device) / targets, grad_norm


def train(cfg: TrainConfig, model=None, tokenizer=None):
    """Run one stage; returns the trained (unwrapped) model. Writes checkpoints and metrics.jsonl to output_dir."""
    rank, world, device = distributed.setup(cfg.device)
    run = check_output_dir(cfg, rank)  # the id that marks this run's checkpoints
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer, own = build_model(cfg, device)
    else:
        own = default_template(cfg.model, tokenizer)
    # the samples' format: --template, else the model's own; the checkpoints keep the model's chat format, which
    # is the trained one except after stage 1's "plain" captions
    cfg = dataclasses.replace(cfg, template=cfg.template or own)
    chat_template = own if cfg.template == "plain" else cfg.template
    model.to(device).train()
    model.language_model.gradient_checkpointing = cfg.gradient_checkpointing
    if model.vision_tower is not None:  # checkpointed only while it trains (VisionTower.forward)
        model.vision_tower.gradient_checkpointing = cfg.gradient_checkpointing
    prepare_stage(model, cfg, bf16_base=cfg.bf16 and device.type == "cuda")
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * world)
    if accumulation * cfg.micro_batch_size * world != cfg.global_batch_size:
        raise SystemExit(f"error: global batch {cfg.global_batch_size} is not a multiple of micro batch "
                         f"{cfg.micro_batch_size} x {world} ranks")
    dataset, lengths, steps_per_epoch, total = build_dataset(cfg, model, tokenizer)

    parallel_model = parallelize(model, cfg, device, world)  # DDP's wrapper, FSDP2's sharded model, or `model` alone
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999), eps=1e-8)
    start, counters = 0, {"samples": 0, "bad": {}, "bad_ids": [], "truncated": 0}
    if cfg.resume and (ckpt := latest_checkpoint(cfg)):
        start, counters = resume_from(ckpt, parallel_model, optimizer, cfg, rank, steps_per_epoch)
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}", file=sys.stderr)

    pad_id = (tokenizer.token_to_id("<|endoftext|>") or tokenizer.token_to_id("<pad>")
              or tokenizer.token_to_id("<unk>") or 0)
    loader = batch_loader(dataset, lengths, cfg, start, total, steps_per_epoch, rank, world, pad_id)
    log = StepLog(cfg, start, total, device, world, rank)
    done, stop = start, False
    with Preemption() as preemption:
        for step in range(start, total):
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(accumulation)]
            count_bad_samples(batches, counters, cfg, device, rank)
            factor = lr_factor(step, total, cfg.warmup_ratio)
            loss, grad_norm = optimizer_step(parallel_model, model, optimizer, batches, cfg, factor, device, world)
            log.step(step, model, batches, loss, grad_norm, cfg.lr * factor, counters, t0)
            done, stop = step + 1, preemption.asked(device)
            if done % cfg.save_every == 0 or done == total or stop:
                save_checkpoint(cfg, parallel_model, optimizer, done, steps_per_epoch, counters, tokenizer,
                                chat_template, rank, run)
            if stop or (cfg.stop_after and done - start >= cfg.stop_after):
                break
    log.close()
    if stop:  # every rank is here: the process group ends as after a finished run
        distributed.finish()
        raise SystemExit(f"stopped by SIGTERM after step {done} of {total}, its checkpoint saved in "
                         f"{cfg.output_dir}; continue with the same command and --resume")
    if done == total:  # also when a run killed after its last checkpoint is resumed
        publish_final(cfg, parallel_model, tokenizer, chat_template, rank)
    if rank == 0 and counters["bad"]:
        print(f"skipped {sum(counters['bad'].values())} unusable samples: {counters['bad']}; "
              f"first ids: {counters['bad_ids'][:10]}", file=sys.stderr)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Command line


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a published recipe; other flags override its values")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is dict:
            continue
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f.metadata["help"].replace("%", "%%"))
        else:
            p.add_argument(flag, type=f.type, default=None, help=f.metadata["help"].replace("%", "%%"),
                           choices=sorted(TEMPLATES) if f.name == "template" else None)
    add_knob_flags(p)
    return p


def parse_args(argv) -> TrainConfig:
    args = arg_parser().parse_args(argv)
    values = {}
    if args.recipe:
        recipe = dict(RECIPES[args.recipe])
        data = fetch_recipe_data(recipe, args.image_folder or "") if not args.data and not args.plan else {}
        values.update({k: v for k, v in recipe.items() if not k.startswith("data_")}, **data)
    knobs = knobs_from_flags(args)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "recipe" and k not in knobs})
    values["knobs"] = {**values.get("knobs", {}), **knobs}
    return TrainConfig(**values)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--plot" in argv:  # curves of finished or running runs: no training flags, nothing of the training loop
        from tools import plot

        return plot.main([a for a in argv if a != "--plot"])
    if not argv or (argv[0] == "--seed" and len(argv) == 2):  # the embedded default: the toy life cycle
        from toy.lifecycle import ToyRun, life_cycle

        if argv and not argv[1].isdigit():
            raise SystemExit(f"error: --seed {argv[1]!r}: expected a whole number, e.g. python train.py --seed 1")
        seed = int(argv[1]) if argv else 0
        out = "runs/toy" if seed == 0 else f"runs/toy-seed{seed}"
        return life_cycle(sys.modules[__name__], ToyRun(out=out, seed=seed))
    cfg = parse_args(argv)
    try:
        if cfg.plan:
            from tools.memory_plan import main as print_plan

            return print_plan(cfg, prepare=prepare_stage)
        train(cfg)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    except torch.OutOfMemoryError:
        raise SystemExit(f"error: out of GPU memory at --micro-batch-size {cfg.micro_batch_size}: lower it (the global "
                         f"batch stays {cfg.global_batch_size}, through more accumulation steps), add "
                         f"--gradient-checkpointing, or shard across GPUs with --fsdp") from None
    distributed.finish()


if __name__ == "__main__":
    main()
