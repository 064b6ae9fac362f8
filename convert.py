"""Released checkpoints in: the preset table, config.json -> LlavaConfig, key names -> ours, and loading.

Three layouts exist for the same weights, all read here:

    original (liuhaotian / lmms-lab)   flat LLM config + mm_* keys;  model.layers.*, model.mm_projector.{0,2}.*,
                                       model.image_newline, model.vision_tower.vision_tower.vision_model.*
    llava-hf (transformers 4.x)        nested text_config / vision_config;  language_model.model.*,
                                       multi_modal_projector.linear_{1,2}.*, image_newline, vision_tower.vision_model.*
    transformers >= 4.52 / 5           model.language_model.*, model.multi_modal_projector.*, model.vision_tower.*
                                       (with or without vision_model.), lm_head.*

`internal_key` maps every one of them onto our module names; `load_pretrained` builds the model on the meta
device and assigns tensors one at a time from memory-mapped shards, so a 7B model never exists twice in RAM.
"""

import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from anyres import NEXT_GRIDS, HigherAnyRes, parse_grid_pinpoints
from model import Llava, LlavaConfig, TextConfig, VisionConfig

# ----------------------------------------------------------------------------------------------------------------
# Presets: every released checkpoint of the family, by short name (the model cards of liuhaotian, lmms-lab and
# llava-hf). `repo` is what the short name downloads: the llava-hf conversion, except for Interleave, whose llava-hf
# conversion drops AnyRes and the newline vector and so is not the model that was trained. `hf` also serves the
# tokenizer.json of originals that ship only SentencePiece files (same vocabulary).


@dataclass(frozen=True)
class Preset:
    repo: str
    original: str | None
    hf: str | None
    template: str
    geometry: str  # a key of GEOMETRY: the image geometry, for token counts without a download (anyres_picture)


def find_preset(source: str) -> Preset | None:
    """The preset of a short name, or of either of its hub repo ids."""
    return PRESETS.get(source) or next((p for p in PRESETS.values() if source in (p.original, p.hf)), None)


def _preset(original, hf, template, geometry, use_original=False):
    return Preset(original if use_original or hf is None else hf, original, hf, template, geometry)


PRESETS = {
    "llava-v1.5-7b": _preset("liuhaotian/llava-v1.5-7b", "llava-hf/llava-1.5-7b-hf", "vicuna_v1", "v1.5"),
    "llava-v1.5-13b": _preset("liuhaotian/llava-v1.5-13b", "llava-hf/llava-1.5-13b-hf", "vicuna_v1", "v1.5"),
    "llava-v1.6-vicuna-7b": _preset("liuhaotian/llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf",
                                    "llava_v1", "next"),
    "llava-v1.6-vicuna-13b": _preset("liuhaotian/llava-v1.6-vicuna-13b", "llava-hf/llava-v1.6-vicuna-13b-hf",
                                     "llava_v1", "next"),
    "llava-v1.6-mistral-7b": _preset("liuhaotian/llava-v1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf",
                                     "mistral_instruct", "next"),
    "llava-v1.6-34b": _preset("liuhaotian/llava-v1.6-34b", "llava-hf/llava-v1.6-34b-hf", "chatml_direct", "next"),
    "llama3-llava-next-8b": _preset("lmms-lab/llama3-llava-next-8b", "llava-hf/llama3-llava-next-8b-hf",
                                    "llava_llama_3", "next"),
    "llava-next-72b": _preset("lmms-lab/llava-next-72b", "llava-hf/llava-next-72b-hf", "qwen_1_5", "next"),
    "llava-next-110b": _preset("lmms-lab/llava-next-110b", "llava-hf/llava-next-110b-hf", "qwen_1_5", "next"),
    **{
        f"llava-next-interleave-qwen-{size}": _preset(f"lmms-lab/llava-next-interleave-qwen-{size}",
                                                      f"llava-hf/llava-interleave-qwen-{size}-hf",
                                                      "qwen_1_5", "interleave", use_original=True)
        for size in ("0.5b", "7b", "7b-dpo")
    },
    **{
        f"llava-onevision-qwen2-{size}-{stage}": _preset(f"lmms-lab/llava-onevision-qwen2-{size}-{stage}",
                                                         f"llava-hf/llava-onevision-qwen2-{size}-{stage}-hf",
                                                         "qwen_1_5", "onevision")
        for size, stages in (("0.5b", ("si", "ov")), ("7b", ("si", "ov", "ov-chat")), ("72b", ("si", "ov", "ov-chat")))
        for stage in stages
    },
}
DEFAULT_MODEL = "llava-onevision-qwen2-0.5b-ov"  # the smallest release: runs on a laptop CPU

# The two vision towers the releases use, as their hub configs describe them, so that original-layout
# checkpoints, which only name their tower, load without fetching its config.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=24, num_attention_heads=16, image_size=336,
                                              patch_size=14, layer_norm_eps=1e-5),
    "google/siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                             num_hidden_layers=27, num_attention_heads=16, image_size=384,
                                             patch_size=14, layer_norm_eps=1e-6),
}

# The image side of every preset as a config.json (the model cards' and released configs' values): the tower, its
# feature layer and selection, the AnyRes grids and aspect-ratio mode. Enough for llava_config to count image
# tokens; the decoder's fields are left to HF_DEFAULTS, so it builds no real model.
_CLIP, _SIGLIP = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"], KNOWN_TOWERS["google/siglip-so400m-patch14-384"]
GEOMETRY = {
    "v1.5": dict(model_type="llava", vision_config=_CLIP, vision_feature_layer=-2,
                 vision_feature_select_strategy="default"),
    "next": dict(model_type="llava_next", vision_config=_CLIP, vision_feature_layer=-2,
                 vision_feature_select_strategy="default",
                 image_grid_pinpoints=NEXT_GRIDS),
    # the original layout (the Interleave presets download lmms-lab's repos): SigLIP minus its last layer, 384-px grids
    "interleave": dict(model_type="qwen2", mm_vision_tower="google/siglip-so400m-patch14-384",
                       mm_projector_type="mlp2x_gelu", image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                       image_grid_pinpoints=[[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]),
    "onevision": dict(model_type="llava_onevision", vision_config={**_SIGLIP, "num_hidden_layers": 26},
                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                      image_grid_pinpoints="(1x1),...,(6x6)", vision_aspect_ratio="anyres_max_9"),
}

# transformers writes only the fields that differ from its class defaults, so a llava-hf config.json needs these
# defaults to be complete (the values of the transformers config classes).
_LLM_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, rope_theta=10000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False)  # what the three decoder classes' defaults share
_VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224)
HF_DEFAULTS = {
    "llama": dict(_LLM_7B, vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048),
    "mistral": dict(_LLM_7B, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=131072),
    "qwen2": dict(_LLM_7B, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768),
    "clip_vision_model": dict(_VIT_B, patch_size=32, layer_norm_eps=1e-5),
    "siglip_vision_model": dict(_VIT_B, patch_size=16, layer_norm_eps=1e-6),
}
# the towers transformers' LLaVA config classes assume when config.json has no vision_config at all
HF_DEFAULT_TOWER = {
    "llava": KNOWN_TOWERS["openai/clip-vit-large-patch14-336"],
    "llava_next": KNOWN_TOWERS["openai/clip-vit-large-patch14-336"],
    "llava_onevision": {**KNOWN_TOWERS["google/siglip-so400m-patch14-384"], "num_hidden_layers": 26},
}
# ... and the grids they assume when it has no image_grid_pinpoints
HF_DEFAULT_PINPOINTS = {
    "llava_next": NEXT_GRIDS,
    "llava_onevision": "(1x1),...,(6x6)",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and what to do."""


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, an index), or CheckpointError naming the file and the line where it
    stops being JSON, before anything is built from it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the file "
                              f"or download it again") from None
    except (UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a JSON text file ({type(e).__name__}); "
                              f"download it again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, found a {type(raw).__name__}; "
                              f"download it again")
    return raw


# ----------------------------------------------------------------------------------------------------------------
# config.json -> LlavaConfig


def text_config(raw: dict, where: str) -> TextConfig:
    # the family shows in model_type ("qwen2", "llava_qwen") or, where lmms-lab edited that to "llava", in architectures
    names = (raw.get("model_type", "") + " ".join(raw.get("architectures") or [])).lower()
    family = "qwen2" if "qwen" in names else "mistral" if "mistral" in names else "llama"
    c = {**HF_DEFAULTS[family], **{k: v for k, v in raw.items() if v is not None}}
    positive_ints(c, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings", *(k for k in ("head_dim", "num_key_value_heads") if k in c)), where)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"{where}: rope scaling {rope} is not supported (no released LLaVA model uses it)")
    heads = c["num_attention_heads"]
    return TextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
        rms_norm_eps=c["rms_norm_eps"],
        qkv_bias=family == "qwen2" or bool(c.get("attention_bias", False)),
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        max_position_embeddings=c["max_position_embeddings"], family=family,
    )


def positive_ints(c: dict, keys, where: str):
    for key in keys:
        if type(c[key]) is not int or c[key] < 1:
            raise CheckpointError(f"{where}: {key} {c[key]!r}: expected a positive integer; compare it with the "
                                  f"released config.json")


def vision_config(raw: dict, select_feature: str, where: str) -> tuple[VisionConfig, int]:
    """The tower's config and its total layer count; the caller decides how many of them LLaVA runs."""
    raw = raw.get("vision_config", raw)  # a full CLIPConfig nests it
    model_type = raw.get("model_type", "clip_vision_model")
    kind = "siglip" if "siglip" in model_type else "clip" if "clip" in model_type else None
    if kind is None:
        raise CheckpointError(f"{where}: vision tower type {model_type!r} is not supported (CLIP or SigLIP)")
    c = {**HF_DEFAULTS[f"{kind}_vision_model"], **raw}
    positive_ints(c, ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_hidden_layers"), where)
    return VisionConfig(kind=kind, image_size=c["image_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
                        intermediate_size=c["intermediate_size"], num_heads=c["num_attention_heads"], num_layers=0,
                        layer_norm_eps=c["layer_norm_eps"], select_feature=select_feature), c["num_hidden_layers"]


def layers_for_feature(raw: dict, key: str, default: int, total: int, where: str) -> int:
    """hidden_states[k] (index 0 = the embeddings) is the output of layer k, or of layer total + 1 + k if k < 0."""
    feature_layer = raw.get(key, default)
    if type(feature_layer) is not int:
        raise CheckpointError(f"{where}: {key} {feature_layer!r}: only a single layer is supported")
    layers = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
    if not 0 <= layers <= total:  # else a tower of "-15 layers": an empty one, silently
        raise CheckpointError(f"{where}: {key} {feature_layer}: the vision tower has {total} layers, so expected "
                              f"{-total - 1} to {total}; compare it with the released config.json")
    return layers


def llava_config(raw: dict, where: str, compat: str = "original", tower_config=None) -> LlavaConfig:
    """Our config from a checkpoint's config.json, in either the llava-hf (nested) or the original (flat) shape.

    `tower_config` is the tower repo's config.json for original-layout checkpoints whose tower is not one of
    KNOWN_TOWERS; returns vision=None for a plain causal LM (a base LLM for training, or a text-only check)."""
    model_type = raw.get("model_type", "")
    if model_type in HF_DEFAULT_TOWER and "mm_vision_tower" not in raw:  # llava-hf layout (lmms-lab edited some
        # original configs to say "llava" too)
        if raw.get("projector_hidden_act", "gelu") != "gelu" or not raw.get("multimodal_projector_bias", True):
            raise CheckpointError(f"{where}: only the gelu projector with biases (mlp2x_gelu) is supported")
        strategy = raw.get("vision_feature_select_strategy", "full" if model_type == "llava_onevision" else "default")
        tower = ({"model_type": HF_DEFAULT_TOWER[model_type]["model_type"], **raw["vision_config"]}  # as transformers
                 if raw.get("vision_config") else HF_DEFAULT_TOWER[model_type])
        vision, total = vision_config(tower, "patch" if strategy == "default" else "full", where)
        default_layer = -1 if model_type == "llava_onevision" else -2
        vision.num_layers = layers_for_feature(raw, "vision_feature_layer", default_layer, total, where)
        default_text = "qwen2" if model_type == "llava_onevision" else "llama"  # transformers' for a config lacking it
        text_raw = {"model_type": default_text, **(raw.get("text_config") or {})}
        # the original LLaVA-1.5 pads to a square of the mean colour; transformers' own processor centre-crops
        aspect = {"llava": "pad", "llava_next": "anyres",
                  "llava_onevision": raw.get("vision_aspect_ratio", "anyres_max_9")}[model_type]
        pinpoints = (raw.get("image_grid_pinpoints")
                     or ([] if model_type == "llava" else HF_DEFAULT_PINPOINTS[model_type]))
        return LlavaConfig(vision=vision, text=text_config(text_raw, where), projector_type="mlp2x_gelu",
                           image_aspect_ratio=aspect, grid_pinpoints=parse_grid_pinpoints(pinpoints, vision.image_size),
                           merge_type="flat" if model_type == "llava" else "spatial_unpad", compat=compat,
                           higher_anyres=higher_anyres(raw, where))
    text = text_config(raw, where)
    tower_name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not tower_name:
        return LlavaConfig(vision=None, text=text, compat=compat)  # plain LLM
    tower = tower_config or KNOWN_TOWERS.get(tower_name)
    if tower is None:
        raise CheckpointError(f"{where}: unknown vision tower {tower_name!r} and no config.json for it was found")
    vision, total = vision_config(tower, "full", where)
    if vision.kind == "siglip":
        # the original SigLIP wrapper deletes the last layer and returns its new last hidden state, ignoring
        # mm_vision_select_layer
        vision.num_layers = total - 1
    else:
        vision.num_layers = layers_for_feature(raw, "mm_vision_select_layer", -2, total, where)
        vision.select_feature = "patch" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full"
    merge = raw.get("mm_patch_merge_type", "flat")
    if merge not in ("flat", "spatial_unpad"):
        raise CheckpointError(f"{where}: mm_patch_merge_type {merge!r} is not supported (flat or spatial_unpad)")
    pinpoints = raw.get("image_grid_pinpoints")
    return LlavaConfig(vision=vision, text=text, projector_type=raw.get("mm_projector_type", "linear"),
                       image_aspect_ratio=raw.get("image_aspect_ratio", "square"),
                       grid_pinpoints=parse_grid_pinpoints(pinpoints, vision.image_size),
                       merge_type=merge, compat=compat, higher_anyres=higher_anyres(raw, where))


def higher_anyres(raw: dict, where: str) -> HigherAnyRes:
    """The token-budget knobs: the original's video pooling keys (mm_spatial_pool_mode / _stride, stride 2 when
    absent), then any knobs a run of ours changed (saved as "higher_anyres")."""
    knobs = {}
    if "mm_spatial_pool_mode" in raw:
        if raw["mm_spatial_pool_mode"] not in ("bilinear", "average"):
            raise CheckpointError(f"{where}: mm_spatial_pool_mode {raw['mm_spatial_pool_mode']!r} is not supported "
                                  f"(bilinear or average)")
        knobs["pool"] = raw["mm_spatial_pool_mode"]
    if raw.get("mm_spatial_pool_stride"):
        knobs["pool_stride"] = int(raw["mm_spatial_pool_stride"])
    knobs |= raw.get("higher_anyres", {})
    try:
        return HigherAnyRes(**knobs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: higher_anyres: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Key names


_PREFIXES = [  # (pattern, replacement), first match wins
    (r"^model\.vision_tower\.vision_tower\.", "vision_tower."),  # original
    (r"^(model\.)?vision_tower\.", "vision_tower."),  # llava-hf and transformers >= 4.52
    (r"^(model\.)?multi_modal_projector\.", "projector."),
    (r"^(model\.)?image_newline$", "image_newline"),
    (r"^(language_model\.model|model\.language_model)\.", "language_model."),
    (r"^(language_model\.)?lm_head\.", "lm_head."),
    (r"^model\.", "language_model."),  # original LLM weights, and plain causal-LM checkpoints
]


def internal_key(key: str) -> str:
    """Any released layout's parameter name -> ours (model.py's module names)."""
    if m := re.match(r"^model\.mm_projector\.(\d+)\.(weight|bias)$", key):
        # nn.Sequential(Linear, GELU, Linear, ...): index 0 -> linear_1, 2 -> linear_2, ...
        return f"projector.linear_{int(m.group(1)) // 2 + 1}.{m.group(2)}"
    key = re.sub(r"^model\.mm_projector\.", "projector.linear.", key)  # "linear" projector
    for pattern, replacement in _PREFIXES:
        if re.match(pattern, key):
            key = re.sub(pattern, replacement, key)
            break
    if key.startswith("vision_tower."):
        # vision_model.embeddings.patch_embedding -> patch_embedding, vision_model.encoder.layers -> layers
        key = re.sub(r"^vision_tower\.(vision_model\.)?(embeddings\.|encoder\.)?", "vision_tower.", key)
    return key


def is_unused(key: str, cfg: LlavaConfig) -> bool:
    """Known-harmless extra keys: rotary caches, tower parts LLaVA never reads, and the layers after the one
    whose output is the image feature (CLIP's 24th)."""
    if key.endswith(".inv_freq") or key in ("vision_tower.position_ids",):
        return True
    if key.startswith(("vision_tower.post_layernorm.", "vision_tower.head.")):
        return True
    m = re.match(r"vision_tower\.layers\.(\d+)\.", key)
    if m and cfg.vision and int(m.group(1)) >= cfg.vision.num_layers:
        return True
    return key == "lm_head.weight" and cfg.text.tie_word_embeddings


# ----------------------------------------------------------------------------------------------------------------
# Files


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight shards of a folder: safetensors preferred, torch .bin otherwise (index files honoured)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{folder / index}: no \"weight_map\" object of key -> shard file; "
                                      f"download it again")
            if bad := next((f for f in weight_map.values() if Path(f).name != f), None):  # "../x", "/etc/x"
                raise CheckpointError(f"{folder / index}: shard {bad!r} is not a file name in {folder}; download again")
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            if missing := [f.name for f in files if not f.is_file()]:
                raise CheckpointError(f"{folder / index} names the shard {missing[0]}, which is not in {folder}"
                                      f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; download the "
                                      f"checkpoint again (`{hub_command('<repo>')}` resumes)")
            return files
        if (folder / single).exists():
            return [folder / single]
    return []


def read_tensors(path: Path):
    """(key, tensor) pairs of one shard, memory-mapped; .bin files only through torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(path), framework="pt")  # reads and checks the header against the file's length
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a complete safetensors file ({e}); the download was probably cut "
                                  f"short: download it again") from None
        with f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's own message advises turning weights_only off: never here
            named = re.search(r"GLOBAL (\S+)", str(e))  # the class or function refused: GLOBAL argparse.Namespace
            first = named.group(1) if named else first_line(str(e).partition("WeightsUnpickler error:")[2] or e)
            raise CheckpointError(f"{path}: holds Python objects other than tensors (first: {first}); "
                                  f"this program loads weights only: convert it to safetensors") from None
        except Exception as e:  # a truncated download, or not a torch file at all
            raise CheckpointError(f"{path}: not a plain tensor checkpoint ({first_line(e)}); re-download it") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of name -> tensor; download it")
        yield from state.items()


def first_line(e) -> str:
    """An exception's first non-empty line, without the ANSI escapes torch puts in its messages."""
    return next((line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()), "")


def tower_tensors(folder: Path):
    """The vision-model tensors of a tower repo (a CLIPVisionModel, or a full CLIPModel whose text half is skipped),
    named for our model."""
    for f in checkpoint_files(folder):
        yield from ((f"vision_tower.{k}", t) for k, t in read_tensors(f) if k.startswith("vision_model."))


def hub_command(repo: str, *files: str) -> str:
    """The shell command that fills the HF cache with `repo` (or some of its files), for the CLI the installed
    huggingface_hub ships: `hf` from 1.0 on (which dropped `huggingface-cli`), `huggingface-cli` before 0.34."""
    from importlib.metadata import version

    major = int(version("huggingface_hub").split(".")[0])
    cli = "hf" if major >= 1 or shutil.which("hf") else "huggingface-cli"
    return " ".join([cli, "download", repo, *files])


def resolve(source: str, revision: str | None = None, what: str = "model") -> Path:
    """A local folder, a preset short name, or a hub repo id -> a local folder (downloaded through the HF cache)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    repo = PRESETS[source].repo if source in PRESETS else source
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"{what} {source!r} is neither a folder, a short name (see README) nor a hub repo id")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
        if not checkpoint_files(folder):  # an older repo with torch .bin shards only
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns + ["pytorch_model*.bin"]))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        raise CheckpointError(
            f"could not get {what} {repo!r}{f' at revision {revision}' if revision else ''} "
            f"({'HF_HUB_OFFLINE is set' if offline else type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). "
            f"On a machine with internet run `{hub_command(repo)}` to fill the cache, "
            f"or pass a local folder holding its config.json and weights.") from e
    return folder


def read_config(source: str, what: str = "model") -> tuple[dict, str]:
    """(config.json, where it came from) of a folder, a preset short name or a hub repo id; only that one file is
    downloaded (the memory plan and the AnyRes picture need no weights)."""
    if Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / "config.json"
        if not path.exists():
            raise CheckpointError(f"{path.parent}: no config.json; is this a {what} folder?")
        return read_json(path), str(path)
    repo = PRESETS[source].repo if source in PRESETS else source
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo, "config.json"))
    except Exception as e:
        raise CheckpointError(f"could not get the config.json of {what} {repo!r} ({type(e).__name__}); "
                              f"pass a local folder holding it, "
                              f"or fill the cache with `{hub_command(repo, 'config.json')}`") from None
    return read_json(path), f"{repo}/config.json"


def config_of(source: str, compat: str = "original", image_only: bool = False) -> LlavaConfig:
    """A checkpoint's LlavaConfig from its config files alone, no weights. `image_only`: a preset's image side comes
    from the table (GEOMETRY), so token counts need no download; its decoder fields are then placeholders."""
    preset = None if Path(source).expanduser().is_dir() else find_preset(source)
    raw, where = (GEOMETRY[preset.geometry], f"{source} (preset)") if image_only and preset else read_config(source)
    tower = raw.get("mm_vision_tower")
    tower_raw = read_config(tower, "tower")[0] if tower and tower not in KNOWN_TOWERS else None
    return llava_config(raw, where, compat, tower_raw)


def stage1_config(text: tuple[dict, str], tower: tuple[dict, str], projector_type: str = "mlp2x_gelu",
                  image_aspect_ratio: str = "square", grid_pinpoints: str = "", merge_type: str = "") -> LlavaConfig:
    """The LlavaConfig of a stage-1 start: a base LLM's and a vision tower's (config.json, where) joined by a fresh
    projector. The tower's features are its hidden state -2 for CLIP; SigLIP drops its last layer (both releases'
    mm_vision_select_layer) and keeps every patch, having no CLS token."""
    vision, total = vision_config(tower[0], "patch", tower[1])
    vision.num_layers = total - 1
    if vision.kind == "siglip":
        vision.select_feature = "full"
    anyres = image_aspect_ratio.startswith("anyres")
    return LlavaConfig(vision=vision, text=text_config(*text), projector_type=projector_type,
                       image_aspect_ratio=image_aspect_ratio,
                       grid_pinpoints=parse_grid_pinpoints(grid_pinpoints, vision.image_size),
                       merge_type=merge_type or ("spatial_unpad" if anyres else "flat"))


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype, device):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if hasattr(module, "load_weight"):  # it keeps its own form of the tensor: int8 (quantize.py) or this rank's
        module.load_weight(attr, tensor, dtype, device)  # shard (tensor_parallel.py), sliced from the mapped file
    else:
        setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def load_weights(model: Llava, sources, dtype, device, where: str):
    """Assign every tensor of `sources` ((key, tensor) pairs) into the meta-device `model`, checking names and
    shapes. Returns the names still unassigned."""
    expected = dict(model.named_parameters())
    pending = {n for n, p in expected.items() if p.is_meta}
    for raw_key, tensor in sources:
        key = internal_key(raw_key)
        if key not in expected:
            if is_unused(key, model.cfg):
                continue
            raise CheckpointError(f"{where}: unexpected key {raw_key!r} (read as {key!r}): this checkpoint does not "
                                  f"match the architecture its config.json describes")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{where}: {raw_key!r} has shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(expected[key].shape)}")
        _assign(model, key, tensor, dtype, device)
        pending.discard(key)
    return pending


def load_pretrained(source: str, *, revision=None, dtype=torch.float32, device="cpu", compat="original", prepare=None):
    """Build a Llava from a folder, preset short name or hub repo id; returns (model, folder).

    prepare(model), if given, runs on the meta-device model before any weight is read: quantize.quantized_layers and
    tensor_parallel.shard_decoder swap or shard its layers there, so each weight is read into its final form."""
    folder = resolve(source, revision)
    config_path = folder / "config.json"
    if not config_path.exists():
        if (folder / "trainer_state.json").exists():  # a train.py checkpoint saved without --hf-checkpoints
            raise CheckpointError(f"{folder} holds only trainer state (for --resume); its run's final/ is the model, "
                                  f"or train with --hf-checkpoints to have every checkpoint in the llava-hf layout")
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    raw = read_json(config_path)
    tower_name = raw.get("mm_vision_tower")
    tower_folder = None
    if tower_name and tower_name not in KNOWN_TOWERS:
        tower_folder = resolve(tower_name, what="tower")
    tower_raw = read_json(tower_folder / "config.json") if tower_folder else None
    try:
        cfg = llava_config(raw, str(config_path), compat, tower_raw)
        with torch.device("meta"):
            model = Llava(cfg)  # values no parser checks reach here: an unknown mm_projector_type
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, SyntaxError) as e:  # a field missing or malformed
        raise CheckpointError(f"{config_path}: cannot be read as a LLaVA or LLM config ({type(e).__name__}: {e}); "
                              f"compare it with the released config.json") from None
    files = checkpoint_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors / pytorch_model.bin (or their index) found")
    if prepare is not None:
        prepare(model)
    pending = set()
    for f in files:
        pending = load_weights(model, read_tensors(f), dtype, device, str(f))
    if any(n.startswith("vision_tower.") for n in pending) and tower_name:
        # LLaVA-1.5 originals keep the frozen CLIP tower out of their shards: read it from the tower's own repo
        tower_folder = tower_folder or resolve(tower_name, what="tower")
        pending = load_weights(model, tower_tensors(tower_folder), dtype, device, str(tower_folder))
    if "lm_head.weight" in pending:  # some tied 0.5B checkpoints omit the head: it is the embedding matrix
        print(f"note: {folder} has no lm_head.weight; using the tied input embeddings", file=sys.stderr)
        model.lm_head = None
        pending.discard("lm_head.weight")
    if pending:
        raise CheckpointError(f"{folder}: missing weights {sorted(pending)[:8]}{' ...' if len(pending) > 8 else ''}")
    return model.eval(), folder


def load_parts(llm: str, tower: str, projector_type: str = "mlp2x_gelu", projector: str = "",
               image_aspect_ratio: str = "square", grid_pinpoints: str = "", merge_type: str = "", device="cpu"):
    """A LLaVA assembled for stage 1 from a base LLM and a vision tower (folders or hub ids), with a fresh
    projector (or a stage-1 one from `projector`: an mm_projector.bin or a checkpoint folder) and, for AnyRes, a
    fresh `image_newline`. Returns (model, the LLM's folder), as load_pretrained does."""
    from model import init_fresh

    llm_folder, tower_folder = resolve(llm, what="LLM"), resolve(tower, what="tower")
    cfg = stage1_config(read_config(str(llm_folder), "LLM"), read_config(str(tower_folder), "tower"), projector_type,
                        image_aspect_ratio, grid_pinpoints, merge_type)
    with torch.device("meta"):
        model = Llava(cfg)
    for f in checkpoint_files(llm_folder):
        llm_tensors = ((k, t) for k, t in read_tensors(f) if k.startswith(("model.", "lm_head.")))
        load_weights(model, llm_tensors, torch.float32, device, str(f))
    load_weights(model, tower_tensors(tower_folder), torch.float32, device, str(tower_folder))
    if projector:  # a stage-1 projector, whole: a typo'd path must not train a fresh one instead
        path = Path(projector)
        if not path.exists():
            raise CheckpointError(f"projector {projector}: no such file or folder; pass stage 1's mm_projector.bin")
        files = [path] if path.is_file() else checkpoint_files(path)
        projector_tensors = ((k, t) for f in files for k, t in read_tensors(f) if "projector" in internal_key(k))
        pending = load_weights(model, projector_tensors, torch.float32, device, projector)
        if unread := sorted(n for n in pending if n.startswith("projector.")):
            raise CheckpointError(f"projector {projector}: holds no {', '.join(unread)}; expected a whole "
                                  f"{projector_type} projector from stage 1 (mm_projector.bin or a checkpoint folder)")
    missing = [n for n, p in model.named_parameters()
               if p.is_meta and not n.startswith(("projector.", "image_newline"))]
    if missing:
        raise CheckpointError(f"{llm_folder} / {tower_folder}: missing weights {missing[:8]}")
    init_fresh(model, device)
    return model, llm_folder
