"""`python convert.py SRC DST`: the llava-hf folder it writes loads in transformers (test-only oracle) with no
missing or unexpected weights, and gives the same input ids, pixels and logits as transformers on the source
checkpoint; the Jinja chat template renders exactly our template table's strings."""

import json
import shutil

import pytest
import torch
from conftest import photo

import tiny_checkpoints as tc
from export import main as convert_main
from data import TEMPLATES, render_prompt, system_slot
from export import jinja_template

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def export(src, dest, *args):
    convert_main([str(src), str(dest), *args])
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(str(dest), dtype=torch.float32,
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def source_folder(tiny, tmp_path, name, layout):
    if layout == "llava-hf":
        return tiny(name)
    return tc.to_original_layout(tiny(name), tmp_path / "original", tower_dir=tmp_path / "tower",
                                 shard_format="safetensors", include_tower=True)


@pytest.mark.parametrize("name, layout, size", [
    ("next_llama", "llava-hf", (70, 30)),
    ("next_llama", "original", (30, 70)),
    ("llava15_llama", "original", (40, 40)),  # square: LLaVA-1.5's pad (export) and centre crop (llava-hf) agree
])
def test_export_loads_in_transformers_with_the_sources_ids_and_logits(tiny, tmp_path, name, layout, size):
    out = tmp_path / "export"
    model = export(source_folder(tiny, tmp_path, name, layout), out)
    processor = transformers.AutoProcessor.from_pretrained(str(out), backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s>" + render_prompt("vicuna_v1", [("user", "<image>\nWhat is shown?")])

    image = photo(*size, seed=3)
    ours = processor(images=image, text=text, return_tensors="pt")
    theirs = tc.load_full_processor(tiny(name))(images=image, text=text, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert (ours["input_ids"] == tc.IMAGE_TOKEN_ID[name]).sum() > 1  # <image> expanded to the feature count
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    reference = tc.load_reference(tiny(name))
    with torch.no_grad():
        diff = (model(**ours).logits - reference(**theirs).logits).abs().max()
    assert diff <= 1e-4
    generation = transformers.GenerationConfig.from_pretrained(str(out))
    assert (generation.eos_token_id, generation.bos_token_id, processor.tokenizer.padding_side) == (2, 1, "left")


def test_onevision_export_matches_its_source(tiny, tmp_path):
    """OneVision's AutoProcessor needs torchvision (for its video processor), absent here: its parts are checked."""
    out = tmp_path / "export"
    model = export(source_folder(tiny, tmp_path, "onevision_qwen2", "original"), out)
    config = json.loads((out / "config.json").read_text())
    assert (config["image_token_index"], config["video_token_index"], config["vision_aspect_ratio"]) == (318, 319, "anyres_max_9")
    processor = json.loads((out / "processor_config.json").read_text())
    assert (processor["processor_class"], processor["num_image_tokens"], processor["video_token"]) == (
        "LlavaOnevisionProcessor", 81, "<video>")
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == 317  # <|im_end|>
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("a<image>b<video>").input_ids == tc.load_tokenizer(tiny("onevision_qwen2"))("a<image>b<video>").input_ids
    image = photo(170, 120, seed=2)
    pixels = transformers.AutoImageProcessor.from_pretrained(str(out), backend="pil")(images=image, return_tensors="pt")
    reference = tc.load_reference(tiny("onevision_qwen2"))
    inputs = tc.example_inputs("onevision_qwen2", reference, tc.load_processor(tiny("onevision_qwen2")), image)
    assert torch.equal(pixels["pixel_values"], inputs["pixel_values"])
    inputs.pop("num_image_tokens")
    with torch.no_grad():
        assert (model(**inputs).logits - reference(**inputs).logits).abs().max() <= 1e-4


def without_image_token(folder):
    """The folder's tokenizer.json with <image> renamed, as in the original releases, which have none."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        token["content"] = "<unused>" if token["content"] == "<image>" else token["content"]
    spec["model"]["vocab"] = {("<unused>" if k == "<image>" else k): v for k, v in spec["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def test_a_tokenizer_without_image_gets_the_token_and_a_vocabulary_row(tiny, tmp_path):
    """The original releases' tokenizers have no <image>: the export adds it as a special token at the next id
    (320) and grows the vocabulary to a multiple of 64 (384), as the llava-hf conversions do; the logits of the
    existing 320 ids are unchanged."""
    src = source_folder(tiny, tmp_path, "next_llama", "original")
    without_image_token(src)
    out = tmp_path / "export"
    model = export(src, out, "--dtype", "float32")
    config = json.loads((out / "config.json").read_text())
    assert (config["image_token_index"], config["text_config"]["vocab_size"]) == (320, 384)
    processor = transformers.AutoProcessor.from_pretrained(str(out), backend="pil")
    assert processor.tokenizer("a<image>b", add_special_tokens=False).input_ids == [67, 320, 68]

    image = photo(50, 30, seed=1)
    theirs = tc.load_full_processor(tiny("next_llama"))(images=image, text="<s>USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    ours = dict(theirs, input_ids=torch.where(theirs["input_ids"] == 319, 320, theirs["input_ids"]))
    reference = tc.load_reference(tiny("next_llama"))
    with torch.no_grad():
        logits = model(**ours).logits
        assert logits.shape[-1] == 384
        assert (logits[..., :320] - reference(**theirs).logits).abs().max() <= 1e-4


def test_a_training_checkpoint_keeps_its_weights_and_says_how_to_export(tiny, tmp_path, capsys):
    """save_pretrained never reshapes weights (a resumed run must find what it saved): with no row free for
    <image> it writes the token at the next id, says so, and convert.py adds the row."""
    from convert import load_pretrained, load_tokenizer
    from export import save_pretrained

    src = tmp_path / "src"
    shutil.copytree(tiny("next_llama"), src)
    without_image_token(src)
    model, _ = load_pretrained(str(src))
    save_pretrained(model, tmp_path / "ckpt", tokenizer=load_tokenizer(src, str(src)), template="llava_v1")
    assert "python convert.py" in capsys.readouterr().err
    again, _ = load_pretrained(str(tmp_path / "ckpt"))
    assert again.cfg.text.vocab_size == 320 and torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["image_token_index"] == 320
    assert "A chat between a curious human" in (tmp_path / "ckpt" / "chat_template.jinja").read_text()
    from chat_template import default_template  # the folder's template is read back; the tokenizer alone says vicuna_v1

    tokenizer = load_tokenizer(src, str(src))
    assert (default_template(str(tmp_path / "ckpt"), tokenizer), default_template(str(src), tokenizer)) == ("llava_v1", "vicuna_v1")


@pytest.mark.parametrize("template", sorted(set(TEMPLATES) - {"qwen_2"}))
def test_the_jinja_template_renders_our_strings(template):
    """Multi-turn, images in front, with and without a system message: apply_chat_template gives our strings."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tc.make_tokenizer("next_llama"))
    chat = jinja_template(template)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it? "}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And its colour?"}]
    ours = [("user", "<image>\nWhat is it? "), ("assistant", "A cat."), ("user", "And its colour?")]
    render = lambda msgs: tokenizer.apply_chat_template(msgs, chat_template=chat, tokenize=False,  # noqa: E731
                                                        add_generation_prompt=True)
    assert render(messages) == render_prompt(template, ours)

    with_system = render([{"role": "system", "content": "Be brief."}] + messages)
    t, slot = TEMPLATES[template], system_slot(template)
    if slot:
        assert with_system == slot[0] + "Be brief." + slot[1] + render_prompt(template, ours)[len(t.system):]
    elif template != "plain":
        assert with_system == render_prompt(template, [("user", "Be brief.\n\n" + ours[0][1])] + ours[1:])


def test_convert_refuses_a_non_empty_destination_and_bad_sizes(tiny, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(SystemExit, match="already exists and is not an empty folder"):
        convert_main([str(tiny("next_llama")), str(tmp_path / "taken")])
    with pytest.raises(SystemExit):
        convert_main([str(tiny("next_llama")), str(tmp_path / "new"), "--max-shard-size", "lots"])
    assert not (tmp_path / "new").exists()


def test_convert_py_is_the_command():
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "convert.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: convert.py" in done.stdout and "--max-shard-size" in done.stdout
