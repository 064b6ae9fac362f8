"""The seeds' claims in miniature: each ablation runs the toy life cycle (toy/lifecycle.py) in arms that differ in one
thing, over several seeds, and says whether the toy moves the way the paper says.

    python -m toy.ablations anyres         (a) AnyRes vs a fixed-resolution (pad) model on a small detail  LLaVA-1.6
    python -m toy.ablations stage1         (b) stage 1 (projector only) first vs the whole model from the start
                                               LLaVA-1.5
    python -m toy.ablations higher_anyres  (c) a larger grid shrunk to a token threshold: score against visual
                                               tokens  Higher-AnyRes
    python -m toy.ablations interleave     (d) Interleave continued from the stage-2 vs the stage-1 model
                                               NeXT-Interleave
    python -m toy.ablations formats        (e) two-image training with the images in front, interleaved or both
                                               NeXT-Interleave
        [--seeds 0 1 2] [--jobs 2] [--out runs/ablations] [--scale 1.0]

Every arm of a seed shares that seed's data and stage 0 (made once, in OUT/seedS-scaleX; a world other than the
default has its own, in OUT/seedS-scaleX-WORLD). An arm is a ToyRun: ABLATION_RUN (the default life cycle with a
shorter stage 2) plus the arm's changes (costs and results: docs/toy-ablations.md). Each arm-seed keeps its scores in
its run folder, so a finished one is never rerun (and the arms several claims share, such as the default settings,
run once). An arm may continue from a stage of its world's default run ("init": "stage2" or "stage1.5"): it starts
once that run is finished, which is run first where missing. Writes OUT/NAME/results.json ({arm: [scores per seed]}) and
OUT/NAME/NAME.png (matplotlib, an optional dependency of this command), and prints a table and the verdict line.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from toy import world
from toy.lifecycle import ToyRun

# One ablation arm-seed: the default life cycle with 300 of its 750 stage-2 steps, scored on 500 held-out questions.
# 300 steps read the letters (the small detail) and count, not yet the questions about one object among several;
# the whole 750 would make a three-seed claim take two hours on 2 cores instead of ~15 minutes
ABLATION_RUN = dict(stage2_steps=300, n_eval=500, blank_eval=False, quiet=True)

# What the arm-seeds of each world change from ABLATION_RUN. The tall world (half of the scenes twice as tall, with
# details the default canvases shrink: toy/scene.py) has its own data and stage 0 per seed, a shorter stage 2, fewer
# scenes (200 steps draw 6,400) and 300 held-out questions, so that its three-arm claim fits ~15 minutes on 2 cores
WORLD_RUN = {"default": {}, "tall": {"stage2_steps": 200, "n_train": 10000, "n_eval": 300}}
# the anyres claim's tower: stage 0 also on the base view's and the padded whole's contents (a stage 0 of its own)
WHOLE_VIEWS = {"stage0_whole_views": True}
# the formats claim's arms: the formats stage alone, continued from the default arm's stage-2 model of the seed
FROM_STAGE2 = {"stages": "formats", "init": "stage2"}
# the higher_anyres claim's arms in the tall world; those with a larger grid continue from the default grid's
# stage 1.5 (the same model for all three) for the same stage 2
TALL = {"world": "tall"}
LARGER_GRID = TALL | {"stages": "2", "init": "stage1.5", "max_grid": 6}


@dataclass
class Claim:
    paper: str  # where the claim comes from
    claim: str  # what the paper found, in one line
    arms: dict  # label -> ToyRun changes; the first arm is the one the paper favours
    metric: str  # the score the verdict compares: "heldout", a question type, "compare", "motion" or "formats"
    also: tuple = ()  # more scores shown in the table and plot
    keeps: float = 0.0  # > 0: the claim is that the first arm keeps this share of the third's gain over the second
    # question types the other arms should still answer, at least twice chance at every seed (a low-resolution view
    # loses the details, not the coarse things)
    coarse: tuple = ()
    # the metric's chance level where it is known: arms that all stay within 0.05 of it learned nothing to compare
    chance: float | None = None


CLAIMS = {
    "anyres": Claim(
        paper="LLaVA-1.6 (LLaVA-NeXT blog, January 2024)",
        claim="AnyRes (a base view plus crops at the tower's resolution) reads small details a padded, resized "
              "image loses",
        # both arms on a tower that also learned whole, shrunk views (as CLIP does), so that the pad arm's one view
        # carries what is visible at its size
        arms={"anyres": WHOLE_VIEWS, "pad": WHOLE_VIEWS | {"image_aspect_ratio": "pad"}}, metric="letter",
        also=("heldout", "color", "count", "position", "shape"), coarse=("color", "count", "position")),
    "stage1": Claim(
        paper="LLaVA-1.5 (Improved Baselines with Visual Instruction Tuning, 2023)",
        claim="aligning the projector alone on captions before tuning projector and LLM together gives a better model",
        # equal budget: the second arm spends stage 1's steps in stage 1.5 (detailed captions, projector and LLM)
        arms={"stage 1 first": {}, "no stage 1": {"stages": "1.5,2",
                                                  "stage15_steps": ToyRun.stage15_steps + ToyRun.stage1_steps}},
        metric="heldout"),
    "higher_anyres": Claim(
        paper="LLaVA-NeXT: what else influences visual instruction tuning (Higher-AnyRes, May 2024)",
        claim="a larger grid of crops reads details a smaller one shrinks away, and shrinking its feature map "
              "bilinearly to a token threshold tau keeps most of that gain at about the smaller grid's token count",
        # the default grid (1x2, 1x3 crops) fits a 48x192 scene in 36x144 px, a 48x288 one in 24x144; grids up to
        # 6x6 (1x4, 1x6 used) see them at full size; tau 27 is the default grid's largest map (9 rows x 3)
        arms={"larger grid, tau 27": LARGER_GRID | {"token_threshold": 27}, "default grid": TALL,
              "larger grid": LARGER_GRID},
        metric="heldout", also=("letter", "position", "count"), keeps=0.5),
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
    "formats": Claim(
        paper="LLaVA-NeXT-Interleave (2024)",
        claim="training on both image placements, in front of the text and interleaved with it, does better on both "
              "than training on either alone",
        # each arm: 200 steps of "which image has the red circle?" (half of them single-image replay) from the same
        # stage-2 model; the verdict reads the mean of the two placements' scores
        arms={"mixed": FROM_STAGE2 | {"image_placement": "mixed"},
              "front": FROM_STAGE2 | {"image_placement": "front"},
              "interleaved": FROM_STAGE2 | {"image_placement": "interleaved"}},
        metric="formats", also=("front", "interleaved", "heldout"), chance=0.5),
}


SCALED = ("n_train", "stage0_vision_steps", "stage1_steps", "stage15_steps", "stage2_steps", "interleave_steps",
          "formats_steps")


def arm_run(out: Path, name: str, arm: str, seed: int, scale: float) -> ToyRun:
    """The ToyRun of one arm of a claim at one seed."""
    return toy_run(out, CLAIMS[name].arms[arm], seed, scale)


def toy_run(out: Path, changes: dict, seed: int, scale: float) -> ToyRun:
    """ABLATION_RUN with the world's and then `changes` at one seed and scale. Its folder is named by the changes, so
    arms that change nothing (the baselines of several claims) are one run, and by the seed and world, whose data and
    stage 0 every arm shares. "init": STAGE continues from that stage's model of the world's default run."""
    world = changes.get("world", "default")
    base = {k: getattr(ToyRun, k) for k in SCALED} | ABLATION_RUN | WORLD_RUN[world] | changes
    for k in SCALED:  # --scale: data and steps
        base[k] = max(2, round(base[k] * scale))
    base["n_eval"] = max(10, round(base["n_eval"] * min(1.0, scale * 4)))
    seed_dir = out / (f"seed{seed}-scale{scale:g}" + ("" if world == "default" else f"-{world}"))
    if "init" in changes:
        base["init"] = str(seed_dir / "default" / changes["init"] / "final")
    key = "-".join(f"{k}={v}" for k, v in sorted(changes.items()) if k != "world").replace(",", "+") or "default"
    stage0 = seed_dir / ("stage0-whole" if base.get("stage0_whole_views") else "stage0")  # two towers, one seed
    return ToyRun(out=str(seed_dir / key), seed=seed, data=str(seed_dir / "data"), stage0=str(stage0), **base)


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
    first = next(iter(claim.arms))
    runs = {(arm, s): arm_run(out, name, arm, s, scale) for s in seeds for arm in claim.arms}
    todo = [key for key, run in runs.items() if not finished(run)]
    # an arm that continues from a stage of its world's default run (ToyRun.init) waits for that run: an arm of the
    # claim (the same folder), else one keyed (None, seed)
    needs = {}
    for key in [k for k in todo if runs[k].init]:
        default = toy_run(out, {"world": runs[key].world}, key[1], scale)
        needs[key] = next((k for k, r in runs.items() if r.out == default.out), (None, key[1]))
        runs.setdefault(needs[key], default)
    todo += [key for key in dict.fromkeys(needs.values()) if key not in todo and not finished(runs[key])]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawned, not forked: a fork of a process whose torch already runs threads (OpenMP, torch.compile's workers)
    # can hang on a lock one of them held
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # each seed's data and stage 0 first, since its arms share them; its runs queue once they are made
        running = {pool.submit(prepare_seed, runs[first, s], threads): s for s in sorted({s for _, s in todo})}
        prepared, unfinished, waiting = set(), set(todo), list(todo)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key, result = running.pop(future), future.result()
                if isinstance(key, int):
                    prepared.add(key)
                    continue
                unfinished.discard(key)
                arm, metric = (key[0], claim.metric) if key[0] else ("the default arm, where the arms start", "heldout")
                print(f"{name}: {arm}, seed {key[1]}: {metric} {score(result, metric):.3f}", flush=True)
            for key in [k for k in waiting if k[1] in prepared and needs.get(k) not in unfinished]:
                waiting.remove(key)
                running[pool.submit(run_one, runs[key], threads)] = key
    results = {arm: [json.loads((Path(runs[arm, s].out) / "scores.json").read_text()) for s in seeds]
               for arm in claim.arms}
    (out / name).mkdir(parents=True, exist_ok=True)
    summary = {"seeds": seeds, "scale": scale, "arms": results}
    (out / name / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return results


def finished(run: ToyRun) -> bool:
    return (Path(run.out) / "scores.json").exists()


def score(scores: dict, key: str) -> float:
    return scores["per_type"][key] if key in scores["per_type"] else scores[key]


def verdict(claim: Claim, results: dict) -> str:
    """Whether the miniature moves the paper's way on the claim's metric, by the mean over seeds: the first arm beats
    every other (and whether it does at each seed), or, for a `keeps` claim, the third arm gains over the second and
    the first keeps at least that share of the gain."""
    first, *others = claim.arms
    values = {arm: [score(r, claim.metric) for r in results[arm]] for arm in claim.arms}
    mean = {arm: statistics.mean(v) for arm, v in values.items()}
    compared = f"{claim.metric}: {first} {mean[first]:.3f} vs " + ", ".join(f"{o} {mean[o]:.3f}" for o in others)
    if claim.chance is not None and all(abs(m - claim.chance) <= 0.05 for m in mean.values()):
        return (f"{compared}: every arm is at chance ({claim.chance:.2f}): the miniature learned nothing to compare, "
                f"so it can neither agree nor disagree with the paper")
    if claim.keeps:
        low, high = others
        gain, kept = mean[high] - mean[low], mean[first] - mean[low]
        agrees = gain > 0 and kept >= claim.keeps * gain
        how = (f"{first} keeps {kept / gain:.0%} of {high}'s gain over {low} (the paper: most; here at least "
               f"{claim.keeps:.0%})" if gain > 0 else f"{high} gains nothing over {low}: nothing to keep")
        return f"{compared}: {how}, {'agreeing' if agrees else 'disagreeing'} with the paper"
    agrees = all(mean[first] > mean[o] for o in others)
    # seed by seed: arms share its data
    every_seed = all(a > b for o in others for a, b in zip(values[first], values[o]))
    how = ("agrees with the paper" + (" (every seed)" if every_seed else " (on the mean, not at every seed)")
           if agrees else "does not agree with the paper")
    return f"{compared}: the miniature {how}" + "".join(coarse_line(claim, results, o) for o in others)


def coarse_line(claim: Claim, results: dict, arm: str) -> str:
    """For a claim with `coarse` types: whether `arm` answers each at twice chance or more at every seed."""
    if not claim.coarse:
        return ""
    chance = world.chance(world.ToyConfig())
    lows = {t: min(score(r, t) for r in results[arm]) for t in claim.coarse}
    sees = all(low >= 2 * chance[t] for t, low in lows.items())
    return (f"; {arm} {'still answers' if sees else 'does not answer'} the coarse questions at twice chance or more "
            f"at every seed (lowest " + ", ".join(f"{t} {low:.2f} against {chance[t]:.2f}" for t, low in lows.items())
            + ")")


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
    """One panel per shown score: each arm's seeds as dots and their mean as a bar; for the higher_anyres ablation the
    x axis is the visual tokens per image instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot: matplotlib is an optional dependency of this command (pip install matplotlib)")
        return
    keys, by_tokens = (claim.metric, *claim.also), name == "higher_anyres"
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (arm, runs) in enumerate(results.items()):
            values = [score(r, key) for r in runs]
            x = statistics.mean(r["visual_tokens"] for r in runs) if by_tokens else i
            if by_tokens:
                ax.errorbar(x, statistics.mean(values), yerr=[[statistics.mean(values) - min(values)],
                            [max(values) - statistics.mean(values)]], fmt="o", capsize=4, label=arm)
            else:
                ax.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.5)
                ax.plot([i] * len(values), values, "k.", ms=8)
        if by_tokens:
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
