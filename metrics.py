"""What a training step logs: metrics.jsonl (one line a step, cut back to the resumed step) and the progress bar, with
tokens/s and model FLOPs utilisation (MFU): the FLOPs the model needs for a step over what the hardware could do
meanwhile, against the GPU's dense bf16 peak (or --peak-tflops).

    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "bad_samples", "mfu"?, "gpu_memory_gb"?}   per step, rank 0
"""

import json
import math
import time
from pathlib import Path

import torch

from data import IGNORE_INDEX
from distributed import device_sum


PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "H800": 989, "GH200": 989, "B200": 2250,
                    "A100": 312, "A800": 312, "L40S": 362, "L4": 121, "A10G": 70}  # dense, per GPU


def peak_flops(device, cfg) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def forward_flops(weights: int, layers: int, width: int, T: int) -> int:
    """One sequence of T tokens through a transformer: 2 FLOPs per weight per token, plus attention's scores and
    weighted values, 2 * 2 * T^2 * width per layer (full T^2, as SDPA computes it)."""
    return 2 * weights * T + 4 * layers * width * T * T


def step_flops(model, batches) -> int:
    """Model FLOPs of this rank's micro-batches, forward + backward. Per weight and token: 2 forward, 2 for the
    gradient of its input, 2 more for its own gradient when it learns, so 6 for a learning weight and 4 for a frozen
    one that gradients cross (LoRA's base, stage 1's decoder); a frozen tower, upstream of all that learns, runs its
    forward only. Attention (no weights) is backpropagated through: x 3. Padding is not counted."""
    text, dec = model.cfg.text, model.language_model
    dec_weights = sum(p.numel() * (3 if p.requires_grad else 2) for p in dec.layers.parameters())  # x 2 FLOPs
    head = model.output_embeddings()
    flops = 0
    for b in batches:
        for T in b["padding_mask"].sum(1).tolist():
            flops += 2 * dec_weights * T + 3 * 4 * text.num_layers * text.hidden_size * T * T
        # the output head runs only where a label is learned (Llava.forward's logits_at)
        flops += (3 if head.requires_grad else 2) * 2 * head.numel() * int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        if b["images"]:
            v, tower = model.cfg.vision, model.vision_tower
            tower_factor = 3 if any(p.requires_grad for p in tower.parameters()) else 1
            crops = sum(im.pixels.shape[0] for im in b["images"])
            P = tower.position_embedding.num_embeddings
            tower_params = sum(p.numel() for p in tower.parameters())
            flops += crops * tower_factor * forward_flops(tower_params, v.num_layers, v.hidden_size, P)
            flops += crops * 3 * 2 * sum(p.numel() for p in model.projector.parameters()) * P
    return flops


def step_of(line: str) -> float:
    """A metrics.jsonl line's step; infinity (a resume drops it) for one cut short by a kill, as tools/plot.py skips."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class StepLog:
    """metrics.jsonl (one line per step, cut back to the resumed step) and the progress bar, on rank 0."""

    def __init__(self, cfg, start: int, total: int, device, world: int, rank: int):
        self.device, self.world, self.rank, self.peak = device, world, rank, peak_flops(device, cfg)
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.bar = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = ([l for l in self.path.read_text().splitlines() if step_of(l) <= start]
                if self.path.exists() and start else [])
        self.path.write_text("".join(l + "\n" for l in keep))
        if not cfg.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"stage {cfg.stage}", dynamic_ncols=True)

    def step(self, step: int, model, batches, loss, grad_norm, lr: float, counters, t0: float):
        local = [sum(int(b["padding_mask"].sum()) for b in batches), step_flops(model, batches) if self.peak else 0]
        tokens, flops = device_sum(torch.tensor(local, dtype=torch.float64, device=self.device), self.device).tolist()
        loss, grad_norm = float(loss), float(grad_norm)  # the step's one wait for the device
        if self.device.type == "cuda":
            # the step's kernels have finished: dt is the step's time, not its launch
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        if self.rank != 0:
            return
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / dt, "bad_samples": sum(counters["bad"].values())}
        if self.peak:
            record["mfu"] = flops / dt / (self.peak * self.world)
        if self.device.type == "cuda":
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9  # peak so far, this rank
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}",
                                 **({"mfu": f"{record['mfu']:.1%}"} if self.peak else {}))
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
