"""`python train.py --plot RUN... --save curves.png`: every logged value is on the figure, a line per run and a
panel per quantity; a missing metrics file or a missing matplotlib is one clear line."""

import json
import sys

import pytest
from PIL import Image

from tools import plot
import train

pytest.importorskip("matplotlib")


def write_run(folder, records, tail=""):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


def records(scale, steps=6, mfu=False):
    return [{"step": s, "loss": scale * 2.0 / s, "lr": 1e-3 * min(1.0, s / 2), "grad_norm": 1.5 - 0.1 * s,
             "tokens_per_s": 1000.0 + s, "bad_samples": 0, **({"mfu": 0.3 + 0.01 * s} if mfu else {})}
            for s in range(1, steps + 1)]


def test_every_value_is_plotted(tmp_path):
    a = write_run(tmp_path / "a", records(1.0))
    b = write_run(tmp_path / "b", records(2.0, steps=4, mfu=True), tail='{"step": 5, "loss"')  # killed mid-line
    fig = train.main(["--plot", str(a), str(b / "metrics.jsonl"), "--save", str(tmp_path / "curves.png")])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "learning rate", "gradient norm", "tokens / s", "MFU"]
    for ax, key in zip(axes, ["loss", "lr", "grad_norm", "tokens_per_s", "mfu"]):
        lines = {line.get_label(): line for line in ax.get_lines()}
        expected = {"a": records(1.0), "b": records(2.0, steps=4, mfu=True)}
        assert set(lines) == ({"b"} if key == "mfu" else {"a", "b"})
        for label, line in lines.items():
            rows = expected[label]
            assert list(line.get_xdata()) == [r["step"] for r in rows]
            assert list(line.get_ydata()) == pytest.approx([r[key] for r in rows])
    assert Image.open(tmp_path / "curves.png").size == (12 * 110, int(3.6 * 3 * 110))  # 3 rows of 2 panels


def test_same_folder_names_get_their_paths(tmp_path):
    assert plot.run_labels([str(write_run(tmp_path / "x" / "final", records(1))),
                            str(write_run(tmp_path / "y" / "final", records(1)))]) == [str(tmp_path / "x" / "final"),
                                                                                        str(tmp_path / "y" / "final")]


def test_missing_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit:
        train.main(["--plot", str(tmp_path / "empty"), "--save", str(tmp_path / "c.png")])
    assert str(exit.value) == (f"error: {tmp_path / 'empty'}: no metrics.jsonl "
                               f"(expected a train.py --output-dir, or the file itself)")


def test_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    run = write_run(tmp_path / "a", records(1.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match="plotting needs matplotlib, an optional dependency: pip install matplotlib"):
        train.main(["--plot", str(run)])
