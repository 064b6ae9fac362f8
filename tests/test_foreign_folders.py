"""Model folders we did not make: a tokenizer that knows ids past the embedding, a projector file that is not
there, shard names that leave the folder, configs that build no model, pickles, towers too shallow for their
feature layer, and unreadable chat templates. Each is refused with one line naming the file or key, what was
expected and what to do; none reaches a traceback, an IndexError on the embedding or a silently fresh projector."""

import json
import shutil
import types

import pytest
import torch
from tokenizers import AddedToken, Tokenizer

import infer
import serve
from chat_template import load_tokenizer


def refused(capsys, run, *words) -> str:
    """`run` must end the program with one line "error: ..." holding each of `words`, and print no traceback."""
    with pytest.raises(SystemExit) as e:
        run()
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "Traceback" not in capsys.readouterr().err
    return message


def copy(tiny, tmp_path, name="next_llama"):
    return shutil.copytree(tiny(name), tmp_path / name)


# ----------------------------------------------------------------------------------------------------------------
# A tokenizer that knows ids past the model's embedding (the llava-hf tokenizer.json that original-layout presets
# borrow adds <image> = 32000 and <pad> = 32001 to a 32000-row embedding)


@pytest.fixture
def past_vocab_folder(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<spare>", special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    assert tok.token_to_id("<spare>") == 320 == json.loads((folder / "config.json").read_text())["text_config"][
        "vocab_size"]
    return folder


def test_infer_refuses_a_token_past_the_embedding(past_vocab_folder, capsys):
    refused(capsys, lambda: infer.main(["Say <spare> now", "--model", str(past_vocab_folder), "--max-new-tokens", "2"]),
            "'<spare>' (id 320)", "320 rows", "remove that text")
    # the tokenizer being larger than the model is no fault in itself: a prompt without the token is answered
    infer.main(["Say hi", "--model", str(past_vocab_folder), "--max-new-tokens", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["output_token_ids"]


def test_serve_answers_400_for_a_token_past_the_embedding(past_vocab_folder):
    from convert import load_pretrained

    model, folder = load_pretrained(str(past_vocab_folder))
    server = types.SimpleNamespace(names={None}, name="m", model=model, tokenizer=load_tokenizer(folder, str(folder)),
                                   template="llava_v1", image_dir=None)
    with pytest.raises(serve.BadRequest) as e:
        serve.prepare({"messages": [{"role": "user", "content": "Say <spare> now"}]}, server)
    assert e.value.status == 400 and e.value.param == "messages" and "'<spare>' (id 320)" in e.value.message
    seq, _, _ = serve.prepare({"messages": [{"role": "user", "content": "Say hi"}]}, server)
    assert max(seq.ids) < 320


def test_a_chat_turn_with_a_token_past_the_embedding_leaves_the_conversation_as_it_was(past_vocab_folder):
    import chat
    from convert import load_pretrained

    model, folder = load_pretrained(str(past_vocab_folder))
    session = chat.Session(model, load_tokenizer(folder, str(folder)), "llava_v1", stop=set())
    with pytest.raises(ValueError, match=r"'<spare>' \(id 320\)"):
        list(session.ask("Say <spare> now", max_new_tokens=2))
    assert session.ids == [] and session.cache is None
    assert len(list(session.ask("Say hi", max_new_tokens=2))) == 2


def test_the_model_refuses_an_id_past_its_embedding(tiny):
    from convert import load_pretrained

    model, _ = load_pretrained(str(tiny("next_llama")))
    with pytest.raises(ValueError, match="token id 320 is past the model's 320 embedding rows"):
        model(torch.tensor([[1, 5, 320]]))


# ----------------------------------------------------------------------------------------------------------------
# Weight files and config.json: each refused with the file or key named


def load_refused(capsys, folder, *words):
    return refused(capsys, lambda: infer.main(["Hi", "--model", str(folder), "--max-new-tokens", "1"]), *words)


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors", "sub/model.safetensors"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tiny, tmp_path, capsys, shard):
    folder = copy(tiny, tmp_path)
    target = (folder / shard) if not shard.startswith("/") else tmp_path / "abs" / "outside.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / "model.safetensors", target)  # the weights are there: only the name is wrong
    from safetensors import safe_open

    with safe_open(str(target), "pt") as f:
        weight_map = {k: shard.replace("/abs", str(tmp_path / "abs")) for k in f.keys()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    load_refused(capsys, folder, "model.safetensors.index.json", repr(next(iter(weight_map.values()))),
                 "is not a file name in")
    shutil.move(target, folder / "moved.safetensors")  # the same shard, named as a hub index names it, loads
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(weight_map,
                                                                                                 "moved.safetensors")}))
    from convert import load_pretrained

    assert load_pretrained(str(folder))[0].lm_head is not None


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(mm_projector_type="identity"), ["config.json", "cannot be read", "identity"]),
    (lambda c: c.update(head_dim=0), ["config.json", "head_dim 0: expected a positive integer"]),
    (lambda c: c.update(num_key_value_heads="2"), ["config.json", "num_key_value_heads '2': expected a positive"]),
    (lambda c: c.update(mm_vision_select_layer=-40), ["config.json", "mm_vision_select_layer -40", "has 3 layers",
                                                     "-4 to 3"]),
    (lambda c: c.update(mm_vision_select_layer=4), ["config.json", "mm_vision_select_layer 4", "has 3 layers"]),
], ids=["projector type", "head_dim", "num_key_value_heads", "select layer -40", "select layer 4"])
def test_an_original_config_that_builds_no_model_is_one_line(tiny, tmp_path, capsys, change, words):
    from tiny_releases import to_original_layout

    folder = to_original_layout(tiny("llava15_llama"), tmp_path / "original", tower_dir=tmp_path / "tower",
                                shard_format="safetensors", include_tower=True)
    load_refused(capsys, edit_config(folder, change), *words)


def test_a_llava_hf_feature_layer_past_the_tower(tiny, tmp_path, capsys):
    folder = edit_config(copy(tiny, tmp_path), lambda c: c.update(vision_feature_layer=-40))
    load_refused(capsys, folder, "config.json", "vision_feature_layer -40", "vision tower has 3 layers")
    edit_config(folder, lambda c: c.update(vision_feature_layer=-4))  # hidden_states[0]: the embeddings, no layer
    from convert import load_pretrained

    assert len(load_pretrained(str(folder))[0].vision_tower.layers) == 0


def bin_folder(tiny, tmp_path, state) -> object:
    folder = copy(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("state, words", [
    ({"w": torch.zeros(2), "args": types.SimpleNamespace(lr=1)},
     ["holds Python objects other than tensors (first: types.SimpleNamespace)", "convert it to safetensors"]),
    ([torch.zeros(2)], ["holds a list, not a dict of name -> tensor"]),
], ids=["pickled object", "a list"])
def test_a_bin_holding_more_than_tensors_is_one_line(tiny, tmp_path, capsys, state, words):
    message = load_refused(capsys, bin_folder(tiny, tmp_path, state), "pytorch_model.bin", *words)
    assert "\x1b" not in message and "weights_only" not in message


# ----------------------------------------------------------------------------------------------------------------
# A stage-1 projector for load_parts (train.py --llm ... --pretrained-projector): there, and whole


@pytest.fixture
def parts(tiny, tmp_path):
    """(base LLM folder, CLIP tower folder, the stage-1 projector as an original mm_projector.bin) cut out of the
    tiny LLaVA-1.5 checkpoint, named as a base Llama, a CLIPVisionModel and the original's stage 1 write them."""
    from safetensors.torch import load_file, save_file

    src = tiny("llava15_llama")
    state, config = load_file(src / "model.safetensors"), json.loads((src / "config.json").read_text())
    llm, tower = tmp_path / "llm", tmp_path / "tower"
    llm.mkdir(), tower.mkdir()
    save_file({k.replace("language_model.", "", 1): t for k, t in state.items() if k.startswith("language_model.")},
              str(llm / "model.safetensors"))
    (llm / "config.json").write_text(json.dumps(config["text_config"]))
    save_file({k.replace("vision_tower.", "vision_model.", 1): t for k, t in state.items()
               if k.startswith("vision_tower.")}, str(tower / "model.safetensors"))
    (tower / "config.json").write_text(json.dumps(config["vision_config"]))
    projector = {f"model.mm_projector.{2 * (int(k[len('multi_modal_projector.linear_')]) - 1)}.{k.rsplit('.', 1)[1]}": t
                 for k, t in state.items() if k.startswith("multi_modal_projector.")}
    assert len(projector) == 4
    return llm, tower, projector


def test_a_stage1_projector_loads_whole(parts, tmp_path):
    from convert import load_parts

    llm, tower, projector = parts
    torch.save(projector, tmp_path / "mm_projector.bin")
    model, _ = load_parts(str(llm), str(tower), projector=str(tmp_path / "mm_projector.bin"))
    assert torch.equal(model.projector.linear_2.bias, projector["model.mm_projector.2.bias"])


def test_a_missing_projector_file_is_refused_not_trained_fresh(parts, tmp_path):
    from convert import CheckpointError, load_parts

    llm, tower, _ = parts
    with pytest.raises(CheckpointError, match=r"projector .*typo.bin: no such file or folder"):
        load_parts(str(llm), str(tower), projector=str(tmp_path / "typo.bin"))


def test_a_projector_file_with_part_of_the_projector_is_refused(parts, tmp_path):
    from convert import CheckpointError, load_parts

    llm, tower, projector = parts
    torch.save({k: t for k, t in projector.items() if ".0." in k}, tmp_path / "half.bin")
    with pytest.raises(CheckpointError, match=r"half.bin: holds no projector.linear_2.bias, projector.linear_2."
                                              r"weight; expected a whole mlp2x_gelu projector"):
        load_parts(str(llm), str(tower), projector=str(tmp_path / "half.bin"))


# ----------------------------------------------------------------------------------------------------------------
# The chat template a folder names or ships


@pytest.mark.parametrize("saved", ["vicuna_v2", ["vicuna_v1"]], ids=["unknown name", "not a string"])
def test_a_saved_template_we_do_not_have_is_one_line(tiny, tmp_path, capsys, saved):
    folder = edit_config(copy(tiny, tmp_path), lambda c: c.update(llava_template=saved))
    load_refused(capsys, folder, "config.json", f'"llava_template" {saved!r} is not one of our templates',
                 "vicuna_v1", "--template NAME")
    infer.main(["Hi", "--model", str(folder), "--max-new-tokens", "1", "--template", "llava_v1", "--json"])
    assert json.loads(capsys.readouterr().out)["output_token_ids"]  # --template still overrides it


@pytest.mark.parametrize("text, words", [
    (b"{{ messages[0]['content'] }}\xff\xfe", ["not UTF-8 text (byte 28)", "--template NAME"]),
    (("{% if x %}" * 1000 + "{% endif %}" * 1000).encode(), ["nested too deeply to compile", "--template NAME"]),
], ids=["not utf-8", "nested"])
def test_an_unreadable_chat_template_jinja_is_one_line(tiny, tmp_path, capsys, text, words):
    folder = copy(tiny, tmp_path)
    (folder / "chat_template.jinja").write_bytes(text)
    load_refused(capsys, folder, str(folder / "chat_template.jinja"), *words)


def test_a_chat_template_that_runs_too_long_or_an_unsafe_jinja_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """A shipped template is rendered at load (to learn its format): loops inside loops, which the sandbox's range()
    bound lets through (10^10 steps), stop at the deadline; a jinja2 with known sandbox escapes renders nothing."""
    import time

    import jinja2

    import chat_template

    folder = copy(tiny, tmp_path)
    (folder / "chat_template.jinja").write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                                "{% endfor %}{{ messages[0]['content'] }}")
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    start = time.monotonic()
    load_refused(capsys, folder, str(folder / "chat_template.jinja"), "ran past 0.5 s", "--template NAME")
    assert time.monotonic() - start < 30
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    monkeypatch.setattr(jinja2, "__version__", "3.1.4")
    load_refused(capsys, folder, str(folder / "chat_template.jinja"), "known escapes (fixed in 3.1.6)",
                 "pip install -U jinja2")


def test_onevision_nested_configs_without_model_type_read_as_transformers_reads_them(tiny, tmp_path):
    """transformers' LlavaOnevisionConfig gives a nested text_config / vision_config without "model_type" qwen2 and
    siglip_vision_model (LlavaNext's: llama and clip_vision_model): the folder loads as the one that spells them."""
    from convert import load_pretrained

    whole, _ = load_pretrained(str(tiny("onevision_qwen2")))
    folder = edit_config(copy(tiny, tmp_path, "onevision_qwen2"),
                         lambda c: (c["text_config"].pop("model_type"), c["vision_config"].pop("model_type")))
    bare, _ = load_pretrained(str(folder))
    assert (bare.cfg.text, bare.cfg.vision) == (whole.cfg.text, whole.cfg.vision)
    assert (bare.cfg.text.family, bare.cfg.vision.kind) == ("qwen2", "siglip")
    import transformers  # the oracle reads the same folder so

    theirs = transformers.AutoConfig.from_pretrained(str(folder))
    assert (theirs.text_config.model_type, theirs.vision_config.model_type) == ("qwen2", "siglip_vision_model")
