"""train.py's training step on a random LLaVA-NeXT of a released shape, on synthetic stage-2 batches.

    python bench/bench_train_step.py --preset cpu               CPU: the step with the dense (B, 1, T, T) padding
                                                                mask (the previous training path) against without it
    python bench/bench_train_step.py --preset 7b --device cuda  GPU: CLIP-L/336 + a Vicuna-7B-shaped decoder, bf16
                                                                through FSDP2 mixed precision, 5 crops per image; MFU
                                                                and peak memory against the --plan figures
                                                                (bench_gpu.sh runs it)

A sample is one 672x672 image (5 crops: the base and a 2x2 grid, 2,928 image tokens) and a conversation around it;
lengths vary within a micro-batch, so rows are right-padded as data.collate pads them. Weights are random: the
speed and memory of a step do not depend on their values.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metrics  # noqa: E402
from tools import memory_plan  # noqa: E402
import train  # noqa: E402
from anyres import ProcessedImage, num_image_tokens  # noqa: E402
from data import IGNORE_INDEX  # noqa: E402
from model import IMAGE_TOKEN, Llava, LlavaConfig, TextConfig, VisionConfig, init_fresh  # noqa: E402

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_heads=16, num_layers=23)  # 24 layers, the 23rd's features
PRESETS = {
    # llava-v1.6-vicuna-7b's shapes
    "7b": dict(vision=CLIP_L, text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                        num_heads=32, num_kv_heads=32, head_dim=128), text_tokens=(300, 900)),
    # the README's 0.9B: CLIP-L/336 + a Qwen2-0.5B-shaped decoder
    "0.9b": dict(vision=CLIP_L, text=dict(vocab_size=151646, hidden_size=896, intermediate_size=4864, num_layers=24,
                                          num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True,
                                          tie_word_embeddings=True),
                 text_tokens=(300, 900)),
    # small enough for a 2-core CPU, the same token layout
    "cpu": dict(vision=dict(hidden_size=64, intermediate_size=256, num_heads=4, num_layers=2),
                text=dict(vocab_size=4000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                          num_kv_heads=8, head_dim=32), text_tokens=(100, 500)),
}


def build(preset: str, layers: int, device) -> Llava:
    p = PRESETS[preset]
    text = TextConfig(**{**p["text"], **({"num_layers": layers} if layers else {})}, max_position_embeddings=8192)
    cfg = LlavaConfig(vision=VisionConfig(**p["vision"]), text=text, grid_pinpoints=NEXT_PINPOINTS)
    with torch.device("meta"):
        model = Llava(cfg)
    return model if device == "meta" else init_fresh(model, device=device)


def batches(model, preset: str, micro: int, count: int, seed: int = 0):
    """`count` micro-batches of `micro` samples: [text, image, text, answer], answers ~ a quarter of the text."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = PRESETS[preset]["text_tokens"]
    V, C = model.cfg.text.vocab_size, model.cfg.vision.image_size
    n_img = num_image_tokens((672, 672), model.cfg)
    out = []
    for _ in range(count):
        rows = []
        for _ in range(micro):
            n_text = int(torch.randint(lo, hi, (1,), generator=g))
            prompt = torch.randint(3, V, (20,), generator=g)
            rest = torch.randint(3, V, (n_text - 20,), generator=g)
            ids = torch.cat([prompt, torch.full((n_img,), IMAGE_TOKEN), rest])
            labels = ids.clone()
            labels[: len(ids) - (n_text - 20) // 4] = IGNORE_INDEX  # the last quarter of the text is the answer
            rows.append((ids, labels))
        T = max(len(i) for i, _ in rows)
        batch = {"input_ids": torch.zeros(micro, T, dtype=torch.long), "labels": torch.full((micro, T), IGNORE_INDEX),
                 "padding_mask": torch.zeros(micro, T, dtype=torch.long), "bad": [], "notes": [], "size": micro}
        for r, (ids, labels) in enumerate(rows):
            n = len(ids)
            batch["input_ids"][r, :n], batch["labels"][r, :n], batch["padding_mask"][r, :n] = ids, labels, 1
        batch["images"] = [ProcessedImage(torch.randn(5, 3, C, C, generator=g), (672, 672), (2, 2), n_img)
                           for _ in range(micro)]
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------------------------------
# CPU: the training step with and without the dense mask, same model, same batches, measured alternately


def masked_or_causal_step(model, optimizer, batch, masked: bool):
    labels = batch["labels"]
    learned = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))
    extra = {"padding_mask": batch["padding_mask"]} if masked else {}
    logits = model(batch["input_ids"], batch["images"], logits_at=learned, **extra)
    loss = F.cross_entropy(logits.float(), labels[:, 1:][learned[:, :-1]])
    loss.backward()
    optimizer.zero_grad(set_to_none=True)  # no update: both paths see the same weights
    return loss.item()


def cpu(args):
    torch.manual_seed(0)
    model = build("cpu", 0, "cpu").train()
    train.set_trainable(model, train.TrainConfig(stage="2"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = batches(model, "cpu", args.micro_batch_size, 1)
    T = data[0]["input_ids"].shape[1]
    print(f"cpu preset: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, micro-batch "
          f"{args.micro_batch_size} x {T} tokens (lengths {data[0]['padding_mask'].sum(1).tolist()}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times, losses = {True: [], False: []}, {}
    for it in range(args.steps + 1):
        for masked in (True, False):
            t0 = time.perf_counter()
            losses[masked] = masked_or_causal_step(model, optimizer, data[0], masked)
            if it:  # the first round warms up
                times[masked].append(time.perf_counter() - t0)
    a, b = statistics.median(times[True]), statistics.median(times[False])
    print(f"forward+backward, dense (B,1,T,T) mask: median {a:.3f} s   causal, no mask: median {b:.3f} s   "
          f"ratio {a / b:.2f}x  ({args.steps} rounds, alternating)")
    print(f"loss with mask {losses[True]:.8f}, without {losses[False]:.8f}, "
          f"|diff| {abs(losses[True] - losses[False]):.2e}")


# ----------------------------------------------------------------------------------------------------------------
# GPU: one process under FSDP2 (bf16 compute, fp32 master weights and AdamW), MFU and peak memory vs --plan


def gpu(args):
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = train.TrainConfig(stage="2", fsdp=True, bf16=True, device="cuda", micro_batch_size=args.micro_batch_size,
                            gradient_checkpointing=args.gradient_checkpointing, lr=1e-5, vision_lr=2e-6,
                            lora_rank=args.lora_rank, lora_dropout=0.05 if args.lora_rank else 0.0)
    torch.manual_seed(0)
    model = build(args.preset, args.layers, device).train()
    model.language_model.gradient_checkpointing = cfg.gradient_checkpointing
    train.prepare_stage(model, cfg, bf16_base=True)  # as train.py does: LoRA adapters in fp32, the frozen base in bf16
    data = batches(model, args.preset, args.micro_batch_size, args.steps * args.accumulation)
    cfg.max_len = max(b["input_ids"].shape[1] for b in data)
    meta = build(args.preset, args.layers, "meta")
    train.prepare_stage(meta, cfg, bf16_base=True)
    plan = memory_plan.plan(cfg, 1, torch.cuda.get_device_properties(device).total_memory, model=meta)
    name = torch.cuda.get_device_name(device)
    print(f"{args.preset}{' LoRA' if cfg.lora_rank else ''} on {name}: {plan.param_count / 1e9:.2f} B parameters, "
          f"micro-batch {args.micro_batch_size} x {cfg.max_len} tokens max, {args.accumulation} micro-batches a step, "
          f"gradient checkpointing {cfg.gradient_checkpointing}, torch {torch.__version__}")
    report_sdpa(model, cfg.max_len)
    ddp_model = train.parallelize(model, cfg, device, 1)
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg), betas=(0.9, 0.999), eps=1e-8)
    peak = metrics.peak_flops(device, cfg)
    rates = []
    for step in range(args.steps):
        group = data[step * args.accumulation: (step + 1) * args.accumulation]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = train.optimizer_step(ddp_model, model, optimizer, group, cfg, 1.0, device, 1)
        loss = float(loss)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        flops = metrics.step_flops(model, group)
        tokens = sum(int(b["padding_mask"].sum()) for b in group)
        print(f"  step {step + 1}: {dt:.2f} s, loss {loss:.3f}, {tokens / dt:.0f} tokens/s"
              + (f", MFU {flops / dt / peak:.1%}" if peak else ""))
        if step >= 2:
            rates.append(flops / dt)
    measured = torch.cuda.max_memory_allocated(device)
    planned = plan.fixed + args.micro_batch_size * plan.activations
    mfu = (f"MFU {statistics.median(rates) / peak:.1%} (median of steps 3+, peak {peak / 1e12:.0f} TFLOP/s)"
           if peak and rates else "MFU: unknown GPU peak")
    print(f"{args.preset}{' LoRA' if cfg.lora_rank else ''}: {mfu}; peak memory {measured / 1e9:.1f} GB measured, "
          f"{planned / 1e9:.1f} GB planned (params {plan.params / 1e9:.1f} + grads {plan.grads / 1e9:.1f} "
          f"+ AdamW {plan.optimizer / 1e9:.1f} + in flight {plan.in_flight / 1e9:.1f} "
          f"+ {args.micro_batch_size} x activations {plan.activations / 1e9:.2f}), "
          f"plan / measured {planned / measured:.2f}")
    dist.destroy_process_group()


def report_sdpa(model, T: int):
    """Which SDPA kernels accept the decoder's training call (bf16, causal, no mask)."""
    from torch.nn.attention import SDPAParams

    t = model.cfg.text
    q = torch.empty(1, t.num_heads, T, t.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(1, t.num_kv_heads, T, t.head_dim, device="cuda", dtype=torch.bfloat16)
    params = SDPAParams(q, k, k, None, 0.0, True, t.num_heads != t.num_kv_heads)
    ok = {n: getattr(torch.backends.cuda, f"can_use_{n}_attention")(params, False)
          for n in ("flash", "efficient", "cudnn") if hasattr(torch.backends.cuda, f"can_use_{n}_attention")}
    print(f"  SDPA kernels that take the decoder's training call: {ok}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step (GPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's), to fit a smaller GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0, help="GPU: LoRA adapters of this rank instead of full training")
    args = p.parse_args()
    if args.device == "cpu" and args.preset != "cpu":
        raise SystemExit(f"error: --preset {args.preset} is for --device cuda; on CPU use --preset cpu")
    (cpu if args.device == "cpu" else gpu)(args)


if __name__ == "__main__":
    main()
