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

