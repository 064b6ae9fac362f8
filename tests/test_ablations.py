"""The ablations in miniature of the miniature: every claim's arms run end to end at a tiny scale (one seed, a few
steps), their scores and visual-token counts land in results.json, the verdict line and the plot are written, and a
second call reads finished arms back instead of training them again."""

import json
import re

import pytest

from toy import ablations


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("ablations")  # shared: every claim's arms reuse seed 0's data and stage 0


def run(name, out, capsys):
    ablations.main([name, "--seeds", "0", "--jobs", "1", "--scale", "0.02", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads((out / name / "results.json").read_text())["arms"]
    assert set(results) == set(ablations.CLAIMS[name].arms)
    for arm in results.values():
        scores = arm[0]
        assert 0 <= scores["heldout"] <= 1 and all(0 <= a <= 1 for a in scores["per_type"].values())
    verdict = r"(the miniature (agrees|does not agree) with the paper|(agreeing|disagreeing) with the paper)"
    assert re.fullmatch(rf"{name}: \S+.*{verdict}.*\(1 seeds, plot .*\)", lines[-1]), lines[-1]
    return results, lines


@pytest.mark.parametrize("name", ["anyres", "threshold"])
def test_arms_differ_in_visual_tokens_as_the_setting_says(name, out, capsys):
    results, _ = run(name, out, capsys)
    tokens = {arm: r[0]["visual_tokens"] for arm, r in results.items()}
    if name == "anyres":  # the toy's scenes are 1x2 or 1x3 crops: 9 base tokens + 3 per row (with its newline) x 6 or 9
        assert tokens["pad"] == 9 and 33 <= tokens["anyres"] <= 45, tokens
    else:  # tau shrinks the grid's feature map (18 or 27 tokens before its newlines) to about tau
        assert 15 <= tokens["tau 9"] < tokens["no threshold"] - 10, tokens
    pytest.importorskip("matplotlib")
    assert (out / name / f"{name}.png").stat().st_size > 5000


def test_stage1_and_interleave_arms_run_their_own_stages(out, capsys):
    seed = out / "seed0-scale0.02"
    _, lines = run("stage1", out, capsys)  # its first arm is the default settings, already run by the anyres claim
    assert [line.split(",")[0] for line in lines if ", seed 0: " in line] == ["stage1: no stage 1"]
    (no_stage_1,) = seed.glob("stage15_steps=*-stages=1.5+2")
    assert (no_stage_1 / "stage1.5").is_dir() and not (no_stage_1 / "stage1").exists()
    results, _ = run("interleave", out, capsys)
    for arm in results.values():
        assert 0 <= arm[0]["compare"] <= 1 and 0 <= arm[0]["motion"] <= 1
    (from_stage_1,) = seed.glob("*stages=1+interleave")
    assert (from_stage_1 / "interleave").is_dir() and not (from_stage_1 / "stage2").exists()
    _, lines = run("interleave", out, capsys)  # a second call trains nothing: every arm-seed is read back
    assert not any(", seed 0: " in line for line in lines), lines


def test_verdict_compares_the_means_and_each_seed_with_its_own():
    def results(first, other):
        return {arm: [{"heldout": v, "per_type": {}} for v in values]
                for arm, values in zip(claim.arms, (first, other))}

    claim = ablations.CLAIMS["interleave"]
    # the interleave claim as measured: higher at each seed, though one seed's first arm is below another's second
    line = ablations.verdict(claim, results([0.68, 0.578, 0.68], [0.622, 0.51, 0.652]))
    assert line.startswith("heldout: from stage 2 0.646 vs from stage 1 0.595") and line.endswith("(every seed)"), line
    line = ablations.verdict(claim, results([0.68, 0.50, 0.68], [0.622, 0.51, 0.652]))
    assert line.endswith("agrees with the paper (on the mean, not at every seed)"), line
    assert ablations.verdict(claim, results([0.5, 0.5], [0.6, 0.4])).endswith("does not agree with the paper")
    threshold = ablations.CLAIMS["threshold"]  # a `keeps` claim: tau 9 keeps 50% of the score, then 95%
    runs = {arm: [{"heldout": v, "per_type": {}}] for arm, v in zip(threshold.arms, (0.8, 0.4))}
    assert ablations.verdict(threshold, runs).endswith("does not keep 95% of it, disagreeing with the paper")
    runs["tau 9"] = [{"heldout": 0.76, "per_type": {}}]
    assert ablations.verdict(threshold, runs).endswith("keeps 95% of it, agreeing with the paper")
