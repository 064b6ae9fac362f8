"""Training's inputs, as a specification: one broken record is a counted bad sample and never ends a run; a flag
that would fail late (after step 1, at the first video) is refused before anything loads; data files are split and
decoded as JSON writers write them; a mixture spec that includes itself is named; a resume survives a metrics line
cut short by a kill."""

import json

import pytest
import torch
from conftest import photo
from PIL import Image
from test_hostile_inputs import CHAT, refused
from test_train import config, dataset  # noqa: F401 (a fixture)

import data
import metrics
import train
from data import SupervisedDataset, load_records

# ----------------------------------------------------------------------------------------------------------------
# Records: each failure is a bad sample with the record's id and the key at fault


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("strips")
    photo(40, 30).save(d / "ok.png")
    Image.new("RGB", (1, 12000)).save(d / "strip.png")  # 12k pixels; padded to a square 144M (the limit is 134M)
    Image.new("RGB", (1, 200000)).save(d / "long.png")  # CLIP's short side to 28 px: 28 x 5.6M = 157M
    frames = [photo(20, 20, seed=s) for s in range(3)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:])
    return d


def tiny_dataset(tiny, name, folder, records, aspect=None, **kwargs):
    from chat_template import load_tokenizer
    from convert import load_pretrained

    model, _ = load_pretrained(str(tiny(name)))
    model.cfg.image_aspect_ratio = aspect or model.cfg.image_aspect_ratio
    template = "qwen_1_5" if "qwen" in name else "vicuna_v1"
    tokenizer = load_tokenizer(tiny(name), str(tiny(name)))
    return SupervisedDataset(records, folder, tokenizer, template, model.cfg, max_len=600, **kwargs)


SURROGATE = json.loads('{"from": "gpt", "value": "a cat \\ud83d"}')  # json.loads keeps a lone surrogate
RECORDS = [  # (model, image_aspect_ratio, record, error kind, words of the detail)
    ("next_qwen2", None, {"id": "s1", "conversations": [CHAT[0], SURROGATE], "image": "ok.png"},
     "text is not valid Unicode", ["conversations[1]", "lone surrogate '\\ud83d' at 6"]),
    ("next_qwen2", None, {"id": "s2", "conversations": [{"from": ["human"], "value": "<image>\nhi"}, CHAT[1]],
                          "image": "ok.png"}, "malformed turn", ["conversations[0]", "\"from\" ['human']: expected"]),
    ("next_qwen2", None, {"id": "s3", "conversations": [{"role": {"x": 1}, "content": "hi"}, CHAT[1]]},
     "malformed turn", ["conversations[0]", "{'x': 1}"]),
    ("llava15_llama", "pad", {"id": "s4", "conversations": CHAT, "image": "strip.png"}, "image too large",
     ["strip.png", "1 x 12000 image padded to a square would be 12000 x 12000", "134,217,728"]),
    ("llava15_llama", "square", {"id": "s5", "conversations": CHAT, "image": "long.png"}, "image too large",
     ["long.png", "resized for the tower", "28 x 5600000"]),
]


@pytest.mark.parametrize("name, aspect, record, kind, words", RECORDS, ids=[r[2]["id"] for r in RECORDS])
def test_a_broken_record_is_a_bad_sample(tiny, images, name, aspect, record, kind, words):
    good = {"id": "good", "image": "ok.png", "conversations": CHAT}
    samples = tiny_dataset(tiny, name, images, [record, good], aspect)
    sample = samples[0]
    assert (sample["id"], sample["error"]) == (record["id"], kind), sample
    assert all(w in sample["detail"] for w in words), sample["detail"]
    assert "error" not in samples[1] and samples[1]["labels"]


def test_an_unexpected_failure_is_counted_as_its_type(tiny, images, monkeypatch):
    """The backstop: whatever a record breaks that no check foresaw is a bad sample named by the exception's type."""
    def broken(path):
        if "ok" in str(path):
            raise KeyError("a reader's bug")
        return Image.new("RGB", (30, 30))
    monkeypatch.setattr(data, "load_image", broken)
    samples = tiny_dataset(tiny, "next_qwen2", images, [{"id": 7, "image": "ok.png", "conversations": CHAT},
                                                        {"id": 8, "image": "other.png", "conversations": CHAT}])
    assert samples[0]["id"] == 7 and samples[0]["error"] == "unexpected error: KeyError"
    assert "a reader's bug" in samples[0]["detail"] and "data.py" not in samples[0]["error"]
    assert "error" not in samples[1]


def test_a_video_dataset_needs_a_frame(tiny, images):
    records = [{"id": "v", "video": "clip.gif", "conversations": CHAT}]
    with pytest.raises(ValueError, match="num_frames 0 < 1"):
        tiny_dataset(tiny, "onevision_qwen2", images, records, num_frames=0)
    assert tiny_dataset(tiny, "onevision_qwen2", images, records, num_frames=2)[0]["images"][0].pixels.shape[0] == 2


def test_broken_records_mid_run_are_counted_and_the_run_finishes(dataset, tmp_path, capsys):  # noqa: F811
    root, _ = dataset
    records = json.loads((root / "data.json").read_text())
    records[5] = dict(records[5], conversations=[records[5]["conversations"][0], SURROGATE])
    records[20] = dict(records[20], conversations=[{"from": ["human"], "value": "<image>\nhi"}, CHAT[1]])
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = config(dataset, tmp_path, data=str(tmp_path / "data.json"), max_steps=4, epochs=1, max_bad_fraction=0.2,
                 save_every=100)
    train.train(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["bad_samples"] == 2
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("skipped 2 unusable samples: {") and summary.endswith("first ids: ['img5', 'img20']")
    assert "'text is not valid Unicode': 1" in summary and "'malformed turn': 1" in summary


# ----------------------------------------------------------------------------------------------------------------
# Flags that would fail late: refused first, with the flag and what it takes

FLAGS = [  # (arguments, words)
    (["--save-every", "0"], ["--save-every 0", "expected an integer >= 1"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size 0", ">= 1"]),
    (["--global-batch-size", "0"], ["--global-batch-size 0", ">= 1"]),
    (["--max-bad-fraction", "1.5"], ["--max-bad-fraction 1.5", "0 <= f <= 1"]),
    (["--max-bad-fraction", "-0.1"], ["--max-bad-fraction -0.1", "0 <= f <= 1"]),
    (["--max-bad-fraction", "nan"], ["--max-bad-fraction nan", "0 <= f <= 1"]),
    (["--frames", "0"], ["--frames 0", "expected an integer >= 1"]),
    (["--image-placement", "sideways"], ["--image-placement sideways", "interleaved, front, mixed"]),
    (["--lora-rank", "-2"], ["--lora-rank -2", ">= 1", "0: no LoRA"]),
    (["--lora-rank", "4", "--lora-dropout", "1"], ["--lora-dropout 1.0", "0 <= p < 1"]),
    (["--lora-dropout", "-0.5"], ["--lora-dropout -0.5", "0 <= p < 1"]),
    (["--keep-last", "-1"], ["--keep-last -1", ">= 0", "0 keeps every checkpoint"]),
    (["--stage", "3"], ["--stage 3", "1, 1.5, 2"]),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model or data file was read before the flags were checked")
    monkeypatch.setattr(train, "build_model", loaded)
    monkeypatch.setattr(train, "load_records", loaded)


@pytest.mark.parametrize("args, words", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_flags_that_would_fail_late_are_refused_first(nothing_loads, tmp_path, capsys, args, words):
    argv = ["--model", "tiny", "--data", "d.json", "--output-dir", str(tmp_path / "run"), "--device", "cpu", *args]
    refused(capsys, lambda: train.main(argv), *words)


def test_keep_last_0_keeps_every_checkpoint(dataset, tmp_path):  # noqa: F811
    train.TrainConfig(keep_last=0)  # accepted
    train.train(config(dataset, tmp_path, max_steps=3, save_every=1, keep_last=0))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000001", "step-0000002", "step-0000003"]


# ----------------------------------------------------------------------------------------------------------------
# Data files: lines, encodings, mixtures


def test_jsonl_splits_on_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings; str.splitlines breaks on
    all three, a JSON Lines file only on "\\n" (a "\\r" before it is whitespace)."""
    text = "a\u2028b\u2029c\x85d"
    rows = [{"id": 1, "conversations": [{"from": "human", "value": text}]}, {"id": 2, "conversations": []}]
    path = tmp_path / "data.jsonl"
    path.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n\n")
    assert "\u2028".encode() in path.read_bytes()
    assert load_records(path) == rows


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_accepted(tmp_path, suffix):
    rows = [{"id": "bom", "conversations": CHAT}]
    body = json.dumps(rows) if suffix == ".json" else json.dumps(rows[0])
    (tmp_path / f"data{suffix}").write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_records(tmp_path / f"data{suffix}") == rows


def spec(*paths) -> str:
    return json.dumps({"datasets": [{"json_path": p} for p in paths]})


def test_a_mixture_that_includes_itself_is_a_cycle(tmp_path, capsys):
    (tmp_path / "part.json").write_text(json.dumps([{"id": "a"}]))
    (tmp_path / "self.json").write_text(spec("part.json", "self.json"))
    refused(capsys, lambda: load_records(tmp_path / "self.json"),
            f"{tmp_path / 'self.json'}: datasets[1] json_path 'self.json' includes {tmp_path / 'self.json'} again",
            "(a cycle)")
    (tmp_path / "a.json").write_text(spec("part.json", "sub/b.json"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(spec("../a.json"))
    refused(capsys, lambda: load_records(tmp_path / "a.json"),
            f"{tmp_path / 'sub' / 'b.json'}: datasets[0] json_path '../a.json' includes {tmp_path / 'a.json'} again",
            "(a cycle); remove that entry")
    (tmp_path / "twice.json").write_text(spec("part.json", "part.json"))  # the same file twice is no cycle
    assert load_records(tmp_path / "twice.json") == [{"id": "a"}, {"id": "a"}]


def test_a_mixture_names_the_entry_of_a_missing_file(tmp_path, capsys):
    (tmp_path / "mix.json").write_text(spec("gone.jsonl"))
    refused(capsys, lambda: load_records(tmp_path / "mix.json"),
            f"{tmp_path / 'mix.json'}: datasets[0] json_path 'gone.jsonl'", f"{tmp_path / 'gone.jsonl'} does not exist",
            "relative to the spec's folder")


# ----------------------------------------------------------------------------------------------------------------
# Resume: metrics.jsonl cut short by a kill mid-append


def test_a_resume_drops_a_metrics_line_cut_short(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    cfg = train.TrainConfig(output_dir=str(tmp_path), quiet=True)
    metrics.StepLog(cfg, 2, 10, torch.device("cpu"), 1, 0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
