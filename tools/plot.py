"""Training curves: the metrics.jsonl of one or more runs on one figure, a panel per quantity, a line per run.

    python train.py --plot runs/stage1 runs/stage2 --save curves.png      (or: python -m tools.plot ... )

    RUN/metrics.jsonl   one {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...} per optimizer step (train.py)
      -> panels: loss, learning rate, gradient norm (before clipping), tokens/s; MFU too when a run logged it

matplotlib is needed by this command only (pip install matplotlib).
"""

import argparse
import json
import sys
from pathlib import Path

PANELS = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens / s")]
OPTIONAL_PANELS = [("mfu", "MFU")]  # logged on GPUs whose peak FLOP/s train.py knows


class PlotError(ValueError):
    """Bad input: names the run folder or file and what to do."""


def read_metrics(run) -> list[dict]:
    """The records of RUN/metrics.jsonl (or of a metrics file given directly). A line cut short by a killed run is
    skipped with a note."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (expected a train.py --output-dir, or the file itself)")
    records, broken = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            broken += 1
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if broken:
        print(f"note: {path}: skipped {broken} unreadable line(s)", file=sys.stderr)
    if not records:
        raise PlotError(f"{path}: no step records (lines with a \"step\" field)")
    return records


def plot_runs(runs: dict[str, list[dict]]):
    """{label: records} -> a matplotlib Figure, one panel per quantity any run logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib, an optional dependency: pip install matplotlib") from None
    panels = PANELS + [p for p in OPTIONAL_PANELS if any(p[0] in r for records in runs.values() for r in records)]
    cols = 2
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(12, 3.6 * -(-len(panels) // cols)), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for label, records in runs.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "loss" and len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def run_labels(paths: list[str]) -> list[str]:
    """Short names for the legend: each run's folder name, or the whole path where two names would clash."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py output folders (or their metrics.jsonl files)")
    p.add_argument("--save", default="curves.png", help="the PNG to write (default: curves.png)")
    args = p.parse_args(argv)
    try:
        runs = {label: read_metrics(path) for label, path in zip(run_labels(args.runs), args.runs)}
        fig = plot_runs(runs)
    except PlotError as e:
        sys.exit(f"error: {e}")
    fig.savefig(args.save, dpi=110)
    print(f"wrote {args.save}: {', '.join(f'{k} ({len(v)} steps)' for k, v in runs.items())}", file=sys.stderr)
    return fig


if __name__ == "__main__":
    main()
