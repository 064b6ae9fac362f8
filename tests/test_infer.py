"""The command line: `python infer.py IMAGE... PROMPT` streams only the answer to stdout; --json prints one object
whose ids and counts are the model's own; bad input ends with one clear line."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, photo

import generate as generation

import data
import infer
from anyres import process_image
from convert import load_pretrained
from chat_template import load_tokenizer
from data import render_prompt, tokenize
from model import IMAGE_TOKEN


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    photo(70, 30, seed=7).save(path)
    return path


def test_json_output_matches_the_model(tiny, image_file, capsys):
    folder = tiny("onevision_qwen2")
    infer.main([str(image_file), "What is it?", "--model", str(folder), "--json", "--max-new-tokens", "6",
                "--ignore-eos"])
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert set(result) == {"answer", "prompt_token_ids", "output_token_ids", "image_tokens", "timings"}

    model, _ = load_pretrained(str(folder))
    tokenizer = load_tokenizer(folder, str(folder))
    image = process_image(photo(70, 30, seed=7), model.cfg)
    prompt = render_prompt("qwen_1_5", [("user", "<image>\nWhat is it?")])
    expected = list(generation.generate(model, tokenize(tokenizer, prompt, [image.num_tokens]), [image],
                                        max_new_tokens=6))
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
    with pytest.raises(SystemExit, match=r"missing image: .*nope.jpg"):
        infer.main([str(tmp_path / "nope.jpg"), "Hi", "--model", str(tiny("next_llama"))])


def test_more_placeholders_than_images_is_an_error(tiny, image_file):
    with pytest.raises(SystemExit, match="2 <image> and 0 <video> placeholders for 1 images and 0 videos"):
        infer.main([str(image_file), "<image> and <image>?", "--model", str(tiny("next_llama"))])


def test_placement_rules():
    # placeholders are honoured; visuals without one go in front, the video first
    assert data.place_visuals("What changed between <image> and <image>?", 2, False) == (
        "What changed between <image> and <image>?", ["image", "image"])
    assert data.place_visuals("Compare.", 2, False) == ("<image>\n<image>\nCompare.", ["image", "image"])
    assert data.place_visuals("Is <image> in the clip?", 1, True) == (
        "<image>\nIs <image> in the clip?", ["video", "image"])
    assert data.place_visuals("Is <image> in <video>?", 1, True) == ("Is <image> in <image>?", ["image", "video"])


def test_two_images_and_a_video_from_the_command_line(tiny, tmp_path, capsys):
    """Two images interleaved in the prompt, then a GIF video: the ids and answer equal the same request built by
    hand (images padded to one crop each, 82 tokens in the tiny OneVision; 3 frames x 25 + 1 for the video)."""
    folder = tiny("onevision_qwen2")
    a, b = photo(50, 30, seed=1), photo(30, 60, seed=2)
    a.save(tmp_path / "a.png"), b.save(tmp_path / "b.png")
    frames = [photo(40, 40, seed=s) for s in (3, 4, 5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    infer.main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "Between <image> and <image>, what moves in <video>?",
                "--video", str(tmp_path / "clip.gif"), "--frames", "3", "--model", str(folder), "--json",
                "--max-new-tokens", "5", "--ignore-eos"])
    result = json.loads(capsys.readouterr().out)
    assert result["image_tokens"] == [82, 82, 3 * 25 + 1]

    from anyres import process_images, process_video
    from data import load_video

    model, _ = load_pretrained(str(folder))
    tokenizer = load_tokenizer(folder, str(folder))
    gif = load_video(tmp_path / "clip.gif", 3)
    assert len(gif) == 3 and all(f.size == (40, 40) for f in gif)  # GIF frames are palette-quantised copies
    visuals = process_images([a, b], model.cfg) + [process_video(gif, model.cfg)]
    prompt = render_prompt("qwen_1_5", [("user", "Between <image> and <image>, what moves in <image>?")])
    expected = list(generation.generate(model, tokenize(tokenizer, prompt, [v.num_tokens for v in visuals]), visuals,
                                   max_new_tokens=5))
    assert result["output_token_ids"] == expected


def test_a_video_format_without_its_reader_says_what_to_install(tiny, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="needs PyAV \\(pip install av\\)"):
            infer.main(["Hi", "--video", str(tmp_path / "clip.mp4"), "--model", str(tiny("onevision_qwen2"))])
    else:
        with pytest.raises(SystemExit, match="unreadable video"):
            infer.main(["Hi", "--video", str(tmp_path / "clip.mp4"), "--model", str(tiny("onevision_qwen2"))])


def test_unknown_model_name_says_what_it_accepts():
    with pytest.raises(SystemExit, match="neither a folder, a short name"):
        infer.main(["Hi", "--model", "no-such-model"])
