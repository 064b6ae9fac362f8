"""The tiny checkpoints of tests/tiny_checkpoints.py in the forms the real releases ship (test-support module).

* ``to_original_layout(hf_dir, out_dir, tower_dir=..., shard_format=..., include_tower=...)`` -- rewrites a
  tiny llava-hf folder into the ORIGINAL liuhaotian / lmms-lab layout (flat config.json, ``model.*`` keys,
  sharded .safetensors or .bin + index), and writes the vision-tower "hub repo" into ``tower_dir``.
* ``RELEASED_CHAT_TEMPLATES`` (and ``LLAVA15_HF``, ``MISTRAL_HF``, ``LLAMA3_HF``, ``ONEVISION_HF``) -- the chat
  templates the llava-hf repos ship; ``special_tokens_tokenizer(kind)`` and ``with_chat_template(src, dest, ...)``
  give a tokenizer and a checkpoint folder to test them with.
* ``python tests/tiny_releases.py`` builds every tiny checkpoint, runs it against transformers and prints
  what it wrote, in both layouts (the self-check).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tiny_checkpoints import (IMAGE_TOKEN_ID, NAMES, _ORIGINAL, _read_state_dict, build, example_inputs,
                              load_full_processor, load_processor, load_reference, load_tokenizer, make_model,
                              make_tokenizer, saved_keys)


# ----------------------------------------------------------------------------------------------------
# original (liuhaotian / lmms-lab) layout
# ----------------------------------------------------------------------------------------------------


def _original_key(hf_key: str) -> str:
    """Map one llava-hf / transformers-5 key to the original layout (KeyError for anything unknown).

    Vision keys are returned relative to the tower ('vision_model.…'); the caller prefixes them.
    """
    k = hf_key
    for p in ("model.language_model.", "language_model.model."):
        if k.startswith(p):
            return "model." + k[len(p):]
    if k in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    for p in ("model.multi_modal_projector.", "multi_modal_projector."):
        if k.startswith(p):
            rest = k[len(p):].replace("linear_1.", "0.").replace("linear_2.", "2.")
            return "model.mm_projector." + rest
    if k in ("image_newline", "model.image_newline"):
        return "model.image_newline"
    for p in ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.", "vision_tower."):
        if k.startswith(p):
            return "vision_model." + k[len(p):]
    raise KeyError(f"unexpected llava-hf key {hf_key!r}")


def _split_contiguous(keys: list[str], sizes: dict[str, int], num_shards: int) -> list[list[str]]:
    """Split ordered keys into `num_shards` non-empty contiguous chunks of roughly equal byte size."""
    num_shards = max(1, min(num_shards, len(keys)))
    total = sum(sizes[k] for k in keys)
    shards: list[list[str]] = [[]]
    acc = 0
    for i, k in enumerate(keys):
        remaining_keys = len(keys) - i
        remaining_shards = num_shards - len(shards)
        if shards[-1] and remaining_shards > 0 and (acc >= total * len(shards) / num_shards
                                                    or remaining_keys <= remaining_shards):
            shards.append([])
        shards[-1].append(k)
        acc += sizes[k]
    return shards


def _write_shards(sd: dict[str, torch.Tensor], out_dir: Path, shard_format: str, num_shards: int) -> None:
    keys = list(sd)
    sizes = {k: sd[k].numel() * sd[k].element_size() for k in keys}
    chunks = _split_contiguous(keys, sizes, num_shards)
    n = len(chunks)
    weight_map: dict[str, str] = {}
    for i, chunk in enumerate(chunks, start=1):
        part = {k: sd[k].contiguous().clone() for k in chunk}
        if shard_format == "safetensors":
            from safetensors.torch import save_file

            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        elif shard_format == "bin":
            fname = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save(part, str(out_dir / fname))
        else:
            raise ValueError(f"shard_format must be 'safetensors' or 'bin', got {shard_format!r}")
        weight_map.update({k: fname for k in chunk})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    index_name = "model.safetensors.index.json" if shard_format == "safetensors" else "pytorch_model.bin.index.json"
    (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")


# transformers-5 / generic PretrainedConfig fields that the released original config.json files do not carry
_NOT_IN_ORIGINAL_CONFIG = (
    "layer_types", "dtype", "model_type", "architectures", "transformers_version", "_name_or_path", "id2label",
    "label2id", "chunk_size_feed_forward", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "is_encoder_decoder",
)


def _original_config(name: str, hf_config, tower_dir: Path) -> dict:
    """One flat config.json in the original style: text-model fields + mm_* fields."""
    fam = _ORIGINAL[name]
    text = hf_config.text_config.to_dict()
    rope = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = float(rope.get("rope_theta", getattr(hf_config.text_config, "rope_theta", 10000.0)))
    text["rope_scaling"] = None
    for k in _NOT_IN_ORIGINAL_CONFIG:
        text.pop(k, None)
    cfg = dict(text)
    cfg.update(
        architectures=[fam["arch"]],
        model_type=fam["model_type"],
        torch_dtype="float32",
        use_cache=True,
        mm_vision_tower=str(Path(tower_dir).resolve()),
        mm_hidden_size=hf_config.vision_config.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type=fam["merge"],
        image_aspect_ratio=fam["aspect"],
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        tokenizer_model_max_length=fam["max_len"],
        tokenizer_padding_side="right",
    )
    if name != "llava15_llama":
        cfg["image_grid_pinpoints"] = [list(p) for p in hf_config.image_grid_pinpoints]
    if name == "onevision_qwen2":
        cfg.update(mm_spatial_pool_mode="bilinear", mm_newline_position="one_token")
    return dict(sorted(cfg.items()))


def _write_tower_repo(hf_config, tower_sd: dict[str, torch.Tensor], tower_dir: Path) -> None:
    """What the original code fetches from `mm_vision_tower`: config (+ weights for CLIP) + preprocessor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, SiglipImageProcessorPil

    tower_dir.mkdir(parents=True, exist_ok=True)
    vc = hf_config.vision_config
    if vc.model_type == "clip_vision_model":
        full = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                             vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1),
            vision_config=vc.to_dict(), projection_dim=vc.projection_dim,
        ).to_dict()
        full["architectures"] = ["CLIPModel"]
        (tower_dir / "config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in tower_sd.items()}, str(tower_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        c = vc.image_size
        proc = CLIPImageProcessorPil(size={"shortest_edge": c}, crop_size={"height": c, "width": c})
    else:  # SigLIP: the hub repo has one more layer than LLaVA keeps; no weights written (they live in the shards)
        d = vc.to_dict()
        d["num_hidden_layers"] = vc.num_hidden_layers + 1
        d["vision_use_head"] = True
        d["model_type"] = "siglip_vision_model"
        d["architectures"] = ["SiglipVisionModel"]
        (tower_dir / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        s = vc.image_size
        proc = SiglipImageProcessorPil(size={"height": s, "width": s})
    proc.save_pretrained(str(tower_dir))


def _name_from_config(hf_config) -> str:
    """Which of NAMES a (tiny) llava-hf config is."""
    if hf_config.model_type == "llava":
        return "llava15_llama"
    if hf_config.model_type == "llava_onevision":
        return "onevision_qwen2"
    return "next_" + {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}[hf_config.text_config.model_type]


def to_original_layout(
    hf_dir: Path,
    out_dir: Path,
    *,
    tower_dir: Path,
    shard_format: str,
    include_tower: bool,
    num_shards: int = 2,
) -> Path:
    """Rewrite a tiny llava-hf folder (from build()) into the original liuhaotian / lmms-lab layout.

    out_dir gets: config.json (flat), shards + index, tokenizer files. tower_dir gets the vision-tower
    "hub repo" (config.json, preprocessor_config.json, and for CLIP model.safetensors with vision_model.* keys).
    Original key order: LLM (embed, layers, norm), image_newline, projector, vision tower, lm_head.
    """
    from transformers import AutoConfig

    hf_dir, out_dir, tower_dir = Path(hf_dir), Path(out_dir), Path(tower_dir)
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    name = _name_from_config(hf_config)
    out_dir.mkdir(parents=True, exist_ok=True)

    sd = _read_state_dict(hf_dir)
    llm, newline, proj, tower, head = {}, {}, {}, {}, {}
    for k, v in sd.items():
        ok = _original_key(k)
        if ok.startswith("vision_model."):
            tower[ok] = v
        elif ok == "lm_head.weight":
            head[ok] = v
        elif ok == "model.image_newline":
            newline[ok] = v
        elif ok.startswith("model.mm_projector."):
            proj[ok] = v
        else:
            llm[ok] = v
    if hf_config.text_config.tie_word_embeddings:
        head = {}  # tied Qwen: the original checkpoints store no lm_head
    elif not head:
        raise KeyError("untied checkpoint without lm_head")

    def _layer_order(k: str):
        parts = k.split(".")
        return [int(p) if p.isdigit() else p for p in parts]

    out_sd: dict[str, torch.Tensor] = {}
    for group in (llm, newline, proj):
        for k in sorted(group, key=_layer_order):
            out_sd[k] = group[k]
    if include_tower:
        for k in sorted(tower, key=_layer_order):
            out_sd["model.vision_tower.vision_tower." + k] = tower[k]
    out_sd.update(head)

    for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.bin")) + list(out_dir.glob("*.index.json")):
        old.unlink()
    _write_shards(out_sd, out_dir, shard_format, num_shards)
    cfg = _original_config(name, hf_config, tower_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / f).exists():
            shutil.copyfile(hf_dir / f, out_dir / f)
    _write_tower_repo(hf_config, tower, tower_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# chat templates as the llava-hf repos ship them (chat_template.json), for convert.default_template

_IMAGES_FIRST = ("{# Render all images first #}{% for content in message['content'] | "
                 "selectattr('type', 'equalto', 'image') %}")
_TEXT = "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
# llava-hf/llava-1.5-7b-hf: no system sentence of its own, an answer closed by a space (no </s>)
LLAVA15_HF = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
              "{% endif %}" + _IMAGES_FIRST + "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
              "{% if message['role'] != 'assistant' %}" + _TEXT + "{{ content['text'] + ' '}}{% endfor %}{% else %}"
              + _TEXT + "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# llava-hf/llava-v1.6-mistral-7b-hf as first released: an answer closed by the literal `<\s> ` (a typo for </s>)
MISTRAL_HF = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
              "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
              + _IMAGES_FIRST + "{{ '<image>\n' }}{% endfor %}{# Render all text next #}" + _TEXT
              + "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
              "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only user and "
              "assistant roles are supported!') }}{% endif %}{% endfor %}")
MISTRAL_HF_FIXED = MISTRAL_HF.replace("'<\\\\s> '", "'</s> '")  # the later revision of the same file
# llava-hf/llama3-llava-next-8b-hf: no BOS, "<image>" then "\n" before every text (3 newlines after a bare header)
LLAMA3_HF = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
             + _IMAGES_FIRST + "{{ '<image>' }}{% endfor %}{# Render all text next #}" + _TEXT
             + "{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _chatml_hf(head: str, image: str, text: str, end: str, video: bool = False) -> str:
    """The ChatML templates of the llava-hf conversions: `head` after the role, `image` per image, then the text."""
    videos = ("{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', "
              "'video') %}{{ '<video>\n' }}{% endfor %}") if video else ""
    return ("{% for message in messages %}{{'<|im_start|>' + message['role'] + " + head + "}}" + _IMAGES_FIRST
            + "{{ " + image + " }}{% endfor %}" + videos + "{# Render all text next #}" + _TEXT + "{{ " + text
            + " }}{% endfor %}{{" + end + "}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")


# transformers' LLaVA-OneVision conversion script (convert_llava_onevision_weights_to_hf.py), as the OV repos ship it
ONEVISION_HF = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}" + _IMAGES_FIRST
                + "{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | "
                "selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}"
                "{% if message['role'] != 'assistant' %}" + _TEXT + "{{ content['text'] }}{% endfor %}{% else %}"
                + _TEXT + "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
                "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
# (name, config.json model_type, template, tokenizer kind, the template of ours it is). The 1.6 Vicuna repos ship
# LLaVA-1.5's template; the 34B, 72B/110B and Interleave strings follow the conversions' ChatML form (the Interleave
# one with a space after the role and "\n" before the text, as transformers' processor tests copy it).
RELEASED_CHAT_TEMPLATES = [
    ("llava-1.5-7b-hf", "llava", LLAVA15_HF, "llama", "vicuna_v1"),
    ("llava-v1.6-vicuna-7b-hf", "llava_next", LLAVA15_HF, "llama", "llava_v1"),
    ("llava-v1.6-mistral-7b-hf", "llava_next", MISTRAL_HF, "llama", "mistral_instruct"),
    ("llava-v1.6-mistral-7b-hf (</s>)", "llava_next", MISTRAL_HF_FIXED, "llama", "mistral_instruct"),
    ("llava-v1.6-34b-hf", "llava_next", _chatml_hf("'\n'", "'<image>\n'", "content['text']", "'<|im_end|>'"), "yi",
     "chatml_direct"),
    ("llama3-llava-next-8b-hf", "llava_next", LLAMA3_HF, "llama3", "llava_llama_3"),
    ("llava-next-72b-hf", "llava_next", _chatml_hf("'\n'", "'<image>\n'", "content['text']", "'<|im_end|>' + '\n'"),
     "qwen", "qwen_1_5"),
    ("llava-interleave-qwen-7b-hf", "llava", _chatml_hf("' '", "'<image>'", "'\n' + content['text']",
                                                        "'<|im_end|>' + '\n'"), "qwen", "qwen_1_5"),
    ("llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision", ONEVISION_HF, "qwen", "qwen_1_5"),
]


def special_tokens_tokenizer(kind: str):
    """A tokenizer with the special tokens a family's template needs (the byte-level tiny one plus them)."""
    from tokenizers import AddedToken

    tok = make_tokenizer("next_qwen2" if kind in ("qwen", "yi") else "next_llama")
    extra = {"yi": ["<|startoftext|>"], "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                    "<|eot_id|>", "<|end_of_text|>"]}.get(kind, [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    return tok


def with_chat_template(src: Path, dest: Path, template: str, file: str = "chat_template.json") -> Path:
    """A copy of checkpoint folder `src` that ships `template` in `file` (chat_template.json / .jinja or
    tokenizer_config.json's "chat_template"), as a llava-hf repo does."""
    shutil.copytree(src, dest)
    if file == "chat_template.jinja":
        (dest / file).write_text(template)
    elif file == "tokenizer_config.json":
        config = json.loads((dest / file).read_text())
        (dest / file).write_text(json.dumps({**config, "chat_template": template}, indent=2))
    else:
        (dest / file).write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    return dest



# ----------------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------------


def _self_check() -> None:
    import tempfile
    import time

    import numpy as np
    from PIL import Image

    torch.set_num_threads(2)
    t0 = time.time()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in NAMES:
            path = build(name, tmp / name)
            keys = saved_keys(path)
            prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
            model = load_reference(path)
            # determinism: same seed -> same weights
            again = make_model(name, 0).state_dict()
            assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items()), name
            processor = load_processor(path)
            # OneVision: 170x120 -> 5x6 crop grid -> 45x54 features > 9 crops' worth -> anyres_max_9 downsizing
            w, h = (45, 30) if name != "onevision_qwen2" else (170, 120)
            image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            inputs = example_inputs(name, model, processor, image)
            n = inputs.pop("num_image_tokens")
            if name != "onevision_qwen2":  # transformers' own processor must agree with the model's count
                full = load_full_processor(path)(images=image, text="<image>", return_tensors="pt")
                assert (full["input_ids"] == IMAGE_TOKEN_ID[name]).sum().item() == n, name
                assert torch.equal(full["pixel_values"], inputs["pixel_values"]), name
            with torch.no_grad():
                logits = model(**inputs).logits
            assert torch.isfinite(logits).all()
            tok = load_tokenizer(path)
            text = "<image>\nhi" if name != "onevision_qwen2" else "<|im_start|>user <image><video>"
            ids = tok(text)["input_ids"]
            # original layout round trip
            orig = to_original_layout(
                path, tmp / f"{name}_orig", tower_dir=tmp / f"{name}_tower",
                shard_format="bin" if name == "llava15_llama" else "safetensors",
                include_tower=name != "llava15_llama",
            )
            okeys = saved_keys(orig)
            oprefixes = sorted({".".join(k.split(".")[:3]) for k in okeys})
            print(f"== {name}: pixel_values {tuple(inputs['pixel_values'].shape)}, "
                  f"image_sizes {inputs.get('image_sizes', torch.tensor([])).tolist()}, image tokens {n}, "
                  f"logits {tuple(logits.shape)} std {logits.std():.3f}")
            print(f"   saved prefixes: {prefixes}  ({len(keys)} tensors)")
            print(f"   tokenizer {text!r} -> {ids}")
            print(f"   original files: {sorted(p.name for p in orig.iterdir())}")
            print(f"   original prefixes: {oprefixes}  ({len(okeys)} tensors); tower files: "
                  f"{sorted(p.name for p in (tmp / f'{name}_tower').iterdir())}")
    print(f"self-check OK in {time.time() - t0:.1f}s")




if __name__ == "__main__":
    _self_check()
