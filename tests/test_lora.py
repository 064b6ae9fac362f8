"""LoRA as a specification: training moves only the adapters and the projector; the merged checkpoint in final/
computes what the adapter-applied model computes; and peft (test-only, like transformers) loads final/adapter/ onto
transformers' model of the base folder with the same logits as our merged model."""

import json
from pathlib import Path

import pytest
import torch
from conftest import photo
from test_train import config, dataset  # noqa: F401  (the fixture)

import tiny_checkpoints as tc
from tiny_releases import to_original_layout
from anyres import process_image
from convert import PRESETS, load_pretrained
from lora import base_model_name
from model import IMAGE_TOKEN
from train import train


@pytest.fixture(scope="module")
def lora_run(dataset, tmp_path_factory):  # noqa: F811
    """3 LoRA steps (rank 4, alpha 8, all seven decoder linears) on the tiny Qwen2 LLaVA-NeXT, no dropout."""
    out = tmp_path_factory.mktemp("lora")
    before, _ = load_pretrained(str(dataset[1]))
    after = train(config(dataset, out, max_steps=3, lora_rank=4, lora_alpha=8, lora_dropout=0.0, projector_lr=1e-3))
    return before, after.eval(), out / "run" / "final", dataset[1]


def image_prompt(model, seed=3):
    image = photo(45, 30, seed=seed)
    processed = [process_image(image, model.cfg)]
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN] * processed[0].num_tokens + [7, 8, 9]])
    return image, processed, ids


def test_lora_trains_only_the_adapters_and_the_projector(lora_run):
    before, after, _, _ = lora_run
    old, new = before.state_dict(), after.state_dict()
    adapters = {k for k in new if ".lora_A." in k or ".lora_B." in k}
    assert len(adapters) == 2 * 7 * before.cfg.text.num_layers  # A and B on all seven linears of every block
    changed = {k for k in new if k not in old or not torch.equal(new[k], old[k])}
    projector = {k for k in old if k.startswith("projector.")}
    assert changed == adapters | projector
    assert all(new[k].abs().max() > 0 for k in adapters if ".lora_B." in k)  # B started at zero and learned


def test_merged_final_equals_the_adapter_applied_model(lora_run):
    _, after, final, _ = lora_run
    merged, _ = load_pretrained(str(final))
    assert not any("lora" in k for k in merged.state_dict())
    _, processed, ids = image_prompt(merged)
    with torch.no_grad():
        a, b = after(ids, processed), merged(ids, processed)
    assert (a - b).abs().max() <= 1e-5, (a - b).abs().max()


def test_peft_loads_the_adapter_onto_the_base_with_the_same_logits(lora_run):
    peft = pytest.importorskip("peft")
    _, _, final, base_folder = lora_run
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    # the run started from a llava-hf folder: the adapter names it, and peft puts the adapter on the model
    # transformers builds from that name
    assert config["base_model_name_or_path"] == str(base_folder.resolve())
    base = tc.load_reference(Path(config["base_model_name_or_path"]))
    reference = peft.PeftModel.from_pretrained(base, str(final / "adapter")).eval()
    loaded = {n for n, _ in reference.named_parameters() if "lora_A" in n}
    assert len(loaded) == 7 * 2 and not any("vision_tower" in n for n in loaded)  # the decoder's linears only
    ours, _ = load_pretrained(str(final), compat="transformers")
    image, processed, ids = image_prompt(ours)
    pixels = dict(tc.make_processor("next_qwen2")(images=image, return_tensors="pt"))
    theirs_ids = torch.where(ids == IMAGE_TOKEN, tc.IMAGE_TOKEN_ID["next_qwen2"], ids)
    with torch.no_grad():
        theirs = reference(input_ids=theirs_ids, attention_mask=torch.ones_like(ids),
                           pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"]).logits
        mine = ours(ids, processed)
    assert (mine - theirs).abs().max() <= 1e-4, (mine - theirs).abs().max()


def test_lora_with_dropout_resumes_bit_identically(dataset, tmp_path):  # noqa: F811
    """Dropout draws from the RNG the checkpoint restores: killed after step 3 and resumed from step 2, a LoRA run
    ends with the uninterrupted run's losses and merged weights, bit for bit."""
    flags = dict(max_steps=4, save_every=2, lora_rank=4, lora_dropout=0.1)
    train(config(dataset, tmp_path / "a", **flags))
    train(config(dataset, tmp_path / "b", stop_after=3, **flags))
    train(config(dataset, tmp_path / "b", resume=True, **flags))
    a, b = (load_pretrained(str(tmp_path / x / "run" / "final"))[0].state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / x / "run" / "metrics.jsonl").read_text().splitlines()]
              for x in "ab"]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


@pytest.mark.parametrize("source", ["llava-v1.6-mistral-7b", "liuhaotian/llava-v1.6-mistral-7b",
                                    "llava-hf/llava-v1.6-mistral-7b-hf", "llava-next-72b", "lmms-lab/llava-next-72b"])
def test_an_adapter_from_a_preset_names_its_llava_hf_repo(source):
    """A preset (short name, original repo or llava-hf repo) -> the llava-hf repo, the layout transformers + peft
    load; no download is needed to say so."""
    hf = next(p.hf for p in PRESETS.values() if source in (p.original, p.hf) or PRESETS.get(source) is p)
    assert hf.startswith("llava-hf/") and base_model_name(source) == hf


def test_an_adapter_from_an_original_layout_folder_names_no_base(tiny, tmp_path):
    """transformers cannot build an original-layout checkpoint that is no preset: nothing is named (its llava-hf
    form is whatever `python convert.py` writes, later); a llava-hf folder is named by its absolute path."""
    original = to_original_layout(tiny("next_qwen2"), tmp_path / "original", tower_dir=tmp_path / "tower",
                                     shard_format="safetensors", include_tower=True)
    assert base_model_name(str(original)) is None
    assert base_model_name(str(tiny("next_qwen2"))) == str(tiny("next_qwen2").resolve())
