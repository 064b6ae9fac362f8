"""`python export.py SRC DST`: the llava-hf folder it writes loads in transformers (test-only oracle) with no
missing or unexpected weights, and gives the same input ids, pixels and logits as transformers on the source
checkpoint; the Jinja chat template renders exactly our template table's strings."""

import json
import shutil

import pytest
import torch
from conftest import photo

import tiny_checkpoints as tc
from tiny_releases import to_original_layout
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
    return to_original_layout(tiny(name), tmp_path / "original", tower_dir=tmp_path / "tower",
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
    assert text == render_prompt("vicuna_v1", [("user", "<image>\nWhat is shown?")])  # no BOS, as released

    image = photo(*size, seed=3)
    ours = processor(images=image, text=text, return_tensors="pt")
    theirs = tc.load_full_processor(tiny(name))(images=image, text=text, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    # rendered as text, then processor(text=...) as lmms-eval and the model cards do: one BOS, which the tokenizer adds
    assert ours["input_ids"][0].tolist().count(1) == 1 and ours["input_ids"][0, 0] == 1
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
    assert ((config["image_token_index"], config["video_token_index"], config["vision_aspect_ratio"])
            == (318, 319, "anyres_max_9"))
    assert config["dtype"] == config["torch_dtype"] == "float32"  # transformers 5 / 4 and SGLang read one each
    processor = json.loads((out / "processor_config.json").read_text())
    assert (processor["processor_class"], processor["num_image_tokens"], processor["video_token"]) == (
        "LlavaOnevisionProcessor", 81, "<video>")
    assert not any(isinstance(v, dict) for v in processor.values())  # flat, as released (transformers 4 reads it)
    video = json.loads((out / "video_preprocessor_config.json").read_text())  # transformers' VIDEO_PROCESSOR_NAME
    image = json.loads((out / "preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "LlavaOnevisionVideoProcessor" and video["size"] == image["size"]
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == 317  # <|im_end|>
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    source_tokenizer = tc.load_tokenizer(tiny("onevision_qwen2"))
    assert tokenizer("a<image>b<video>").input_ids == source_tokenizer("a<image>b<video>").input_ids
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
    theirs = tc.load_full_processor(tiny("next_llama"))(images=image, text="<s>USER: <image>\nHi ASSISTANT:",
                                                        return_tensors="pt")
    ours = dict(theirs, input_ids=torch.where(theirs["input_ids"] == 319, 320, theirs["input_ids"]))
    reference = tc.load_reference(tiny("next_llama"))
    with torch.no_grad():
        logits = model(**ours).logits
        assert logits.shape[-1] == 384
        assert (logits[..., :320] - reference(**theirs).logits).abs().max() <= 1e-4


def test_a_training_checkpoint_keeps_its_weights_and_says_how_to_export(tiny, tmp_path, capsys):
    """save_pretrained never reshapes weights (a resumed run must find what it saved): with no row free for
    <image> it writes the token at the next id, says so, and `python export.py` adds the row."""
    from convert import load_pretrained
    from chat_template import load_tokenizer
    from export import save_pretrained

    src = tmp_path / "src"
    shutil.copytree(tiny("next_llama"), src)
    without_image_token(src)
    model, _ = load_pretrained(str(src))
    save_pretrained(model, tmp_path / "ckpt", tokenizer=load_tokenizer(src, str(src)), template="llava_v1")
    assert "python export.py" in capsys.readouterr().err
    again, _ = load_pretrained(str(tmp_path / "ckpt"))
    assert again.cfg.text.vocab_size == 320 and torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["image_token_index"] == 320
    assert "A chat between a curious human" in (tmp_path / "ckpt" / "chat_template.jinja").read_text()
    from chat_template import default_template  # the folder's template is read back; the tokenizer alone says vicuna_v1

    tokenizer = load_tokenizer(src, str(src))
    assert ((default_template(str(tmp_path / "ckpt"), tokenizer), default_template(str(src), tokenizer))
            == ("llava_v1", "vicuna_v1"))


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


def test_export_py_is_the_command():
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "export.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: export.py" in done.stdout and "--max-shard-size" in done.stdout


# ----------------------------------------------------------------------------------------------------------------
# Every family the preset table knows, as the released llava-hf folders and their readers see it


def siglip_anyres_source(tiny, tmp_path):
    """An Interleave-shaped original checkpoint: SigLIP, plain "anyres" (no anyres_max), spatial_unpad; exported
    as llava_next, since llava-hf's own Interleave conversion drops the AnyRes crops and the newline."""
    src = source_folder(tiny, tmp_path, "onevision_qwen2", "original")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "anyres"}))
    return src


def onevision_processor(folder):
    """transformers' LlavaOnevisionProcessor on `folder` without its video processor (which needs torchvision,
    absent here): the processor's own image-token expansion, from its processor_config.json."""
    spec = json.loads((folder / "processor_config.json").read_text())
    processor = object.__new__(transformers.LlavaOnevisionProcessor)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    processor.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token"):
        setattr(processor, key, spec[key])

    def call(images, text, return_tensors="pt"):
        pixels = processor.image_processor(images=images, return_tensors="pt")
        text = text.replace("<image>", processor.replace_image_token(pixels, 0))
        return {**pixels, **processor.tokenizer(text, return_tensors="pt")}
    return call


# (tiny checkpoint, layout, family): LLaVA-1.6 34B and LLaMA3-LLaVA-NeXT are llava_next folders with a Llama
# decoder, as NeXT Vicuna; NeXT 72B/110B are llava_next with a Qwen2 decoder and the CLIP tower
FAMILY_FOLDERS = {
    "llava-1.5": ("llava15_llama", "original"),
    "next-vicuna": ("next_llama", "llava-hf"),
    "next-mistral": ("next_mistral", "original"),
    "next-qwen": ("next_qwen2", "original"),
    "interleave": ("onevision_qwen2", "interleave"),
    "onevision": ("onevision_qwen2", "original"),
}


@pytest.mark.parametrize("family", sorted(FAMILY_FOLDERS))
def test_transformers_processor_on_the_export_gives_our_pixels_tokens_ids_and_logits(tiny, tmp_path, family):
    """For a tall non-square image (500x900) and one smaller than a crop: transformers' own processor, reading
    only the exported files, gives the pixel_values shape, <image> count and input ids our code gives for the
    export, and transformers' model class on the export gives our logits."""
    from anyres import process_image
    from convert import load_pretrained
    from chat_template import load_tokenizer
    from data import tokenize
    from model import IMAGE_TOKEN

    name, layout = FAMILY_FOLDERS[family]
    src = (siglip_anyres_source(tiny, tmp_path) if layout == "interleave"
           else source_folder(tiny, tmp_path, name, layout))
    out = tmp_path / "export"
    theirs_model = export(src, out, "--dtype", "float32")
    config = json.loads((out / "config.json").read_text())
    # vLLM builds the language model from text_config.architectures (vllm/model_executor/models/llava.py,
    # llava_next.py, llava_onevision.py: init_vllm_registered_model(hf_config=config.text_config); registry.py's
    # resolve_model_cls raises "No model architectures are specified" on an empty list): the decoder's own class
    decoder = type(theirs_model.model.language_model).__name__
    assert config["text_config"]["architectures"] == [decoder.replace("Model", "ForCausalLM")]
    processor = (onevision_processor(out) if config["model_type"] == "llava_onevision"
                 else transformers.AutoProcessor.from_pretrained(str(out), backend="pil"))
    # the reading transformers' processors follow ("transformers"), except LLaVA-1.5: its export pads to a square
    # of the mean colour (do_pad), as the original trained, which is our "original" reading
    ours, _ = load_pretrained(str(out), compat="original" if config["model_type"] == "llava" else "transformers")
    tokenizer, image_id = load_tokenizer(out, str(out)), config["image_token_index"]
    prompt = "USER: <image>\nWhat is shown? ASSISTANT:"
    for size in ((500, 900), (20, 12)):
        image = photo(*size, seed=5)
        theirs = dict(processor(images=image, text=prompt, return_tensors="pt"))
        processed = process_image(image, ours.cfg)
        assert tuple(theirs["pixel_values"].shape[-4:]) == tuple(processed.pixels.shape), (family, size)
        ids = tokenize(tokenizer, prompt, [processed.num_tokens], compat="transformers")
        assert (theirs["input_ids"] == image_id).sum() == processed.num_tokens > 1
        assert theirs["input_ids"][0].tolist() == [image_id if i == IMAGE_TOKEN else i for i in ids]
        assert torch.allclose(theirs["pixel_values"][0], processed.pixels, atol=1e-5)
        theirs.pop("batch_num_images", None)
        with torch.no_grad():
            diff = (theirs_model(**theirs).logits - ours(torch.tensor([ids]), [processed])).abs().max()
        assert diff <= 1e-4, (family, size, diff)


# ----------------------------------------------------------------------------------------------------------------
# The released llava-hf folders as the spec: every key their config.json, preprocessor_config.json and
# processor_config.json carry, with the value wherever it does not depend on the weights. Sources: the Hub files of
# llava-hf/llava-1.5-7b-hf, llava-v1.6-mistral-7b-hf (preprocessor_config.json at f5c511b),
# llava-onevision-qwen2-0.5b-ov-hf / -72b-ov-hf and llava-interleave-qwen-0.5b-hf; for the other NeXT folders,
# transformers' convert_llava_next_weights_to_hf.py, which writes the same files with the decoder's own class.

W = "weights"  # a shape, the vocabulary or the tower layers kept: the key must be there, its value is the model's
TOK = "token id"  # an id of the exported tokenizer: the key must be there
TOOL = "tool"  # names the program that wrote the file (or a copy it kept by accident), not how to read the model

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
NEXT_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
INTERLEAVE_GRID = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
OV_GRID = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
CLIP_TOWER = dict(model_type="clip_vision_model", hidden_size=W, intermediate_size=W, num_attention_heads=W,
                  num_hidden_layers=W, image_size=336, patch_size=14, projection_dim=768, vocab_size=TOOL)
SIGLIP_TOWER = dict(model_type="siglip_vision_model", hidden_size=W, intermediate_size=W, num_attention_heads=W,
                    num_hidden_layers=W, image_size=384, patch_size=14, vision_use_head=False)
PIXELS = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, resample=3,
              rescale_factor=1 / 255)


def text(model_type, architecture, **values):
    return dict(model_type=model_type, architectures=[architecture], vocab_size=W, _name_or_path=TOOL,
                torch_dtype=TOOL, **values)


def llava_hf_next(text_config):
    """A LLaVA-1.6 / NeXT llava-hf folder: CLIP-336, the five 336-px grids, LlavaNext classes."""
    return dict(
        config=dict(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next", ignore_index=-100,
                    image_grid_pinpoints=NEXT_GRID, image_token_index=TOK, projector_hidden_act="gelu",
                    tie_word_embeddings=False, use_image_newline_parameter=True, vision_feature_layer=W,
                    vision_feature_select_strategy="default", torch_dtype=TOOL, transformers_version=TOOL,
                    vocab_size=TOOL, text_config=text_config, vision_config=CLIP_TOWER),
        preprocessor=dict(PIXELS, aspect_ratio_setting="anyres", crop_size={"height": 336, "width": 336},
                          do_center_crop=True, image_grid_pinpoints=NEXT_GRID, image_mean=CLIP_MEAN,
                          image_std=CLIP_STD, image_processor_type="LlavaNextImageProcessor",
                          processor_class="LlavaNextProcessor", size={"shortest_edge": 336}),
        processor=dict(image_token="<image>", num_additional_image_tokens=1, patch_size=14,
                       processor_class="LlavaNextProcessor", vision_feature_select_strategy="default"))


RELEASED = {
    "llava-v1.5-7b": dict(
        config=dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", ignore_index=-100,
                    image_token_index=TOK, pad_token_id=TOK, projector_hidden_act="gelu", image_seq_length=576,
                    tie_word_embeddings=False, vision_feature_layer=W, vision_feature_select_strategy="default",
                    transformers_version=TOOL, torch_dtype=TOOL, vision_config=CLIP_TOWER,
                    text_config=text("llama", "LlamaForCausalLM", max_position_embeddings=4096, rms_norm_eps=1e-5)),
        preprocessor=dict(PIXELS, crop_size={"height": 336, "width": 336}, do_center_crop=True, image_mean=CLIP_MEAN,
                          image_std=CLIP_STD, image_processor_type="CLIPImageProcessor",
                          processor_class="LlavaProcessor", size={"shortest_edge": 336}),
        processor=dict(image_token="<image>", num_additional_image_tokens=1, patch_size=14,
                       processor_class="LlavaProcessor", vision_feature_select_strategy="default")),
    "llava-v1.6-vicuna-7b": llava_hf_next(text("llama", "LlamaForCausalLM", max_position_embeddings=4096)),
    "llava-v1.6-mistral-7b": llava_hf_next(text("mistral", "MistralForCausalLM", intermediate_size=W,
                                                num_key_value_heads=W, max_position_embeddings=32768,
                                                rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None)),
    "llava-v1.6-34b": llava_hf_next(text("llama", "LlamaForCausalLM", hidden_size=W, num_hidden_layers=W)),
    "llama3-llava-next-8b": llava_hf_next(text("llama", "LlamaForCausalLM", rope_theta=500000.0)),
    "llava-next-72b": llava_hf_next(text("qwen2", "Qwen2ForCausalLM", hidden_size=W, rope_theta=1e6)),
    "llava-next-110b": llava_hf_next(text("qwen2", "Qwen2ForCausalLM", hidden_size=W, num_key_value_heads=W)),
    "llava-next-interleave-qwen-0.5b": dict(
        config=dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", ignore_index=-100,
                    image_token_index=TOK, projector_hidden_act="gelu", tie_word_embeddings=W,
                    vision_feature_layer=-1, vision_feature_select_strategy="full", vision_config=SIGLIP_TOWER,
                    transformers_version=TOOL, torch_dtype=TOOL, text_config=text("qwen2", "Qwen2ForCausalLM")),
        preprocessor=dict(PIXELS, do_convert_rgb=None, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                          image_processor_type="SiglipImageProcessor", processor_class="LlavaProcessor",
                          size={"height": 384, "width": 384}),
        processor=dict(image_token="<image>", num_additional_image_tokens=0, patch_size=14,
                       processor_class="LlavaProcessor", vision_feature_select_strategy="full")),
    "llava-onevision-qwen2-0.5b-ov": dict(
        config=dict(architectures=["LlavaOnevisionForConditionalGeneration"], model_type="llava_onevision",
                    ignore_index=-100, image_grid_pinpoints=OV_GRID, image_token_index=TOK, video_token_index=TOK,
                    projector_hidden_act="gelu", tie_word_embeddings=W, vision_aspect_ratio="anyres_max_9",
                    vision_feature_layer=-1, vision_feature_select_strategy="full", vision_config=SIGLIP_TOWER,
                    transformers_version=TOOL, torch_dtype=TOOL,
                    text_config=text("qwen2", "Qwen2ForCausalLM", rms_norm_eps=1e-6, rope_theta=1e6)),
        preprocessor=dict(PIXELS, crop_size={"height": 384, "width": 384}, do_center_crop=True, do_pad=True,
                          image_grid_pinpoints=OV_GRID, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                          image_processor_type="LlavaOnevisionImageProcessor",
                          processor_class="LlavaOnevisionProcessor", size={"height": 384, "width": 384}),
        processor=dict(image_token="<image>", video_token="<video>", num_image_tokens=729,
                       processor_class="LlavaOnevisionProcessor", vision_feature_select_strategy="full")),
}
INTERLEAVE_WHY = "ours keeps the AnyRes crops and the newline Interleave was trained with (llava-hf's drops them)"
# (preset, file, key) -> (our value, why it differs from the released one)
DIVERGES = {
    ("llava-v1.5-7b", "preprocessor", "image_processor_type"): (
        "LlavaImageProcessor", "its do_pad makes the mean-colour square LLaVA-1.5 was trained on (CLIP's crops)"),
    **{("llava-next-interleave-qwen-0.5b", f, k): (v, INTERLEAVE_WHY) for f, k, v in (
        ("config", "architectures", ["LlavaNextForConditionalGeneration"]), ("config", "model_type", "llava_next"),
        ("preprocessor", "image_processor_type", "LlavaNextImageProcessor"),
        ("preprocessor", "processor_class", "LlavaNextProcessor"), ("preprocessor", "size", {"shortest_edge": 384}),
        ("preprocessor", "do_convert_rgb", True), ("processor", "processor_class", "LlavaNextProcessor"))},
}

# the released checkpoints' original configs (what a preset's original repo holds), real sizes; no weights needed
_ORIGINAL_LLM = {
    "vicuna": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=4096),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5,
                    max_position_embeddings=32768, sliding_window=None),
    "yi": dict(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60, num_attention_heads=56,
               num_key_value_heads=8, vocab_size=64000, rope_theta=5e6, rms_norm_eps=1e-5,
               max_position_embeddings=4096),
    "llama3": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=8192),
    "qwen1.5-72b": dict(hidden_size=8192, intermediate_size=24576, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=64, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                        max_position_embeddings=32768),
    "qwen1.5-110b": dict(hidden_size=8192, intermediate_size=49152, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=32768),
    "qwen1.5-0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, tie_word_embeddings=True),
}
CLIP, SIGLIP = "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"
ORIGINAL = {  # preset -> (model_type, architecture, LLM, tower, image_aspect_ratio, grid)
    "llava-v1.5-7b": ("llava_llama", "LlavaLlamaForCausalLM", "vicuna", CLIP, "pad", None),
    "llava-v1.6-vicuna-7b": ("llava_llama", "LlavaLlamaForCausalLM", "vicuna", CLIP, "anyres", NEXT_GRID),
    "llava-v1.6-mistral-7b": ("llava_mistral", "LlavaMistralForCausalLM", "mistral", CLIP, "anyres", NEXT_GRID),
    "llava-v1.6-34b": ("llava_llama", "LlavaLlamaForCausalLM", "yi", CLIP, "anyres", NEXT_GRID),
    "llama3-llava-next-8b": ("llava_llama", "LlavaLlamaForCausalLM", "llama3", CLIP, "anyres", NEXT_GRID),
    "llava-next-72b": ("llava_qwen", "LlavaQwenForCausalLM", "qwen1.5-72b", CLIP, "anyres", NEXT_GRID),
    "llava-next-110b": ("llava_qwen", "LlavaQwenForCausalLM", "qwen1.5-110b", CLIP, "anyres", NEXT_GRID),
    "llava-next-interleave-qwen-0.5b": ("llava_qwen", "LlavaQwenForCausalLM", "qwen1.5-0.5b", SIGLIP, "anyres",
                                        INTERLEAVE_GRID),
    "llava-onevision-qwen2-0.5b-ov": ("llava_qwen", "LlavaQwenForCausalLM", "qwen2-0.5b", SIGLIP, "anyres_max_9",
                                      OV_GRID),
}


def released_family(preset: str) -> str:
    """The RELEASED entry standing for a preset: the sizes and stages of a family write the same keys."""
    for prefix, family in (("llava-v1.5-", "llava-v1.5-7b"), ("llava-v1.6-vicuna-", "llava-v1.6-vicuna-7b"),
                           ("llava-next-interleave-", "llava-next-interleave-qwen-0.5b"),
                           ("llava-onevision-", "llava-onevision-qwen2-0.5b-ov")):
        if preset.startswith(prefix):
            return family
    return preset


def test_the_spec_covers_every_family_the_preset_table_knows():
    from convert import PRESETS

    assert {released_family(name) for name in PRESETS} == set(RELEASED) == set(ORIGINAL)


def exported_files(preset: str) -> dict:
    """What the export writes for the preset's original config (hf_full_config with a stand-in tokenizer)."""
    from convert import llava_config
    from export import hf_full_config, image_processor_config, processor_config, with_media_tokens

    model_type, architecture, llm, tower, aspect, grid = ORIGINAL[preset]
    raw = dict(_ORIGINAL_LLM[llm], model_type=model_type, architectures=[architecture], mm_vision_tower=tower,
               mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_patch_merge_type="flat" if aspect == "pad" else "spatial_unpad", image_aspect_ratio=aspect,
               image_grid_pinpoints=grid)
    cfg = llava_config(raw, preset)
    tokenizer, ids = with_media_tokens(tc.make_tokenizer("next_llama"), cfg)
    specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return dict(config=hf_full_config(cfg, ids, specials, tokenizer, torch.float16),
                preprocessor=image_processor_config(cfg), processor=processor_config(cfg))


def differences(spec: dict, ours: dict, where: str, diverges: dict) -> list[str]:
    out = []
    for key, value in spec.items():
        if value == TOOL:
            continue
        if key not in ours:
            out.append(f"{where}.{key} missing")
        elif isinstance(value, dict) and key.endswith("_config"):
            out += differences(value, ours[key], f"{where}.{key}", {})
        elif value not in (W, TOK) and ours[key] != diverges.get(key, (value,))[0]:
            out.append(f"{where}.{key}: released {value!r}, ours {ours[key]!r}")
    return out


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_the_export_carries_every_key_of_the_released_folder(preset):
    ours = exported_files(preset)
    problems = []
    for file, spec in RELEASED[preset].items():
        diverges = {k: v for (p, f, k), v in DIVERGES.items() if (p, f) == (preset, file)}
        problems += differences(spec, ours[file], file, diverges)
    assert not problems, "\n".join(problems)
    # flat, as released: transformers 4's ProcessorMixin.from_args_and_dict would pass a nested image processor's
    # dict where the image processor object goes, and raise
    assert not any(isinstance(v, dict) for v in ours["processor"].values()), ours["processor"]
