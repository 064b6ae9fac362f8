"""The llava-hf folder that other tools read: transformers' AutoProcessor and AutoModelForImageTextToText, vLLM and
lmms-eval: the weights, streamed into shards (save_pretrained), and everything around them. (SGLang's LLaVA models read
the original layout: its LlavaLlama/Qwen/Mistral classes load mm_vision_tower and model.mm_projector.*.)

    tokenizer (tokenizers)   --with_media_tokens-->  a copy with <image> (and OneVision's <video>) as special tokens
    model (V, D) embeddings  --add_media_rows----->  (V', D), V' a multiple of 64 that holds those ids (convert.py)
    Template (data.py)       --jinja_template----->  the same strings as a Jinja chat template (apply_chat_template)
    state dict (ours)        --save_pretrained---->  model.safetensors or model-0000k-of-0000n.safetensors + index,
                                                     one tensor gathered at a time, then the files below
    LlavaConfig              --write_hf_metadata-->  config.json (image_token_index, ...), processor_config.json,
                                                     preprocessor_config.json (video_preprocessor_config.json),
                                                     tokenizer.json, tokenizer_config.json,
                                                     chat_template.jinja / .json, generation_config.json

Our model never looks `<image>` up (prompts hold IMAGE_TOKEN runs), but transformers and vLLM expand one `<image>`
token id into the image's feature count and embed it first, so the id must be a real row of the vocabulary.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from anyres import anyres_max_crops, tower_mean_std
from chat_template import (CHAT_TEMPLATE_FILES, TEMPLATE_KEY, default_template, eos_token_ids, load_tokenizer,
                           shipped_template)
from convert import CheckpointError, checkpoint_files, load_pretrained, read_tensors, resolve
from data import TEMPLATES, stop_token_ids, system_slot, with_special_tokens
from model import Llava, LlavaConfig

PROCESSORS = {"llava": ("LlavaProcessor", "LlavaImageProcessor"),
              "llava_next": ("LlavaNextProcessor", "LlavaNextImageProcessor"),
              "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor")}


def hf_model_type(cfg: LlavaConfig) -> str:
    return hf_config(cfg)["model_type"]  # llava, llava_next or llava_onevision


def media_tokens(cfg: LlavaConfig) -> list[str]:
    """The placeholder strings the model type's processor expands: OneVision has a separate one for video."""
    if cfg.vision is None:
        return []
    return ["<image>", "<video>"] if hf_model_type(cfg) == "llava_onevision" else ["<image>"]


# ----------------------------------------------------------------------------------------------------------------
# Names and config out: the llava-hf layout (transformers 4.x names), so that infer.py, the next stage and other
# tools read a trained model like any release.


def hf_key(key: str) -> str:
    """Our parameter name -> its llava-hf name (the inverse of internal_key for the layout written here)."""
    if key.startswith("language_model."):
        return "language_model.model." + key[len("language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("projector."):
        return "multi_modal_projector." + key[len("projector."):]
    if key.startswith("vision_tower."):
        rest = key[len("vision_tower."):]
        if rest.startswith(("class_embedding", "patch_embedding.", "position_embedding.")):
            return "vision_tower.vision_model.embeddings." + rest
        if rest.startswith("layers."):
            return "vision_tower.vision_model.encoder." + rest
        return "vision_tower.vision_model." + rest
    return key  # image_newline


def hf_config(cfg: LlavaConfig) -> dict:
    """config.json in the llava-hf shape (every field written, none left to class defaults), with the keys the
    released llava-hf folders carry (ignore_index, use_image_newline_parameter, CLIP's projection_dim)."""
    t = cfg.text
    family = t.family or ("qwen2" if t.qkv_bias else "llama")
    # vLLM builds the decoder from text_config.architectures (llava.py, llava_next.py, llava_onevision.py:
    # init_vllm_registered_model(hf_config=config.text_config); registry.py: "No model architectures are specified")
    text = dict(model_type=family, architectures=[TEXT_ARCHITECTURES[family]], vocab_size=t.vocab_size,
                hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
                max_position_embeddings=t.max_position_embeddings, attention_bias=t.qkv_bias)
    if family == "mistral":
        text["sliding_window"] = None  # MistralConfig's default is 4096; LLaVA-1.6 Mistral attends to all tokens
    if cfg.vision is None:
        return text
    v = cfg.vision
    if cfg.projector_type != "mlp2x_gelu" or (cfg.merge_type == "flat") == cfg.image_aspect_ratio.startswith("anyres"):
        raise ValueError(f"the llava-hf layout cannot express projector {cfg.projector_type!r} with "
                         f"{cfg.image_aspect_ratio!r} / {cfg.merge_type!r}")
    model_type = "llava" if cfg.merge_type == "flat" else "llava_onevision" if anyres_max_crops(cfg) else "llava_next"
    # num_hidden_layers counts only the layers LLaVA reads (their weights are all we write), so the feature layer
    # is the last one: the released folders say 24 and -2 for CLIP, the same features
    vision = dict(model_type=f"{v.kind}_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                  patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps)
    if v.kind == "clip":
        vision["projection_dim"] = 768  # the released towers' (CLIP's head, which LLaVA never runs)
    out = dict(model_type=model_type, architectures=[ARCHITECTURES[model_type]], text_config=text, vision_config=vision,
               vision_feature_layer=-1,
               vision_feature_select_strategy="default" if v.select_feature == "patch" else "full",
               projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=t.tie_word_embeddings,
               ignore_index=-100)  # the label mask value, in every released llava-hf config.json
    if model_type != "llava":
        out["image_grid_pinpoints"] = cfg.grid_pinpoints
    if model_type == "llava_next":
        out["use_image_newline_parameter"] = True
    if model_type == "llava_onevision":
        out["vision_aspect_ratio"] = cfg.image_aspect_ratio
    if knobs := cfg.higher_anyres.changed():
        out["higher_anyres"] = knobs  # ours: transformers ignores it and loads the released behaviour
    return out


TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


# ----------------------------------------------------------------------------------------------------------------
# The <image> token: in the tokenizer and in the vocabulary


def with_media_tokens(tokenizer, cfg: LlavaConfig):
    """(the tokenizer with every media token as an unsplittable special token, {token: id}):
    data.with_special_tokens."""
    return with_special_tokens(tokenizer, media_tokens(cfg))


def padded_vocab_size(n_ids: int) -> int:
    """Rows for n_ids token ids, rounded up to a multiple of 64 as the released checkpoints and conversions pad."""
    return math.ceil(n_ids / 64) * 64


@torch.no_grad()
def add_media_rows(model: Llava, tokenizer) -> bool:
    """Grow the embeddings (and an untied head) so that every id of `tokenizer` is a row: to a multiple of 64, the
    new rows the mean of the old ones (the centre of the Gaussian the llava-hf conversions sample them from).
    The model's outputs on existing ids are unchanged. Returns whether anything grew."""
    old = model.cfg.text.vocab_size
    need = max(tokenizer.get_vocab_size(with_added_tokens=True), old)
    if need <= old:
        return False
    new = padded_vocab_size(need)
    embed = model.language_model.embed_tokens
    rows = embed.weight.mean(0, keepdim=True).expand(new - old, -1)
    embed.weight = torch.nn.Parameter(torch.cat([embed.weight, rows]), requires_grad=embed.weight.requires_grad)
    embed.num_embeddings = new
    if model.lm_head is not None:
        head = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(torch.cat([head, head.mean(0, keepdim=True).expand(new - old, -1)]),
                                                  requires_grad=head.requires_grad)
        model.lm_head.out_features = new
    model.cfg.text.vocab_size = new
    return True


def unused_tower_tensors(cfg: LlavaConfig) -> dict[str, torch.Tensor]:
    """The tower's final LayerNorm, which transformers' vision model always builds but LLaVA never reads (the
    features are an inner layer's output): written as the identity so that loading reports no missing weights."""
    if cfg.vision is None:
        return {}
    d = cfg.vision.hidden_size
    return {"vision_tower.post_layernorm.weight": torch.ones(d), "vision_tower.post_layernorm.bias": torch.zeros(d)}


# ----------------------------------------------------------------------------------------------------------------
# The chat template as Jinja


def _q(s: str) -> str:
    return json.dumps(s)  # a Jinja string literal (same escapes as JSON)


def jinja_template(template: str, bos: str | None = None) -> str:
    """Our template table's strings as a Jinja chat template for transformers' / vLLM's apply_chat_template.

    Messages are {"role": "system" | "user" | "assistant", "content": str or [{"type": "image" | "video" | "text"}]};
    images and videos go in front of the text, one `<image>\\n` (`<video>\\n`) each, the format the released models
    were trained with. A system message replaces the template's default sentence (or, for a template without one,
    goes in front of the first user message). `bos` is written first if given; the export gives none, as the released
    llava-hf templates spell none (the tokenizer adds it)."""
    t = TEMPLATES[template]
    user_head, user_tail = t.user.split("{}")
    head, tail = t.assistant.split("{}")
    slot = system_slot(template)
    opening = t.system if slot is None else ""
    default = t.system[len(slot[0]):len(t.system) - len(slot[1])] if slot else ""
    lines = [
        "{#- template: " + template + " -#}",
        "{%- set ns = namespace(system=" + _q(default) + ", pending='') -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}",
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}",
        "{%- endif -%}",
        "{{- " + _q(bos or "") + " + " + _q(opening) + " -}}",
    ]
    if slot is not None:
        lines.append("{{- " + _q(slot[0]) + " + ns.system + " + _q(slot[1]) + " -}}")
    else:  # no system sentence: a system message opens the first user message
        lines.append("{%- if messages and messages[0]['role'] == 'system' -%}"
                     "{%- set ns.pending = ns.system + '\\n\\n' -%}{%- endif -%}")
    media = "'<image>'" if template == "plain" else "'<image>\\n'"  # plain: the image alone, the user's words dropped
    lines += [
        "{%- for message in messages if message['role'] != 'system' -%}",
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}",
        "{%- else -%}{%- set text = namespace(v='', m='') -%}",
        "{%- for part in message['content'] -%}",
        "{%- if part['type'] == 'image' -%}{%- set text.m = text.m + " + media + " -%}",
        "{%- elif part['type'] == 'video' -%}{%- set text.m = text.m + " + media.replace("image", "video") + " -%}",
        "{%- elif part['type'] == 'text' -%}{%- set text.v = text.v + part['text'] -%}{%- endif -%}",
        "{%- endfor -%}",
        "{%- set text = text.m + text.v -%}",
        "{%- endif -%}",
    ]
    if template == "plain":
        lines.append("{%- if message['role'] == 'user' -%}"
                     "{%- set text = '<image>' * (text.count('<image>') + text.count('<video>')) -%}{%- endif -%}")
    if t.strip:
        lines.append("{%- set text = text | trim -%}")
    lines += [
        "{%- if message['role'] == 'user' -%}",
        "{{- " + _q(user_head) + " + ns.pending + text + " + _q(user_tail) + " -}}{%- set ns.pending = '' -%}",
        "{%- else -%}{{- " + _q(head) + " + text + " + _q(tail) + " -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _q(t.generation) + " -}}{%- endif -%}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The metadata files


def special_tokens(tokenizer, template: str) -> dict:
    """bos/eos/pad/unk strings for tokenizer_config.json: the BOS the tokenizer adds by itself, the template's
    end-of-turn token, and a pad token in the order LLaVA's training code picks one."""
    plain, full = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    out = {}
    if len(full) > len(plain) and full[-len(plain):] == plain:
        out["bos_token"] = tokenizer.id_to_token(full[0])
    out["eos_token"] = next((s for s in TEMPLATES[template].stop if tokenizer.token_to_id(s) is not None), None)
    if tokenizer.token_to_id("<unk>") is not None:
        out["unk_token"] = "<unk>"
    out["pad_token"] = next((s for s in ("<pad>", "<unk>", "<|endoftext|>") if tokenizer.token_to_id(s) is not None),
                            out["eos_token"])
    return {k: v for k, v in out.items() if v is not None}


def image_processor_config(cfg: LlavaConfig) -> dict:
    """The image processor transformers uses for this model type, with every size written out as the released
    llava-hf folders write them (the class defaults are 224 px: a crop_size left out makes 224-px AnyRes tiles).

    LlavaNext/LlavaOnevisionImageProcessor squash the base image to C x C and cut C-px tiles (crop_size) whatever
    the tower, as the original AnyRes does; LLaVA-1.5 with CLIP resizes the short side and centre-crops (the
    released CLIPImageProcessor settings), and "pad" is LlavaImageProcessor's do_pad: a square of the mean colour,
    as trained. SigLIP without AnyRes squashes to C x C."""
    v, model_type = cfg.vision, hf_model_type(cfg)
    mean, std = tower_mean_std(v.kind)
    C = v.image_size
    out = dict(image_processor_type=PROCESSORS[model_type][1], processor_class=PROCESSORS[model_type][0],
               do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(mean), image_std=list(std))
    square = {"height": C, "width": C}
    if model_type == "llava_next":  # LlavaNextImageProcessor: the base image is resized to (shortest_edge,) * 2
        out |= dict(size={"shortest_edge": C}, crop_size=square, do_center_crop=True, do_pad=True,
                    image_grid_pinpoints=cfg.grid_pinpoints, aspect_ratio_setting="anyres")
    elif model_type == "llava_onevision":
        out |= dict(size=square, crop_size=square, do_center_crop=True, do_pad=True,
                    image_grid_pinpoints=cfg.grid_pinpoints)
    elif v.kind == "clip":
        out |= dict(size={"shortest_edge": C}, crop_size=square, do_center_crop=True,
                    do_pad=cfg.image_aspect_ratio == "pad")
    else:
        out |= dict(size=square, do_center_crop=False, do_pad=cfg.image_aspect_ratio == "pad")
    return out


def processor_config(cfg: LlavaConfig) -> dict:
    """processor_config.json as the released llava-hf folders hold it: the processor's own arguments, flat. (Not
    transformers 5's layout with the image processor nested: transformers 4's ProcessorMixin.from_args_and_dict
    passes that dict where the image processor object goes and raises, and vLLM builds on transformers 4 exist.)"""
    v, model_type = cfg.vision, hf_model_type(cfg)
    strategy = "default" if v.select_feature == "patch" else "full"
    out = dict(processor_class=PROCESSORS[model_type][0], image_token="<image>",
               vision_feature_select_strategy=strategy)
    if model_type == "llava_onevision":
        out |= dict(video_token="<video>", num_image_tokens=v.side * v.side, vision_aspect_ratio=cfg.image_aspect_ratio)
    else:  # the count the processor expands <image> to is (C/p)^2 + CLS - (1 if the CLS is dropped)
        out |= dict(patch_size=v.patch_size, num_additional_image_tokens=int(v.kind == "clip"))
    return out


def video_processor_config(cfg: LlavaConfig) -> dict:
    """video_preprocessor_config.json (OneVision): frames squashed to C x C, normalised as the images are."""
    image, C = image_processor_config(cfg), cfg.vision.image_size
    return dict(video_processor_type="LlavaOnevisionVideoProcessor", processor_class=image["processor_class"],
                do_convert_rgb=True, do_resize=True, size={"height": C, "width": C}, resample=3, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, image_mean=image["image_mean"], image_std=image["image_std"])


def hf_full_config(cfg: LlavaConfig, ids: dict, specials: dict, tokenizer, dtype) -> dict:
    """config.json: the architecture (hf_config) plus the token ids transformers and vLLM need."""
    out = hf_config(cfg)
    text = out.get("text_config", out)
    for name in ("bos", "eos", "pad"):
        if f"{name}_token" in specials:
            text[f"{name}_token_id"] = tokenizer.token_to_id(specials[f"{name}_token"])
    if "pad_token_id" in text and cfg.vision is not None:
        out["pad_token_id"] = text["pad_token_id"]  # where the LLaVA-1.5 llava-hf folders keep it
    if dtype is not None:  # transformers 5 reads "dtype"; 4.x before 4.56, and SGLang, read "torch_dtype"
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    if cfg.vision is None:
        return out
    if cfg.vision.kind == "siglip":
        out["vision_config"]["vision_use_head"] = False  # the released towers drop SigLIP's pooling head
    out["image_token_index"] = ids["<image>"]
    if "<video>" in ids:
        out["video_token_index"] = ids["<video>"]
    if out["model_type"] != "llava_onevision":
        out["image_seq_length"] = cfg.vision.side ** 2
    return out


def write_hf_metadata(folder, cfg: LlavaConfig, tokenizer=None, template: str | None = None, eos_ids=(), dtype=None,
                      source: Path | None = None):
    """Every file of the llava-hf layout except the weights. Without a tokenizer only config.json is written.

    `template` names our chat template (default: guessed from the tokenizer); `eos_ids` are extra stop ids (the
    source checkpoint's own) for generation_config.json. The chat template a `source` folder ships is kept as it
    is (copy_chat_template) rather than written from ours."""
    folder = Path(folder)
    dump = lambda name, obj: (folder / name).write_text(json.dumps(obj, indent=2) + "\n")  # noqa: E731
    if tokenizer is None:
        return dump("config.json", {**hf_config(cfg), **({TEMPLATE_KEY: template} if template else {})})
    template = template or default_template("", tokenizer)
    tokenizer, ids = with_media_tokens(tokenizer, cfg)
    if any(i >= cfg.text.vocab_size for i in ids.values()):
        print(f"note: {folder}: {', '.join(ids)} lie outside the vocabulary of {cfg.text.vocab_size}; transformers and "
              f"vLLM need `python export.py {folder} OUT`, which adds the rows", file=sys.stderr)
    specials = special_tokens(tokenizer, template)
    dump("config.json", {**hf_full_config(cfg, ids, specials, tokenizer, dtype), TEMPLATE_KEY: template})
    tokenizer.save(str(folder / "tokenizer.json"))
    # no BOS in the template, as in the released llava-hf templates: lmms-eval and the model cards render it as text
    # and call processor(text=...), whose tokenizer adds the BOS (written in the template too, it came twice)
    chat = jinja_template(template)
    processor_class = PROCESSORS[hf_model_type(cfg)][0] if cfg.vision is not None else None
    # PreTrainedTokenizerFast + added_tokens_decoder: a class name transformers 4.x knows too (5.x reads any)
    added = {str(i): dict(content=t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
             for t, i in ids.items()}
    dump("tokenizer_config.json", dict(
        tokenizer_class="PreTrainedTokenizerFast", **specials,
        extra_special_tokens={k[1:-1] + "_token": k for k in ids},
        model_max_length=cfg.text.max_position_embeddings, padding_side="left",  # left: batched generation
        clean_up_tokenization_spaces=False, added_tokens_decoder=added, chat_template=chat,
        **({"processor_class": processor_class} if processor_class else {})))
    (folder / "chat_template.jinja").write_text(chat)
    dump("chat_template.json", {"chat_template": chat})  # transformers 4.x processors read this one
    if source is not None:
        copy_chat_template(source, folder)
    stops = sorted(stop_token_ids(tokenizer, template, eos_ids))
    generation = dict(eos_token_id=stops if len(stops) != 1 else stops[0], do_sample=False)
    for name in ("bos", "pad"):
        if f"{name}_token" in specials:
            generation[f"{name}_token_id"] = tokenizer.token_to_id(specials[f"{name}_token"])
    dump("generation_config.json", generation)
    if cfg.vision is not None:
        dump("processor_config.json", processor_config(cfg))
        dump("preprocessor_config.json", image_processor_config(cfg))
        if hf_model_type(cfg) == "llava_onevision":
            dump("video_preprocessor_config.json", video_processor_config(cfg))


def copy_chat_template(source: Path, folder: Path):
    """Ship the chat template `source` ships instead of ours: its chat_template.json / .jinja copied byte for byte
    (ours removed where it has none, so that no reader finds two), and its text in tokenizer_config.json."""
    shipped = shipped_template(source)
    if shipped is None:
        return
    path, text = shipped
    for name in CHAT_TEMPLATE_FILES:
        (folder / name).unlink(missing_ok=True)
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    if path.name == "tokenizer_config.json":  # processors read a template file only: the text goes in one
        (folder / "chat_template.jinja").write_text(text, encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": text}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The weights: streamed into safetensors shards


def save_pretrained(model: Llava, folder, state_dict=None, tokenizer=None, max_shard_bytes: int = 4 << 30,
                    template: str | None = None, eos_ids=(), rank: int = 0, source: Path | None = None):
    """Write safetensors shards (+ index when there are several) and, through export.write_hf_metadata, config.json,
    the tokenizer, processor, chat-template and generation files to `folder`. `state_dict` (ours) defaults to the
    model's; its tensors may be FSDP2 shards (DTensors), which every rank must then pass here: each is gathered in
    turn and only rank 0 writes. `template` is the chat format the model was trained with (default: guessed from
    the tokenizer), kept in config.json for infer.py and the next stage; `eos_ids` adds stop ids for
    generation_config.json; the chat template a `source` folder ships is copied unchanged."""
    state = state_dict if state_dict is not None else model.state_dict()
    to_hf = hf_key if model.cfg.vision is not None else (
        lambda k: "model." + k[len("language_model."):] if k.startswith("language_model.") else k)
    write_weights({to_hf(k): v for k, v in state.items()}, Path(folder) if rank == 0 else None, max_shard_bytes)
    if rank == 0:
        dtype = next(iter(state.values())).dtype if state else None
        write_hf_metadata(Path(folder), model.cfg, tokenizer, template, eos_ids, dtype, source)


def write_weights(tensors: dict, folder: Path | None, max_shard_bytes: int):
    """Stream `tensors` into model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    when they pass `max_shard_bytes`, holding at most one output shard plus one full tensor. The shards are planned
    from shapes alone; a DTensor (an FSDP2 shard) is all-gathered when its turn comes, so every rank calls this,
    and ranks without a `folder` drop what they gathered."""
    from safetensors.torch import save_file

    shards, size = [[]], 0  # (key lists) a tensor larger than a shard gets one of its own, as transformers does
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for name, keys in zip(names, shards):
        shard = {}
        for key in keys:
            tensor = tensors[key].detach()
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # DTensor: a collective
            if folder is not None:
                shard[key] = full.to("cpu").contiguous()
        if folder is not None:
            save_file(shard, str(folder / name), metadata={"format": "pt"})
    if folder is not None and len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def publish(tmp: Path, final: Path):
    """Make tmp durable, then visible as `final` in one rename: a reader (infer.py, the next stage, a resume)
    sees the whole folder or none of it. Every folder this repository writes is published here."""
    for path in sorted(tmp.rglob("*"), reverse=True):  # files first, then the folders that list them
        fsync(path)
    fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a resumed run's final/ again, or an empty DEST
    os.replace(tmp, final)
    fsync(final.parent)


def fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """"5GB" -> 5 * 10^9 bytes, "200KB" -> 200 * 10^3, "2GiB" -> 2 * 2^30, "80G" -> 80 * 10^9 (the units transformers'
    max_shard_size takes); --max-shard-size and --gpu-memory both read sizes here."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise SystemExit(f"error: {flag} {text!r}: expected a size such as 5GB, 500MB, 80GB or 24GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# ----------------------------------------------------------------------------------------------------------------
# The command: python export.py SRC DST (any layout convert.py reads -> a complete llava-hf folder)


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (its first floating-point tensor's)."""
    files = checkpoint_files(folder)
    return next((t.dtype for f in files[:1] for _, t in read_tensors(f) if t.is_floating_point()), torch.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a LLaVA checkpoint (a short name, hub repo id or folder in the "
                                "original, llava-hf or transformers-5 layout) as a complete llava-hf folder that "
                                "transformers and vLLM load: weights, config.json, processor, tokenizer with "
                                "<image>, chat template, generation config.")
    p.add_argument("source", help="short name (see README), hub repo id, or local folder")
    p.add_argument("dest", help="the folder to write (must not exist yet, or be empty)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of SOURCE")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype (default: as stored in SOURCE)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None, help="chat format (default: the model's)")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        sys.exit(f"error: {dest} already exists and is not an empty folder; remove it or choose another DEST")
    try:
        folder = resolve(args.source, args.revision)
        dtype = getattr(torch, args.dtype) if args.dtype else stored_dtype(folder)
        model, folder = load_pretrained(str(folder), dtype=dtype)
        tokenizer = load_tokenizer(folder, args.source)
        template = args.template or default_template(args.source, tokenizer, folder)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    tokenizer, ids = with_media_tokens(tokenizer, model.cfg)
    vocab = model.cfg.text.vocab_size
    if add_media_rows(model, tokenizer):  # as the llava-hf conversions do: <image> needs a row of its own
        print(f"vocabulary {vocab} -> {model.cfg.text.vocab_size} rows for {', '.join(ids)}", file=sys.stderr)
    state = model.state_dict() | {k: t.to(dtype) for k, t in unused_tower_tensors(model.cfg).items()}
    tmp = dest.with_name(f".tmp-{dest.name}")  # written aside, renamed when complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, state_dict=state, tokenizer=tokenizer, max_shard_bytes=args.max_shard_size,
                        template=template, eos_ids=eos_token_ids(folder), source=None if args.template else folder)
    except ValueError as e:  # a model the llava-hf classes cannot express (e.g. a linear projector)
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"error: {args.source}: {e}")
    publish(tmp, dest)
    print(f"{dest}: {json.loads((dest / 'config.json').read_text()).get('model_type')} in {str(dtype)[6:]}, template "
          f"{template}, {', '.join(f'{t} = {i}' for t, i in ids.items())}", file=sys.stderr)


if __name__ == "__main__":
    main()
