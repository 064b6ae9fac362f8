"""The seeds' claims in miniature: each ablation runs the toy life cycle (toy/lifecycle.py) in arms that differ in one
thing, over several seeds, and says whether the toy moves the way the paper says.

    python -m toy.ablations anyres      (a) AnyRes vs a fixed-resolution (pad) model on a small detail  LLaVA-1.6
    python -m toy.ablations stage1      (b) stage 1 (projector only) first vs the whole model from the start  LLaVA-1.5
    python -m toy.ablations threshold   (c) thresholded interpolation: accuracy against visual tokens  Higher-AnyRes
    python -m toy.ablations interleave  (d) Interleave continued from the stage-2 vs the stage-1 model  NeXT-Interleave
        [--seeds 0 1 2] [--jobs 2] [--out runs/ablations] [--scale 1.0]

Every arm of a seed shares that seed's data and stage 0 (made once, in OUT/seedS). An arm is a ToyRun: ABLATION_RUN
(the default life cycle with a shorter stage 2) plus the arm's changes (costs and results: docs/toy-ablations.md).
Each arm-seed keeps its scores in its run folder, so a finished one is never rerun (and the arms several claims
share, such as the default settings, run once). Writes OUT/NAME/results.json ({arm: [scores per seed]}) and
OUT/NAME/NAME.png (matplotlib, an optional dependency of this command), and prints a table and the verdict line.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from toy.lifecycle import ToyRun

# One ablation arm-seed: the default life cycle with 300 of its 750 stage-2 steps, scored on 500 held-out questions.
# 300 steps read the letters (the small detail) and count, not yet the questions about one object among several;
# the whole 750 would make a three-seed claim take two hours on 2 cores instead of ~15 minutes
ABLATION_RUN = dict(stage2_steps=300, n_eval=500, blank_eval=False, quiet=True)


@dataclass
class Claim:
    paper: str  # where the claim comes from
    claim: str  # what the paper found, in one line
    arms: dict  # label -> ToyRun changes; the first arm is the one the paper favours
    metric: str  # the score the verdict compares: "heldout", a question type, "compare" or "motion"
    also: tuple = ()  # more scores shown in the table and plot
    keeps: float = 0.0  # > 0: the claim is that the other arms keep this share of the first's score, not that they lose


CLAIMS = {
    "anyres": Claim(
        paper="LLaVA-1.6 (LLaVA-NeXT blog, January 2024)",
        claim="AnyRes (a base view plus crops at the tower's resolution) reads small details a padded, resized "
              "image loses",
        arms={"anyres": {}, "pad": {"image_aspect_ratio": "pad"}}, metric="letter", also=("heldout", "shape")),
    "stage1": Claim(
        paper="LLaVA-1.5 (Improved Baselines with Visual Instruction Tuning, 2023)",
        claim="aligning the projector alone on captions before tuning projector and LLM together gives a better model",
        # equal budget: the second arm spends stage 1's steps in stage 1.5 (detailed captions, projector and LLM)
        arms={"stage 1 first": {}, "no stage 1": {"stages": "1.5,2",
                                                  "stage15_steps": ToyRun.stage15_steps + ToyRun.stage1_steps}},
        metric="heldout"),
    "threshold": Claim(
        paper="LLaVA-NeXT: what else influences visual instruction tuning (Higher-AnyRes, May 2024)",
        claim="shrinking a grid's feature map to a token threshold tau by bilinear interpolation keeps most of the "
              "accuracy with fewer visual tokens",
        # tau 9 shrinks every scene's grid (1x2 and 1x3 crops, 18 and 27 tokens) to about half its tokens; a third arm
        # (tau 18) would take the claim past 15 minutes on 2 cores
        arms={"no threshold": {}, "tau 9": {"token_threshold": 9}},
        metric="heldout", also=("position", "letter"), keeps=0.95),
    "interleave": Claim(
        paper="LLaVA-NeXT-Interleave (2024)",
        claim="continuing multi-image training from the stage-2 (single-image instruction) model keeps single-image "
              "skills that continuing from stage 1 loses",
        # equal budget: the second arm spends stages 1.5 and 2's steps on the Interleave mix (half of it single-image
        # questions), at stage 2's lr; with the Interleave stage's 30 steps alone it never learned to answer at all
        arms={"from stage 2": {"stages": "1,1.5,2,interleave"},
              "from stage 1": {"stages": "1,interleave", "interleave_lr": ToyRun.stage2_lr, "interleave_steps":
                               ToyRun.stage15_steps + ABLATION_RUN["stage2_steps"] + ToyRun.interleave_steps}},
        metric="heldout", also=("compare", "motion")),
}


SCALED = ("n_train", "stage0_vision_steps", "stage1_steps", "stage15_steps", "stage2_steps", "interleave_steps")


def arm_run(out: Path, name: str, arm: str, seed: int, scale: float) -> ToyRun:
    """The ToyRun of one arm at one seed. Its folder is named by the arm's changes, so arms that change nothing (the
    baselines of several claims) are one run, and by the seed, whose data and stage 0 every arm shares."""
    changes = CLAIMS[name].arms[arm]
    base = {k: getattr(ToyRun, k) for k in SCALED} | ABLATION_RUN | changes
    for k in SCALED:  # --scale: data and steps
        base[k] = max(2, round(base[k] * scale))
    base["n_eval"] = max(10, round(base["n_eval"] * min(1.0, scale * 4)))
    seed_dir = out / f"seed{seed}-scale{scale:g}"
    key = "-".join(f"{k}={v}" for k, v in sorted(changes.items())).replace(",", "+") or "default"
    return ToyRun(out=str(seed_dir / key), seed=seed, data=str(seed_dir / "data"), stage0=str(seed_dir / "stage0"),
                  **base)


def run_one(run: ToyRun, threads: int) -> dict:
    """One arm-seed's life cycle, in a worker process of the pool; its scores are kept in OUT/scores.json."""
    import torch

    import train
    from toy.lifecycle import life_cycle

    torch.set_num_threads(threads)
    scores = life_cycle(train, run)
    (Path(run.out) / "scores.json").write_text(json.dumps(scores) + "\n")
    return scores


def prepare_seed(run: ToyRun, threads: int):
    """A seed's data and stage 0, made before the arms that share them."""
    import torch

    import train
    from toy.lifecycle import prepare

    torch.set_num_threads(threads)
    prepare(run, train, log=lambda msg: None)


def run_ablation(name: str, seeds, out: Path, jobs: int, scale: float) -> dict:
    """Every arm at every seed (a run finished before, by this claim or another, is read back); returns
    {arm: [scores per seed]}, also written to OUT/NAME/results.json."""
    claim = CLAIMS[name]
    runs = {(arm, s): arm_run(out, name, arm, s, scale) for s in seeds for arm in claim.arms}
    todo = [key for key, run in runs.items() if not (Path(run.out) / "scores.json").exists()]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawned, not forked: a fork of a process whose torch already runs threads (OpenMP, torch.compile's workers)
    # can hang on a lock one of them held
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # each seed's data and stage 0 first, since its arms share them; its arms queue as soon as they are made
        prepared = {pool.submit(prepare_seed, runs[next(iter(claim.arms)), s], threads): s
                    for s in sorted({s for _, s in todo})}
        futures = {}
        for done in as_completed(prepared):
            done.result()
            futures |= {pool.submit(run_one, runs[key], threads): key for key in todo if key[1] == prepared[done]}
        for future in as_completed(futures):
            arm, s = futures[future]
            print(f"{name}: {arm}, seed {s}: {claim.metric} {score(future.result(), claim.metric):.3f}", flush=True)
    results = {arm: [json.loads((Path(runs[arm, s].out) / "scores.json").read_text()) for s in seeds]
               for arm in claim.arms}
    (out / name).mkdir(parents=True, exist_ok=True)
    summary = {"seeds": seeds, "scale": scale, "arms": results}
    (out / name / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return results


def score(scores: dict, key: str) -> float:
    return scores["per_type"][key] if key in scores["per_type"] else scores[key]


def verdict(claim: Claim, results: dict) -> str:
    """Whether the miniature moves the paper's way on the claim's metric, by the mean over seeds: the first arm beats
    every other (and whether it does at each seed), or, for a `keeps` claim, every other arm keeps that share of its
    score."""
    first, *others = claim.arms
    values = {arm: [score(r, claim.metric) for r in results[arm]] for arm in claim.arms}
    mean = {arm: statistics.mean(v) for arm, v in values.items()}
    compared = f"{claim.metric}: {first} {mean[first]:.3f} vs " + ", ".join(f"{o} {mean[o]:.3f}" for o in others)
    if claim.keeps:
        agrees = all(mean[o] >= claim.keeps * mean[first] for o in others)
        how = f"keeps {claim.keeps:.0%} of it" if agrees else f"does not keep {claim.keeps:.0%} of it"
        return (f"{compared}: with fewer tokens the miniature {how}, "
                f"{'agreeing' if agrees else 'disagreeing'} with the paper")
    agrees = all(mean[first] > mean[o] for o in others)
    # seed by seed: arms share its data
    every_seed = all(a > b for o in others for a, b in zip(values[first], values[o]))
    how = ("agrees with the paper" + (" (every seed)" if every_seed else " (on the mean, not at every seed)")
           if agrees else "does not agree with the paper")
    return f"{compared}: the miniature {how}"


def table(claim: Claim, results: dict) -> str:
    """A markdown table: mean and (min-max) over seeds of each shown score, and the mean visual tokens per image."""
    keys = (claim.metric, *claim.also)
    lines = ["| arm | " + " | ".join(keys) + " | visual tokens | seeds |", "|---" * (len(keys) + 3) + "|"]
    for arm, runs in results.items():
        cells = []
        for k in keys:
            values = [score(r, k) for r in runs]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.2f}-{max(values):.2f})")
        lines.append(f"| {arm} | " + " | ".join(cells)
                     + f" | {statistics.mean(r['visual_tokens'] for r in runs):.1f} | {len(runs)} |")
    return "\n".join(lines)


def plot(name: str, claim: Claim, results: dict, path: Path):
    """One panel per shown score: each arm's seeds as dots and their mean as a bar; for the threshold ablation the
    x axis is the visual tokens per image instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot: matplotlib is an optional dependency of this command (pip install matplotlib)")
        return
    keys = (claim.metric, *claim.also)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (arm, runs) in enumerate(results.items()):
            values = [score(r, key) for r in runs]
            x = statistics.mean(r["visual_tokens"] for r in runs) if name == "threshold" else i
            if name == "threshold":
                ax.errorbar(x, statistics.mean(values), yerr=[[statistics.mean(values) - min(values)],
                            [max(values) - statistics.mean(values)]], fmt="o", capsize=4, label=arm)
            else:
                ax.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.5)
                ax.plot([i] * len(values), values, "k.", ms=8)
        if name == "threshold":
            ax.set_xlabel("visual tokens per image")
            ax.legend()
        else:
            ax.set_xticks(range(len(results)), list(results))
        ax.set_ylim(0, 1)
        ax.set_title(key)
    fig.suptitle(f"{name}: {claim.paper}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(CLAIMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="arms run at once, each on cores / jobs threads")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data and steps (tests use ~0.02)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.scale <= 0:
        raise SystemExit("error: --jobs must be >= 1 and --scale > 0")
    claim, start = CLAIMS[args.name], time.perf_counter()
    print(f"{args.name}: {claim.paper}: {claim.claim}")
    results = run_ablation(args.name, args.seeds, Path(args.out), args.jobs, args.scale)
    print(table(claim, results))
    png = Path(args.out) / args.name / f"{args.name}.png"
    plot(args.name, claim, results, png)
    print(f"{args.name}: {verdict(claim, results)} ({len(args.seeds)} seeds, plot {png}, wall "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
