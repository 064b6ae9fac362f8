"""The chat format a checkpoint ships decides: every released llava-hf template names its family, a Mistral
checkpoint whose tokenizer spells [INST] in pieces gets mistral_instruct in infer.py and in the export (which keeps
the source's template file byte for byte), an unknown template is one error line, and a folder with no template
falls back to the special-token guess and says so."""

import json
import shutil

import pytest

import tiny_releases as tr
from chat_template import default_template, jinja_renderer, load_tokenizer, matching_templates
from data import TEMPLATES
from export import jinja_template
from export import main as convert_main


@pytest.mark.parametrize("name, model_type, template, kind, family", tr.RELEASED_CHAT_TEMPLATES,
                         ids=[r[0] for r in tr.RELEASED_CHAT_TEMPLATES])
def test_every_released_template_names_its_family(tmp_path, name, model_type, template, kind, family):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert default_template(str(tmp_path), tr.special_tokens_tokenizer(kind), tmp_path) == family
    # only the families that render alike without their system sentence (which the llava-hf files leave out) match
    alike = [{"vicuna_v1", "llava_v1"}, {"chatml_direct", "qwen_1_5"}]
    assert set(matching_templates(template)) == next((s for s in alike if family in s), {family})


def test_the_released_mistral_template_has_its_quirk():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}]
    assert jinja_renderer(tr.MISTRAL_HF)(messages) == "[INST] Hi [/INST] Yo<\\s> "


@pytest.mark.parametrize("template", sorted(set(TEMPLATES) - {"plain", "qwen_2"}))
def test_our_exported_templates_name_themselves_only(template):
    """What convert.py writes is read back as the same template, and as no other family."""
    bos = "<s>" if template in ("vicuna_v1", "mistral_instruct") else None
    found = matching_templates(jinja_template(template, bos))
    chatml, vicuna = {"chatml_direct", "qwen_1_5"}, {"vicuna_v1", "llava_v1"}  # alike but for the system sentence
    alike = {"chatml_direct": chatml, "qwen_1_5": chatml, "vicuna_v1": vicuna, "llava_v1": vicuna}
    assert template in found and set(found) <= alike.get(template, {template})


def test_a_named_template_list_takes_the_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ messages }}"}, {"name": "default", "template": tr.LLAMA3_HF}]}))
    assert default_template(str(tmp_path), tr.special_tokens_tokenizer("llama3"), tmp_path) == "llava_llama_3"


def mistral_with_released_template(tiny, tmp_path, file="chat_template.json"):
    folder = tr.with_chat_template(tiny("next_mistral"), tmp_path / "mistral-hf", tr.MISTRAL_HF, file)
    tokenizer = load_tokenizer(folder, str(folder))
    # the real Mistral-7B-Instruct-v0.2 tokenizer is SentencePiece-derived: [INST] is several pieces, no token
    assert tokenizer.token_to_id("[INST]") is None
    assert len(tokenizer.encode("[INST]", add_special_tokens=False).ids) > 1
    return folder


@pytest.mark.parametrize("file", ["chat_template.json", "chat_template.jinja", "tokenizer_config.json"])
def test_a_mistral_checkpoint_reads_as_mistral_instruct(tiny, tmp_path, file, capsys):
    import infer

    folder = mistral_with_released_template(tiny, tmp_path, file)
    args = infer.parse_args(["Hi", "--model", str(folder)])
    assert infer.load_model(args, "cpu", __import__("torch").float32, [])[3] == "mistral_instruct"
    assert "note:" not in capsys.readouterr().err  # no guess was needed
    # without the file, the special tokens alone would have said vicuna_v1 (no [INST] token)
    assert default_template(str(tiny("next_mistral")), load_tokenizer(folder, str(folder))) == "vicuna_v1"


def test_the_export_keeps_the_source_template_byte_for_byte(tiny, tmp_path):
    folder = mistral_with_released_template(tiny, tmp_path)
    convert_main([str(folder), str(tmp_path / "out")])
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["llava_template"] == "mistral_instruct"
    assert (out / "chat_template.json").read_bytes() == (folder / "chat_template.json").read_bytes()
    assert not (out / "chat_template.jinja").exists()  # ours is not shipped beside it
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tr.MISTRAL_HF
    from transformers import AutoTokenizer  # the consumer reads the released template back

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tr.MISTRAL_HF


def test_an_unknown_template_is_one_error_line(tiny, tmp_path, capsys):
    import infer

    folder = tr.with_chat_template(tiny("next_llama"), tmp_path / "odd", "{% for m in messages %}<<{{ m['role'] }}>>"
                                   "{% endfor %}")
    with pytest.raises(SystemExit) as e:
        infer.main(["Hi", "--model", str(folder), "--max-new-tokens", "1"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert str(folder / "chat_template.json") in message and "--template NAME" in message
    with pytest.raises(SystemExit, match=r"chat_template.json.*--template NAME"):
        convert_main([str(folder), str(tmp_path / "out")])
    # --template always wins over the file
    args = infer.parse_args(["Hi", "--model", str(folder), "--template", "llava_v1"])
    assert infer.load_model(args, "cpu", __import__("torch").float32, [])[3] == "llava_v1"


def test_the_cli_exits_non_zero_on_an_unknown_template(tiny, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    folder = tr.with_chat_template(tiny("next_llama"), tmp_path / "odd", "{{ messages | length }}")
    done = subprocess.run([sys.executable, "infer.py", "Hi", "--model", str(folder)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(f"error: {folder}")


def test_no_template_falls_back_to_the_special_tokens_and_says_so(tiny, tmp_path, capsys):
    folder = tmp_path / "plain"
    shutil.copytree(tiny("next_qwen2"), folder)
    tokenizer = load_tokenizer(folder, str(folder))
    assert default_template(str(folder), tokenizer, folder) == "qwen_1_5"
    err = capsys.readouterr().err
    assert "ships no chat template; template qwen_1_5, from its special tokens (<|im_start|> and <|endoftext|>" in err


def test_a_preset_whose_file_matches_nothing_keeps_its_table_entry(tmp_path, capsys):
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}")
    tokenizer = tr.special_tokens_tokenizer("llama")
    assert default_template("llava-v1.6-mistral-7b", tokenizer, tmp_path) == "mistral_instruct"
    assert "chat_template.jinja: its chat template renders none of ours; using the preset's" in capsys.readouterr().err
