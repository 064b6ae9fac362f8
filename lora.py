"""LoRA (Hu et al., arXiv 2106.09685): the decoder's linear layers stay frozen and learn a low-rank update.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T      x (..., in)  A (r, in)  B (out, r)  y (..., out)

B starts at zero, so training starts exactly from the base model. LLaVA's finetune_lora.sh puts adapters on every
linear layer of the language model (not the vision tower, not the output head) and keeps training the projector
at its own learning rate; that is what `inject` and train.py's --lora-* flags do.

    inject(model, rank, alpha)   swap the decoder's nn.Linear layers for LoRALinear (weight and bias keep their names)
    merge(state)                 W + (alpha / r) B A for every adapter: a plain checkpoint that infer.py reads
    save_adapter(...)            the PEFT format (adapter_config.json + adapter_model.safetensors), keys named after
                                 the llava-hf modules, which transformers + peft load onto the base model
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias, frozen) plus lora_A (r, in) and lora_B (out, r), kept in fp32."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        if device.type != "meta":  # PEFT's default init: A kaiming-uniform(a=sqrt(5)), B zero
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def inject(model, rank: int, alpha: float, dropout: float = 0.0, targets=DECODER_LINEARS):
    """Replace every decoder linear whose name is in `targets` by a LoRALinear, in place; returns the count."""
    unknown = set(targets) - set(DECODER_LINEARS)
    if unknown:
        raise SystemExit(f"error: --lora-targets {','.join(sorted(unknown))}: "
                         f"expected some of {','.join(DECODER_LINEARS)}")
    count = 0
    for block in model.language_model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                    count += 1
    return count


def alpha(cfg) -> float:
    """A run's alpha (TrainConfig's --lora-alpha; 0: 2 x rank, finetune_lora.sh's 256 / 128)."""
    return cfg.lora_alpha or 2.0 * cfg.lora_rank


def targets(cfg) -> tuple:
    """A run's adapted linears (TrainConfig's --lora-targets; "": all seven, as LLaVA does)."""
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()) or DECODER_LINEARS


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge(state: dict, scaling: float) -> dict:
    """A full state dict (our names) with adapters -> the merged one without: W + scaling * B A, in W's dtype (a
    bf16 base stays bf16, as peft's merge_and_unload leaves it)."""
    out = {k: v for k, v in state.items() if not is_lora(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            base = key[: -len(".lora_A.weight")]
            W, A, B = out[base + ".weight"], state[key], state[base + ".lora_B.weight"]
            out[base + ".weight"] = (W.float() + scaling * (B.float() @ A.float())).to(W.dtype)
    return out


def peft_key(key: str) -> str:
    """Our name -> peft's name for it on transformers' LLaVA classes (their in-memory module paths, as peft writes)."""
    for ours, theirs in (("language_model.", "model.language_model."), ("projector.", "model.multi_modal_projector.")):
        if key.startswith(ours):
            return "base_model.model." + theirs + key[len(ours):]
    raise ValueError(f"{key}: not a decoder or projector tensor")


def base_model_name(source: str) -> str | None:
    """adapter_config.json's base_model_name_or_path for a run started from `source`: the name of a model in the
    llava-hf layout, which transformers builds and peft puts the adapter on.

    A preset short name or either of its repos -> the llava-hf repo; a folder or repo in the llava-hf layout -> itself
    (a local folder as an absolute path). An original-layout checkpoint that is not a preset -> None: transformers
    cannot build it, and its llava-hf form (`python export.py SOURCE OUT`) has no name until someone writes it."""
    from convert import CheckpointError, find_preset, read_json, resolve

    preset = find_preset(source)
    if preset is not None and preset.hf:
        return preset.hf
    try:
        folder = resolve(source)
        raw = read_json(folder / "config.json")
    except (CheckpointError, OSError):
        return None
    if raw.get("model_type") not in ("llava", "llava_next", "llava_onevision") or "mm_vision_tower" in raw:
        return None
    return str(Path(source).expanduser().resolve()) if Path(source).expanduser().is_dir() else source


def save_adapter(state: dict, folder, rank: int, alpha: float, dropout: float, targets, base_model: str = ""):
    """adapter_config.json + adapter_model.safetensors: the adapters and the projector (which LoRA training also
    updates: peft's modules_to_save, stored under the module's plain path; vLLM's LoRA loader refuses any
    modules_to_save, so vLLM serves the merged final/ instead). `base_model` is what the run started from (short
    name, repo id or folder); base_model_name says what is recorded for it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {peft_key(k): v.detach().to("cpu").contiguous() for k, v in state.items()
               if is_lora(k) or k.startswith("projector.")}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type=None, r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                  # a regex, matched against the whole module path: a plain name list would also catch the vision
                  # tower's q_proj / k_proj / v_proj
                  target_modules=rf".*language_model.*\.({'|'.join(targets)})",
                  modules_to_save=["multi_modal_projector"],
                  base_model_name_or_path=base_model_name(base_model) if base_model else None,
                  fan_in_fan_out=False, init_lora_weights=True,
                  use_rslora=False, use_dora=False, inference_mode=True, rank_pattern={}, alpha_pattern={},
                  layers_to_transform=None, layers_pattern=None, revision=None)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
