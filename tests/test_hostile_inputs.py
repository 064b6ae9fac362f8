"""Hostile input: every bad image, video, flag, prompt, checkpoint, data file or row ends with ONE line starting
"error: " that names the file / flag / field and says what was expected, a non-zero exit and no traceback; bad
rows are counted as bad samples naming the row and the key. And the valid-but-unusual images are answered.

Most cases run the command in-process (infer.main / train.main / data.load_records) for speed: sys.exit(message)
is exit status 1 with the message on stderr. A few run as real processes to show what a user sees."""

import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import ROOT, photo
from PIL import Image
from test_train import dataset  # noqa: F401 (a fixture)

import infer
from data import MAX_IMAGE_PIXELS, SampleError, SupervisedDataset, load_image, load_records


def refused(capsys, run, *words) -> str:
    """`run` must end the program with exit status 1 and one line "error: ..." holding each of `words`."""
    with pytest.raises(SystemExit) as e:
        run()
    message = e.value.code
    assert isinstance(message, str), f"exit code {message!r}: expected a message, which exits with status 1"
    assert message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert "Traceback" not in capsys.readouterr().err
    return message


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with no pixel data: decoding it would fail."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    photo(40, 30).save(d / "ok.png")
    (d / "bomb.png").write_bytes(png_declaring(60000, 60000))  # 3.6G pixels: past Pillow's own limit
    (d / "big.png").write_bytes(png_declaring(12000, 12000))  # 144M pixels: past ours (134M), under Pillow's
    jpeg = d / "full.jpg"
    photo(64, 64).save(jpeg)
    (d / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    (d / "text.png").write_text("this is not an image\n")
    (d / "empty.jpg").write_bytes(b"")
    (d / "folder.png").mkdir()
    (d / "noframes").mkdir()
    (d / "noframes" / "notes.txt").write_text("no frames here")
    (d / "broken.gif").write_bytes(b"GIF89a\x10\x00\x10\x00" + b"\x00" * 5)
    (d / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return d


# ----------------------------------------------------------------------------------------------------------------
# infer.py: images, videos, prompts and generation flags, all refused before the model is loaded

INFER_CASES = [  # (case, arguments after the model, words the message must hold)
    ("missing image", ["{d}/nope.jpg", "Hi"], ["missing image", "nope.jpg", "check the path"]),
    ("decompression bomb", ["{d}/bomb.png", "Hi"], ["image too large", "bomb.png", "resize it"]),
    ("over our pixel limit", ["{d}/big.png", "Hi"], ["image too large", "12000 x 12000", f"{MAX_IMAGE_PIXELS:,}"]),
    ("truncated jpeg", ["{d}/truncated.jpg", "Hi"], ["unreadable image", "truncated.jpg"]),
    ("text file as png", ["{d}/text.png", "Hi"], ["unreadable image", "text.png", "complete image file"]),
    ("empty file", ["{d}/empty.jpg", "Hi"], ["unreadable image", "empty.jpg"]),
    ("folder as image", ["{d}/folder.png", "Hi"], ["unreadable image", "is a folder"]),
    ("prompt forgotten", ["{d}/ok.png", "{d}/ok.png"], ["ok.png", "is an image file", "prompt goes last"]),
    ("too many placeholders", ["{d}/ok.png", "<image> and <image>"], ["2 <image>", "for 1 images"]),
    ("video placeholder, no video", ["What is in <video>?"], ["<video> placeholders", "0 videos"]),
    ("missing video", ["Hi", "--video", "{d}/nope.gif"], ["missing video", "nope.gif"]),
    ("frame folder without frames", ["Hi", "--video", "{d}/noframes"], ["unreadable video", "holds no"]),
    ("broken gif video", ["Hi", "--video", "{d}/broken.gif"], ["unreadable video", "broken.gif"]),
    ("bomb as video", ["Hi", "--video", "{d}/big.png"], ["image too large", "big.png"]),
    ("frames 0", ["Hi", "--video", "{d}/ok.png", "--frames", "0"], ["--frames 0", ">= 1"]),
    ("frames negative", ["Hi", "--frames", "-3"], ["--frames -3", ">= 1"]),
    ("max-new-tokens negative", ["Hi", "--max-new-tokens", "-5"], ["--max-new-tokens -5", ">= 1"]),
    ("max-new-tokens 0", ["Hi", "--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
    ("max-new-tokens not a number", ["Hi", "--max-new-tokens", "lots"], ["--max-new-tokens", "invalid int value"]),
    ("temperature negative", ["Hi", "--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    ("temperature nan", ["Hi", "--temperature", "nan"], ["--temperature nan", ">= 0"]),
    ("temperature inf", ["Hi", "--temperature", "inf"], ["--temperature inf", ">= 0"]),
    ("top-p above 1", ["Hi", "--top-p", "1.5"], ["--top-p 1.5", "0 < p <= 1"]),
    ("top-p 0", ["Hi", "--top-p", "0"], ["--top-p 0.0", "0 < p <= 1"]),
    ("top-p nan", ["Hi", "--top-p", "nan"], ["--top-p nan", "0 < p <= 1"]),
    ("unknown flag", ["Hi", "--beam-size", "4"], ["unrecognized arguments: --beam-size", "--help"]),
    ("unknown template", ["Hi", "--template", "alpaca"], ["--template", "invalid choice: 'alpaca'"]),
    ("unknown compat", ["Hi", "--compat", "vllm"], ["--compat", "invalid choice"]),
    ("device name", ["Hi", "--device", "gpu0"], ["--device 'gpu0'", "cpu, cuda"]),
    ("absent device", ["Hi", "--device", "cuda:99"], ["--device cuda:99", "no such device"]),
]


@pytest.mark.parametrize("case, args, words", INFER_CASES, ids=[c[0] for c in INFER_CASES])
def test_infer_refuses(tiny, files, capsys, case, args, words):
    argv = [a.format(d=files) for a in args] + ["--model", str(tiny("next_llama"))]
    refused(capsys, lambda: infer.main(argv), *words)


def test_a_strip_whose_padded_square_is_too_large(tiny, tmp_path, capsys):
    """1 x 20000 pixels is small, padded to a square (LLaVA-1.5's "pad") 4 x 10^8: refused before it is allocated."""
    from PIL import Image

    Image.new("RGB", (1, 20000), "red").save(tmp_path / "strip.png")
    refused(capsys, lambda: infer.main([str(tmp_path / "strip.png"), "Hi", "--model", str(tiny("llava15_llama"))]),
            "1 x 20000 image padded to a square", "20000 x 20000 pixels", "crop or resize it first")


def test_a_video_format_without_its_reader(tiny, files, capsys):
    try:
        import av  # noqa: F401
        words = ["unreadable video", "clip.mp4"]
    except ImportError:
        words = ["clip.mp4", "needs PyAV (pip install av)"]
    refused(capsys, lambda: infer.main(["Hi", "--video", str(files / "clip.mp4"), "--model", str(tiny("next_llama"))]),
            *words)


def test_a_bomb_is_refused_from_its_header_alone(files):
    """The bomb files hold no pixel data at all: decoding them would be "unreadable image", so "image too large"
    shows the size was refused before any decoding."""
    for name in ("bomb.png", "big.png"):
        with pytest.raises(SampleError) as e:
            load_image(files / name)
        assert e.value.kind == "image too large"
    with pytest.raises(SampleError, match="unreadable image"):
        load_image(files / "truncated.jpg")


# ----------------------------------------------------------------------------------------------------------------
# The context window: a prompt (its image tokens included) that fills it is refused; generation is cut to it


def with_window(tiny, tmp_path, window: int):
    folder = shutil.copytree(tiny("next_llama"), tmp_path / "small-window")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = window
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_prompt_longer_than_the_context_window(tiny, tmp_path, capsys):
    folder = with_window(tiny, tmp_path, 64)
    message = refused(capsys, lambda: infer.main(["Hi " * 100, "--model", str(folder)]),
                      "max_position_embeddings", "reads at most 64", "(0 of them for the images", "shorten the prompt")
    assert int(message.split("the prompt is ")[1].split()[0]) > 100


def test_image_tokens_count_against_the_window(tiny, tmp_path, files, capsys):
    folder = with_window(tiny, tmp_path, 150)  # the 40x30 photo alone takes 199 tokens in the tiny NeXT
    refused(capsys, lambda: infer.main([str(files / "ok.png"), "Hi", "--model", str(folder)]),
            "(199 of them for the images", "reads at most 150", "fewer or smaller images")


def test_generation_stops_at_the_context_window(tiny, tmp_path, capsys):
    folder = with_window(tiny, tmp_path, 4096)
    infer.main(["Hi", "--model", str(folder), "--json", "--max-new-tokens", "3", "--ignore-eos"])
    prompt_tokens = len(json.loads(capsys.readouterr().out)["prompt_token_ids"])
    folder = with_window(tiny, tmp_path / "again", prompt_tokens + 2)
    infer.main(["Hi", "--model", str(folder), "--json", "--max-new-tokens", "10", "--ignore-eos"])
    out = capsys.readouterr()
    assert len(json.loads(out.out)["output_token_ids"]) == 2
    assert "generating at most 2" in out.err


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint folders: each broken file named, with what to do


def broken_copy(tiny, tmp_path, edit):
    folder = shutil.copytree(tiny("next_llama"), tmp_path / "broken")
    edit(folder)
    return folder


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(change):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    return edit


def split_into_two_shards(folder, keep_second: bool):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for i, (name, part) in enumerate(halves.items()):
        if i == 0 or keep_second:
            save_file({k: tensors[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


CHECKPOINT_CASES = [
    ("config.json not JSON",
     lambda f: (f / "config.json").write_text('{\n  "model_type": "llava_next",\n  "text_config": {,}\n}'),
     ["config.json", "not valid JSON at line 3", "download it again"]),
    ("config.json a list", lambda f: (f / "config.json").write_text("[1, 2]"),
     ["config.json", "expected a JSON object"]),
    ("config.json field of the wrong type", edit_config(lambda c: c["text_config"].update(hidden_size="big")),
     ["config.json", "hidden_size 'big'", "expected a positive integer"]),
    ("config.json pinpoints unreadable", edit_config(lambda c: c.update(image_grid_pinpoints="336 by 672")),
     ["config.json", "cannot be read as a LLaVA", "compare it with the released"]),
    ("weights that do not match the config", edit_config(lambda c: c["text_config"].update(intermediate_size=96)),
     ["model.safetensors", "has shape", "the config implies"]),
    ("safetensors cut in half", lambda f: cut_in_half(f / "model.safetensors"),
     ["model.safetensors", "not a complete safetensors file", "download it again"]),
    ("safetensors empty", lambda f: (f / "model.safetensors").write_bytes(b""),
     ["model.safetensors", "not a complete"]),
    ("index names a missing shard", lambda f: split_into_two_shards(f, keep_second=False),
     ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "which is not in", "download"]),
    ("index not JSON", lambda f: (split_into_two_shards(f, True), (f / "model.safetensors.index.json").write_text("{")),
     ["model.safetensors.index.json", "not valid JSON at line 1"]),
    ("index without weight_map",
     lambda f: (split_into_two_shards(f, True), (f / "model.safetensors.index.json").write_text("{}")),
     ["model.safetensors.index.json", "weight_map"]),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), ["no model.safetensors"]),
    ("no config.json", lambda f: (f / "config.json").unlink(), ["no config.json", "model folder"]),
    ("tokenizer.json broken", lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": 7}'),
     ["tokenizer.json", "not a readable tokenizer.json", "download it again"]),
    ("generation_config.json not JSON", lambda f: (f / "generation_config.json").write_text("eos = 2"),
     ["generation_config.json", "not valid JSON"]),
]


@pytest.mark.parametrize("case, edit, words", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_checkpoints_are_named(tiny, tmp_path, capsys, case, edit, words):
    folder = broken_copy(tiny, tmp_path, edit)
    refused(capsys, lambda: infer.main(["Hi", "--model", str(folder), "--max-new-tokens", "2"]), *words)


def test_a_split_checkpoint_with_every_shard_loads(tiny, tmp_path, capsys):
    """The index cases above are broken only where they say: with both shards present the same split loads."""
    folder = broken_copy(tiny, tmp_path, lambda f: split_into_two_shards(f, keep_second=True))
    infer.main(["Hi", "--model", str(folder), "--json", "--max-new-tokens", "2", "--ignore-eos"])
    assert len(json.loads(capsys.readouterr().out)["output_token_ids"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# Data files: the file and line; records that are not objects


DATA_CASES = [  # (case, file name, content, words)
    ("missing file", None, None, ["absent.json", "no such file", "--data takes"]),
    ("JSON broken on line 3", "data.json", '[\n {"id": 1},\n {"id": 2,,}\n]', ["data.json:3:", "not valid JSON"]),
    ("JSONL broken on line 2", "data.jsonl", '{"id": 1}\n{"id": 2\n{"id": 3}\n', ["data.jsonl:2:", "not valid JSON"]),
    ("a JSON number", "data.json", "42", ["data.json", "expected a JSON list of samples", "found a int"]),
    ("a record that is a string", "data.json", '[{"id": 1, "conversations": []}, "oops"]',
     ["data.json", "sample 1 is a str", "\"conversations\""]),
    ("binary file", "data.json", b"\xff\xfe\x00\x81garbage", ["data.json", "UTF-8 text file"]),
    ("mixture entry without json_path", "mix.json", '{"datasets": [{"sampling_strategy": "all"}]}',
     ["mix.json", "datasets[0]", "json_path"]),
    ("mixture with a bad strategy", "mix.json",
     '{"datasets": [{"json_path": "part.json", "sampling_strategy": "first:lots"}]}',
     ["mix.json", "datasets[0] sampling_strategy 'first:lots'", "first:N"]),
    ("mixture asking for more than there is", "mix.json",
     '{"datasets": [{"json_path": "part.json", "sampling_strategy": "end:9"}]}',
     ["mix.json", "0 <= N <= 2"]),
]


@pytest.mark.parametrize("case, name, content, words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(tmp_path, capsys, case, name, content, words):
    (tmp_path / "part.json").write_text('[{"id": "a"}, {"id": "b"}]')
    path = tmp_path / (name or "absent.json")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    refused(capsys, lambda: load_records(path), *words)


def test_train_names_the_broken_data_file(tiny, tmp_path, capsys):
    import train

    (tmp_path / "data.json").write_text('[{"id": 1}\n{"id": 2}]')
    refused(capsys, lambda: train.main(["--model", str(tiny("next_qwen2")), "--data", str(tmp_path / "data.json"),
                                        "--output-dir", str(tmp_path / "run")]),
            "data.json:2:1", "not valid JSON")


# ----------------------------------------------------------------------------------------------------------------
# Rows: unusable samples are reported with their id and the key at fault (and counted, not trained on)

CHAT = [{"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat"}]
ROWS = [  # (record, error kind, words of the detail)
    ({"id": "r1", "image": "ok.png"}, "missing conversations", ['"conversations"']),
    ({"id": "r2", "image": "ok.png", "conversations": "hello"}, "malformed turn", ['"conversations" is a str']),
    ({"id": "r3", "image": "ok.png", "conversations": [CHAT[0], "a cat"]}, "malformed turn",
     ["conversations[1] is a str"]),
    ({"id": "r4", "image": "ok.png", "conversations": [CHAT[0], {"from": "gpt"}]}, "malformed turn",
     ['conversations[1]', '"value"']),
    ({"id": "r5", "image": "ok.png", "conversations": [{"from": "robot", "value": "hi"}, CHAT[1]]}, "malformed turn",
     ['conversations[0]', '"from"']),
    ({"id": "r6", "image": 7, "conversations": CHAT}, "malformed image field", ['"image" is 7']),
    ({"id": "r7", "video": ["a", "b"], "conversations": CHAT}, "malformed video field", ['"video" is']),
    ({"id": "r8", "image": "bomb.png", "conversations": CHAT}, "image too large", ["bomb.png"]),
    ({"id": "r9", "image": "text.png", "conversations": CHAT}, "unreadable image", ["text.png"]),
]


def test_bad_rows_name_the_row_and_the_key(tiny, files):
    from convert import load_pretrained
    from chat_template import load_tokenizer

    folder = tiny("next_qwen2")
    model, _ = load_pretrained(str(folder))
    records = [r for r, _, _ in ROWS] + [{"id": "good", "image": "ok.png", "conversations": CHAT}]
    dataset = SupervisedDataset(records, files, load_tokenizer(folder, str(folder)), "qwen_1_5", model.cfg, max_len=600)
    assert dataset.modality_lengths()[:3] == [0, 0, 4]  # malformed rows do not break the length estimate
    for i, (record, kind, words) in enumerate(ROWS):
        sample = dataset[i]
        assert (sample["id"], sample["error"]) == (record["id"], kind)
        assert all(w in sample["detail"] for w in words), sample["detail"]
    assert "error" not in dataset[len(ROWS)]


def test_a_mostly_broken_data_set_stops_at_its_first_batch(tiny, files, tmp_path, capsys):
    """36 of 40 samples unusable: the run stops after the first global batch of 4, before any optimizer step,
    and says which samples and why."""
    from train import TrainConfig, train

    records = [{"id": f"bad{i}", "image": "nope.png", "conversations": CHAT} for i in range(36)]
    records += [{"id": f"good{i}", "image": "ok.png", "conversations": CHAT} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = TrainConfig(model=str(tiny("next_qwen2")), data=str(tmp_path / "data.json"), image_folder=str(files),
                      output_dir=str(tmp_path / "run"), global_batch_size=4, micro_batch_size=2, max_len=600,
                      group_by_modality_length=False, quiet=True)
    message = refused(capsys, lambda: train(cfg), "of 4 samples could not be used", "--max-bad-fraction 0.01",
                      "'missing image'", "first ids: ['bad", ": missing image")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    assert int(message.split("error: ")[1].split()[0]) >= 3


# ----------------------------------------------------------------------------------------------------------------
# As a user sees it: real processes, exit status 1, the one line last on stderr, nothing on stdout


@pytest.mark.parametrize("args, words", [
    (["{d}/bomb.png", "Describe."], "image too large"),
    (["Hi", "--top-p", "many"], "invalid float value"),
])
def test_as_a_process(tiny, files, args, words):
    argv = [sys.executable, "infer.py", *[a.format(d=files) for a in args], "--model", str(tiny("next_llama"))]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and words in done.stderr


def test_a_cut_checkpoint_as_a_process(tiny, tmp_path):
    folder = broken_copy(tiny, tmp_path, lambda f: cut_in_half(f / "model.safetensors"))
    done = subprocess.run([sys.executable, "infer.py", "Hi", "--model", str(folder)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: {folder / 'model.safetensors'}: not a complete safetensors file "
                                   f"(Error while deserializing header: incomplete metadata, file not fully covered); "
                                   f"the download was probably cut short: download it again")


# ----------------------------------------------------------------------------------------------------------------
# Valid but unusual images: answered, with the pixels they show


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    d = tmp_path_factory.mktemp("unusual")
    p = photo(60, 40, seed=5)
    p.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.full((40, 60), 32896, dtype=np.uint16)).save(d / "gray16.png")  # 16-bit mid grey (0x8080)
    p.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(d / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    p.save(d / "exif.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    photo(1, 4000).save(d / "tall.png")
    photo(4000, 1).save(d / "wide.png")
    frames = [photo(40, 40, seed=s) for s in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    p.save(d / "x.webp"), p.save(d / "x.bmp"), p.save(d / "x.tiff"), p.save(d / "UPPER.JPG"), p.save(d / "UPPER.PNG")
    p.convert("RGBA").save(d / "rgba.png")
    p.convert("LA").save(d / "la.png")
    return d


UNUSUAL = {  # file -> size after loading (EXIF orientation 6 swaps width and height)
    "cmyk.jpg": (60, 40), "gray16.png": (60, 40), "palette.png": (60, 40), "exif.jpg": (40, 60), "one.png": (1, 1),
    "tall.png": (1, 4000), "wide.png": (4000, 1), "anim.gif": (40, 40), "x.webp": (60, 40), "x.bmp": (60, 40),
    "x.tiff": (60, 40), "UPPER.JPG": (60, 40), "UPPER.PNG": (60, 40), "rgba.png": (60, 40), "la.png": (60, 40),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_images_load_as_rgb(unusual, name):
    image = load_image(unusual / name)
    assert image.mode == "RGB" and image.size == UNUSUAL[name]
    if name == "gray16.png":  # scaled to 8 bits, not clipped to white
        assert np.asarray(image).min() == np.asarray(image).max() == 128
    if name == "one.png":
        assert np.asarray(image).tolist() == [[[200, 10, 10]]]


@pytest.mark.parametrize("model", ["next_llama", "onevision_qwen2"])
def test_unusual_images_are_answered(tiny, unusual, capsys, model):
    """All of them in one prompt (each on its own line, in front), through AnyRes (NeXT) and anyres_max_9 /
    several-image padding (OneVision): an answer, and token counts equal to processing the loaded images."""
    from anyres import process_images
    from convert import load_pretrained

    paths = [str(unusual / name) for name in sorted(UNUSUAL)]
    infer.main(paths + ["What differs?", "--model", str(tiny(model)), "--json", "--max-new-tokens", "2",
                        "--ignore-eos"])
    result = json.loads(capsys.readouterr().out)
    cfg = load_pretrained(str(tiny(model)))[0].cfg
    assert result["image_tokens"] == [im.num_tokens for im in process_images([load_image(p) for p in paths], cfg)]
    assert len(result["output_token_ids"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints handed to --resume: DCP's .metadata is a pickle, and DCP loads a non-tensor entry with
# torch.load with weights_only off; each crafted file below runs code (or reads outside the folder) without the checks


def binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def makedirs_pickle(module: str, name: str, target) -> bytes:
    """Protocol 4, by hand: STACK_GLOBAL (module, name) finds the function (a dotted name through attributes, e.g.
    a module's own `import os`); then REDUCE calls it on `target`."""
    return b"\x80\x04" + binunicode(module) + binunicode(name) + b"\x93" + binunicode(str(target)) + b"\x85R."


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A real 2-step run of train.py (its checkpoint step-0000002), for the crafted copies below."""
    from test_train import config

    import train

    out = tmp_path_factory.mktemp("trained")
    train.train(config(dataset, out, max_steps=2, save_every=2, stop_after=2))
    return out / "run"


def resume_argv(dataset, run):
    root, model = dataset
    return ["--model", str(model), "--data", str(root / "data.json"), "--image-folder", str(root / "images"),
            "--output-dir", str(run), "--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4",
            "--quiet", "--template", "qwen_1_5", "--max-len", "512", "--device", "cpu", "--resume"]


def craft_bytes_entry(trainer, sentinel):
    """One model entry becomes a bytes entry whose payload (a pickle, which DCP hands to torch.load) makes a folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    meta = pickle.loads((trainer / ".metadata").read_bytes())
    payload = makedirs_pickle("os", "makedirs", sentinel)
    (trainer / "evil.distcp").write_bytes(payload)
    meta.state_dict_metadata["model.image_newline"] = BytesStorageMetadata()
    meta.storage_data[MetadataIndex("model.image_newline")] = _StorageInfo("evil.distcp", 0, len(payload))
    (trainer / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


def craft_storage_path(trainer, where: str):
    """The tensors' file moves out of the checkpoint; the metadata points at it there (relative, absolute, symlink)."""
    meta = pickle.loads((trainer / ".metadata").read_bytes())
    outside = trainer.parent.parent / "outside.distcp"
    (trainer / "__0_0.distcp").rename(outside)
    if where == "symlink":
        (trainer / "__0_0.distcp").symlink_to(outside)
        return
    path = "../../outside.distcp" if where == "relative" else str(outside)
    for info in meta.storage_data.values():
        info.relative_path = path
    (trainer / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


@pytest.mark.parametrize("case, words", [
    ("dotted-global", ["torch.distributed.checkpoint.metadata.os.makedirs"]),
    ("bytes-entry", ["torch.distributed.checkpoint.metadata.BytesStorageMetadata", "tensors"]),
    ("relative", ["../../outside.distcp", "outside"]),
    ("absolute", ["outside.distcp", "outside"]),
    ("symlink", ["__0_0.distcp", "outside"]),
])
def test_a_crafted_checkpoint_is_refused_before_it_runs_or_reads_anything(dataset, trained, tmp_path, capsys, case,
                                                                         words, monkeypatch):
    import train

    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    trainer = run / "checkpoints" / "step-0000002" / "trainer"
    sentinel = tmp_path / "code-ran"
    if case == "dotted-global":
        dotted = makedirs_pickle("torch.distributed.checkpoint.metadata", "os.makedirs", sentinel)
        (trainer / ".metadata").write_bytes(dotted)
    elif case == "bytes-entry":
        craft_bytes_entry(trainer, sentinel)
    else:
        craft_storage_path(trainer, case)
    from torch.distributed.checkpoint.filesystem import FileSystem

    opened, real_open = [], FileSystem.create_stream  # where DCP opens its data files
    monkeypatch.setattr(FileSystem, "create_stream",
                        lambda self, path, mode: opened.append(str(path)) or real_open(self, path, mode))
    message = refused(capsys, lambda: train.main(resume_argv(dataset, run)), str(trainer), *words)
    assert not sentinel.exists(), message
    assert not [f for f in opened if f.endswith(".distcp")], opened  # no data file was opened, inside or outside


def test_a_non_tensor_entry_is_refused_even_past_the_unpickler(trained):
    """The second check: metadata holding a bytes entry (however it was built) is refused by name."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from checkpoint import check_metadata
    from convert import CheckpointError

    trainer = trained / "checkpoints" / "step-0000002" / "trainer"
    meta = pickle.loads((trainer / ".metadata").read_bytes())
    check_metadata(meta, trainer, trainer / ".metadata")  # as saved: accepted
    meta.state_dict_metadata["model.image_newline"] = BytesStorageMetadata()
    with pytest.raises(CheckpointError, match="'model.image_newline' is a BytesStorageMetadata, but train.py saves"):
        check_metadata(meta, trainer, trainer / ".metadata")
