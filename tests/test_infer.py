"""The command line: `python infer.py IMAGE... PROMPT` streams only the answer to stdout; --json prints one object
whose ids and counts are the model's own; bad input ends with one clear line."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, photo

import infer
from anyres import process_image
from convert import load_pretrained, load_tokenizer
from data import render_prompt, tokenize
from model import IMAGE_TOKEN


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    photo(70, 30, seed=7).save(path)
    return path


def test_json_output_matches_the_model(tiny, image_file, capsys):
    folder = tiny("onevision_qwen2")
    infer.main([str(image_file), "What is it?", "--model", str(folder), "--json", "--max-new-tokens", "6", "--ignore-eos"])
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert set(result) == {"answer", "prompt_token_ids", "output_token_ids", "image_tokens", "timings"}

    model, _ = load_pretrained(str(folder))
    tokenizer = load_tokenizer(folder, str(folder))
    image = process_image(photo(70, 30, seed=7), model.cfg)
    prompt = render_prompt("qwen_1_5", [("user", "<image>\nWhat is it?")])
    expected = list(infer.generate(model, tokenize(tokenizer, prompt, [image.num_tokens]), [image], max_new_tokens=6))
    assert result["output_token_ids"] == expected and len(expected) == 6
    assert result["image_tokens"] == [image.num_tokens]
    assert result["prompt_token_ids"] == tokenize(tokenizer, prompt, [1])  # one IMAGE_TOKEN per image
    assert result["prompt_token_ids"].count(IMAGE_TOKEN) == 1
    assert result["answer"] == tokenizer.decode(expected).strip()


def test_stdout_carries_only_the_streamed_answer(tiny, image_file):
    folder = tiny("next_llama")
    args = [sys.executable, "infer.py", str(image_file), "Describe.", "--model", str(folder), "--max-new-tokens", "5",
            "--ignore-eos", "--template", "llava_v1"]
    plain = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    as_json = json.loads(subprocess.run(args + ["--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert plain.stdout.strip() == as_json["answer"]
    assert "prefill" in plain.stderr and "prefill" not in plain.stdout


def test_missing_image_is_one_clear_line(tiny, tmp_path):
    with pytest.raises(SystemExit, match=r"cannot read image '.*nope.jpg'"):
        infer.main([str(tmp_path / "nope.jpg"), "Hi", "--model", str(tiny("next_llama"))])


def test_more_placeholders_than_images_is_an_error(tiny, image_file):
    with pytest.raises(SystemExit, match="2 <image> placeholders but 1 images"):
        infer.main([str(image_file), "<image> and <image>?", "--model", str(tiny("next_llama"))])


def test_unknown_model_name_says_what_it_accepts():
    with pytest.raises(SystemExit, match="neither a folder, a short name"):
        infer.main(["Hi", "--model", "no-such-model"])
