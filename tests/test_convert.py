"""Loading released checkpoints: every key layout maps onto our names, the configs of both shapes parse to the
same model, and every bad checkpoint fails with a message naming the file and the key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chat_template import load_tokenizer
from convert import PRESETS, CheckpointError, internal_key, llava_config, load_pretrained, resolve


@pytest.mark.parametrize("key, ours", [
    # original liuhaotian / lmms-lab
    ("model.layers.3.self_attn.q_proj.bias", "language_model.layers.3.self_attn.q_proj.bias"),
    ("model.embed_tokens.weight", "language_model.embed_tokens.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.mm_projector.0.weight", "projector.linear_1.weight"),
    ("model.mm_projector.2.bias", "projector.linear_2.bias"),
    ("model.mm_projector.weight", "projector.linear.weight"),
    ("model.image_newline", "image_newline"),
    ("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.layers.0.mlp.fc1.weight"),
    ("model.vision_tower.vision_tower.vision_model.embeddings.class_embedding", "vision_tower.class_embedding"),
    # llava-hf as on the hub (transformers 4.x)
    ("language_model.model.norm.weight", "language_model.norm.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("multi_modal_projector.linear_1.weight", "projector.linear_1.weight"),
    ("vision_tower.vision_model.pre_layrnorm.weight", "vision_tower.pre_layrnorm.weight"),
    ("vision_tower.vision_model.embeddings.patch_embedding.weight", "vision_tower.patch_embedding.weight"),
    ("image_newline", "image_newline"),
    # transformers >= 4.52 in-memory names, and 5.x files without the vision_model level
    ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("model.vision_tower.vision_model.encoder.layers.1.layer_norm2.bias", "vision_tower.layers.1.layer_norm2.bias"),
    ("model.multi_modal_projector.linear_2.weight", "projector.linear_2.weight"),
    ("model.image_newline", "image_newline"),
    ("vision_tower.embeddings.position_embedding.weight", "vision_tower.position_embedding.weight"),
])
def test_every_layout_maps_to_our_names(key, ours):
    assert internal_key(key) == ours


def rewrite_keys(src, dst, rename):
    """Copy a saved tiny checkpoint with every key passed through `rename`."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    save_file({rename(k): v.contiguous() for k, v in state.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout", {
    # how llava-hf repos on the hub spell the tower (written by transformers 4.x)
    "hub_4x": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
    # transformers 4.52+ in-memory names
    "inmemory_452": lambda k: ("lm_head.weight" if k == "language_model.lm_head.weight" else
                               "model.language_model." + k[len("language_model.model."):]
                               if k.startswith("language_model.model.") else
                               "model." + k),
}.items(), ids=["hub_4x", "inmemory_452"])
def test_llava_hf_layouts_load_to_the_same_weights(tiny, tmp_path, layout):
    _, rename = layout
    base, _ = load_pretrained(str(tiny("next_llama")))
    other, _ = load_pretrained(str(rewrite_keys(tiny("next_llama"), tmp_path / "ckpt", rename)))
    for (name, a), (_, b) in zip(base.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_weights_load_straight_into_the_requested_dtype(tiny):
    model, _ = load_pretrained(str(tiny("next_qwen2")), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head is None  # tied: the logits use the embedding matrix


def test_clip_tower_runs_only_the_layers_llava_reads(tiny):
    model, _ = load_pretrained(str(tiny("next_llama")))
    assert len(model.vision_tower.layers) == 2  # hidden state -2 of a 3-layer tower: layer 3 is skipped


def test_unexpected_key_names_the_key(tiny, tmp_path):
    folder = rewrite_keys(tiny("next_llama"), tmp_path / "ckpt",
                          lambda k: k.replace("layers.1.mlp.up_proj", "layers.1.mlp.upper"))
    with pytest.raises(CheckpointError, match=r"unexpected key 'language_model.model.layers.1.mlp.upper.weight'"):
        load_pretrained(str(folder))


def test_missing_key_is_an_error(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny("next_llama"), folder)
    state = load_file(folder / "model.safetensors")
    del state["image_newline"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing weights \['image_newline'\]"):
        load_pretrained(str(folder))


def test_wrong_shape_names_key_and_shapes(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny("next_llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: 'language_model.model.layers.0.mlp.down_proj."
                                              r"weight' has shape \(64, 128\), the config implies \(64, 96\)"):
        load_pretrained(str(folder))


def test_llava_hf_configs_written_sparsely_fall_back_to_class_defaults():
    # the llava-hf LLaVA-1.5-7B config.json as on the hub: transformers wrote only non-default fields
    raw = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
           "vision_feature_select_strategy": "default",
           "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                           "vocab_size": 32064},
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                             "patch_size": 14, "projection_dim": 768}}
    cfg = llava_config(raw, "config.json")
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.num_kv_heads, cfg.text.head_dim) == (4096, 32, 32, 128)
    assert (cfg.text.vocab_size, cfg.text.rms_norm_eps, cfg.text.rope_theta) == (32064, 1e-5, 10000.0)
    assert (cfg.vision.num_layers, cfg.vision.side, cfg.image_aspect_ratio, cfg.merge_type) == (23, 24, "pad", "flat")


def test_original_onevision_config():
    # lmms-lab/llava-onevision-qwen2-7b-ov: SigLIP named, not described; range-syntax pinpoints expanded
    raw = {"model_type": "llava", "architectures": ["LlavaQwenForCausalLM"], "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "vocab_size": 152064, "tie_word_embeddings": False,
           "max_position_embeddings": 32768, "mm_vision_tower": "google/siglip-so400m-patch14-384",
           "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1152, "mm_vision_select_layer": -2,
           "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
           "image_grid_pinpoints": "(1x1),...,(6x6)"}
    cfg = llava_config(raw, "config.json")
    assert ((cfg.vision.kind, cfg.vision.num_layers, cfg.vision.side, cfg.vision.select_feature)
            == ("siglip", 26, 27, "full"))
    assert len(cfg.grid_pinpoints) == 36 and cfg.grid_pinpoints[-1] == [2304, 2304]
    # model_type "llava" (edited by lmms-lab for SGLang) hides the Qwen family; the architectures name it
    assert cfg.text.qkv_bias is True and cfg.text.rope_theta == 1e6 and cfg.text.num_kv_heads == 4


def test_offline_without_a_cached_copy_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve("llava-onevision-qwen2-0.5b-ov")
    # huggingface_hub >= 1.0 ships only the `hf` command; the hint names the one installed here, which exists
    from importlib.metadata import version

    assert int(version("huggingface_hub").split(".")[0]) >= 1
    assert "run `hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf` to fill the cache" in str(e.value)
    assert shutil.which("hf")  # the command named exists


def test_sentencepiece_only_folder_says_what_to_do(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="only a SentencePiece tokenizer.model"):
        load_tokenizer(tmp_path, str(tmp_path))


def test_presets_cover_the_catalogue():
    assert len(PRESETS) == 20
    assert PRESETS["llava-v1.6-mistral-7b"].repo == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert PRESETS["llava-next-interleave-qwen-7b"].repo == "lmms-lab/llava-next-interleave-qwen-7b"  # see README
    assert {p.template for p in PRESETS.values()} == {"vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct",
                                                      "llava_llama_3", "qwen_1_5"}
