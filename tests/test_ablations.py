"""The ablations in miniature of the miniature: every claim's arms run end to end at a tiny scale (one seed, a few
steps), their scores and visual-token counts land in results.json, the verdict line and the plot are written, and a
second call reads finished arms back instead of training them again."""

import json
import re
from pathlib import Path

import pytest

import train
from anyres import HigherAnyRes, grid_shape, num_image_tokens
from model import LlavaConfig
from toy import ablations
from toy.lifecycle import stage_configs
from toy.scene import TALL_SIZES
from toy.stage0 import GRID_PINPOINTS, tower_config


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


def test_formats_arms_continue_from_the_default_arms_stage_2_model_run_first_where_missing(out, capsys):
    seed = out / "seed0-scale0.02"
    results, lines = run("formats", out, capsys)  # the first test of the module: no default arm yet
    trained = [line.split(", seed 0")[0] for line in lines if ", seed 0: " in line]
    assert trained[0] == "formats: the default arm, where the arms start" and len(trained) == 4, lines
    assert (seed / "default" / "stage2" / "final").is_dir()
    for arm, scores in results.items():
        s = scores[0]
        assert s["formats"] == (s["front"] + s["interleaved"]) / 2 and all(0 <= s[k] <= 1 for k in ("front", "heldout"))
        folder = seed / f"image_placement={arm}-init=stage2-stages=formats"
        assert (folder / "formats" / "final").is_dir() and not (folder / "stage2").exists()
    _, lines = run("formats", out, capsys)  # a second call trains nothing, the default arm included
    assert not any(", seed 0: " in line for line in lines), lines


def test_formats_and_higher_anyres_arms_start_where_their_claim_says(tmp_path):
    seed = tmp_path / "seed0-scale1"
    for placement in ("mixed", "front", "interleaved"):
        run_ = ablations.arm_run(tmp_path, "formats", placement, 0, 1.0)
        (config,) = stage_configs(train, run_, Path(run_.data), Path(run_.stage0))
        assert config.model == str(seed / "default" / "stage2" / "final") and config.image_placement == placement
        assert config.max_steps == 200 and run_.data == str(seed / "data") and config.knobs == {}
    tall = tmp_path / "seed0-scale1-tall"
    runs = {arm: ablations.arm_run(tmp_path, "higher_anyres", arm, 0, 1.0)
            for arm in ablations.CLAIMS["higher_anyres"].arms}
    configs = {arm: stage_configs(train, r, Path(r.data), Path(r.stage0)) for arm, r in runs.items()}
    assert [c.output_dir for c in configs["default grid"]] == [str(tall / "default" / s)
                                                                for s in ("stage1", "stage1.5", "stage2")]
    assert configs["default grid"][-1].knobs == {} and configs["default grid"][-1].max_steps == 200
    for arm, knobs in (("larger grid", {"max_grid": 6}),
                       ("larger grid, tau 27", {"max_grid": 6, "token_threshold": 27})):
        (config,) = configs[arm]  # stage 2 alone, from the default grid's stage 1.5: the same start for every arm
        assert config.model == str(tall / "default" / "stage1.5" / "final") and config.knobs == knobs
        assert config.max_steps == 200 and config.data == str(tall / "data" / "instruct.json")


def test_higher_anyres_arms_show_the_tall_scenes_at_these_token_counts():
    """The default grid fits a 48x192 scene into its 1x3 canvas at 3/4 size and a 48x288 one at half size (unpad
    keeps a 9 x 1 map of the latter); grids up to 6x6 cut them into 1x4 and 1x6 crops at full size (12 x 3 and
    18 x 3 maps); tau 27 shrinks those to 10 x 2 and 12 x 2. Base view 9 tokens, plus a newline per row."""
    def tokens(arm):
        r = ablations.arm_run(Path("out"), "higher_anyres", arm, 0, 1.0)
        knobs = stage_configs(train, r, Path("d"), Path("s"))[-1].knobs  # what its stage 2 trains with
        cfg = LlavaConfig(vision=tower_config(r), image_aspect_ratio="anyres",
                          grid_pinpoints=json.loads(GRID_PINPOINTS), higher_anyres=HigherAnyRes(**knobs))
        return [(grid_shape(size, cfg), num_image_tokens(size, cfg)) for size in TALL_SIZES]

    default = [((1, 2), 33), ((1, 3), 45)]
    assert tokens("default grid") == default + [((1, 3), 45), ((1, 3), 9 + 9 * 2)]
    assert tokens("larger grid") == default + [((1, 4), 9 + 12 * 4), ((1, 6), 9 + 18 * 4)]
    assert tokens("larger grid, tau 27") == default + [((1, 4), 9 + 10 * 3), ((1, 6), 9 + 12 * 3)]


def test_higher_anyres_end_to_end_in_its_own_world(out, capsys):
    results, lines = run("higher_anyres", out, capsys)
    # each arm once: the default grid's run, which the larger grids continue from, first
    trained = [line.split(", seed 0")[0] for line in lines if ", seed 0: " in line]
    assert trained[0] == "higher_anyres: default grid" and len(trained) == 3, lines
    tall = out / "seed0-scale0.02-tall"
    assert json.loads((tall / "data" / "manifest.json").read_text())["config"]["sizes"] == [list(s) for s in TALL_SIZES]
    assert not (tall / "init=stage1.5-max_grid=6-stages=2" / "stage1.5").exists()
    # each arm's mean visual tokens over the first 100 eval images, as the counter says for each size
    scenes = json.loads((tall / "data" / "scenes.json").read_text())
    sizes = [tuple(scenes[r["image"]]["size"]) for r in json.loads((tall / "data" / "eval.json").read_text())[:100]]
    per_size = {"default grid": {(48, 96): 33, (48, 144): 45, (48, 192): 45, (48, 288): 27},
                "larger grid": {(48, 96): 33, (48, 144): 45, (48, 192): 57, (48, 288): 81},
                "larger grid, tau 27": {(48, 96): 33, (48, 144): 45, (48, 192): 39, (48, 288): 45}}
    for arm, counts in per_size.items():
        assert results[arm][0]["visual_tokens"] == pytest.approx(sum(counts[s] for s in sizes) / len(sizes))
    assert len(set(sizes)) == 4
    pytest.importorskip("matplotlib")
    assert (out / "higher_anyres" / "higher_anyres.png").stat().st_size > 5000


def test_anyres_arms_differ_in_visual_tokens_as_the_setting_says(out, capsys):
    results, _ = run("anyres", out, capsys)
    tokens = {arm: r[0]["visual_tokens"] for arm, r in results.items()}
    # the toy's scenes are 1x2 or 1x3 crops: 9 base tokens + 3 per row (with its newline) x 6 or 9
    assert tokens["pad"] == 9 and 33 <= tokens["anyres"] <= 45, tokens
    pytest.importorskip("matplotlib")
    assert (out / "anyres" / "anyres.png").stat().st_size > 5000


def test_stage1_and_interleave_arms_run_their_own_stages(out, capsys):
    seed = out / "seed0-scale0.02"
    _, lines = run("stage1", out, capsys)  # its first arm is the default settings, already run for the formats claim
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


def test_formats_verdict_reads_the_mean_of_the_two_placements():
    claim = ablations.CLAIMS["formats"]

    def results(*means):
        return {arm: [{"formats": m, "per_type": {}}] for arm, m in zip(claim.arms, means)}

    assert claim.metric == "formats" and list(claim.arms) == ["mixed", "front", "interleaved"]
    line = ablations.verdict(claim, results(0.9, 0.7, 0.75))
    assert line == ("formats: mixed 0.900 vs front 0.700, interleaved 0.750: the miniature agrees with the paper "
                    "(every seed)")
    line = ablations.verdict(claim, results(0.8, 0.85, 0.6))  # one single-placement arm does better on the mean
    assert line.endswith("the miniature does not agree with the paper"), line
    # as measured: every arm at chance (0.5), where "mixed" is ahead by noise; that is no agreement
    line = ablations.verdict(claim, results(0.513, 0.509, 0.507))
    assert line.endswith("every arm is at chance (0.50): the miniature learned nothing to compare, so it can neither "
                         "agree nor disagree with the paper"), line
    assert "agrees" in ablations.verdict(claim, results(0.6, 0.52, 0.51))  # one arm clear of chance is a result


def test_higher_anyres_verdict_is_the_share_of_the_larger_grids_gain_kept():
    claim = ablations.CLAIMS["higher_anyres"]

    def results(tau, default, larger):
        return {arm: [{"heldout": v, "per_type": {}}] for arm, v in zip(claim.arms, (tau, default, larger))}

    assert list(claim.arms) == ["larger grid, tau 27", "default grid", "larger grid"] and claim.keeps == 0.5
    line = ablations.verdict(claim, results(0.62, 0.5, 0.7))
    assert line.endswith(": larger grid, tau 27 keeps 60% of larger grid's gain over default grid (the paper: most; "
                         "here at least 50%), agreeing with the paper"), line
    assert ablations.verdict(claim, results(0.55, 0.5, 0.7)).endswith("keeps 25% of larger grid's gain over default "
                                                                      "grid (the paper: most; here at least 50%), "
                                                                      "disagreeing with the paper")
    line = ablations.verdict(claim, results(0.7, 0.6, 0.58))  # no gain: nothing for tau to keep, whatever it scores
    assert line.endswith("larger grid gains nothing over default grid: nothing to keep, disagreeing with the paper")


def test_anyres_arms_share_a_tower_that_learned_whole_views_and_the_other_claims_keep_the_default_tower(tmp_path):
    seed = tmp_path / "seed0-scale1"
    anyres = [ablations.arm_run(tmp_path, "anyres", arm, 0, 1.0) for arm in ("anyres", "pad")]
    assert all(r.stage0_whole_views and r.stage0 == str(seed / "stage0-whole") for r in anyres)
    assert [r.image_aspect_ratio for r in anyres] == ["anyres", "pad"]
    others = [ablations.arm_run(tmp_path, "stage1", "stage 1 first", 0, 1.0),
              ablations.arm_run(tmp_path, "formats", "mixed", 0, 1.0)]
    assert all(not r.stage0_whole_views and r.stage0 == str(seed / "stage0") for r in others)
    # the formats arms start from the default arm, whose tower is the default one, not the anyres arms'
    assert others[1].init == str(seed / "default" / "stage2" / "final") != anyres[0].out


def test_anyres_verdict_also_says_whether_the_pad_arm_still_sees_the_coarse_things():
    def scores(letter, color, count, position):
        return {"per_type": {"letter": letter, "color": color, "count": count, "position": position}}

    claim = ablations.CLAIMS["anyres"]
    anyres = [scores(0.87, 0.81, 1.0, 0.76), scores(1.0, 0.74, 1.0, 0.35)]
    # chance: colour 1/4, count and position 1/3; twice chance is 0.5 and 0.67
    seeing = {"anyres": anyres, "pad": [scores(0.21, 0.70, 0.78, 0.72), scores(0.18, 0.50, 0.69, 0.76)]}
    line = ablations.verdict(claim, seeing)
    assert "agrees with the paper (every seed); pad still answers the coarse questions" in line, line
    assert "(lowest color 0.50 against 0.25, count 0.69 against 0.33, position 0.72 against 0.33)" in line, line
    blind = {"anyres": anyres, "pad": [scores(0.17, 0.25, 0.78, 0.72), scores(0.17, 0.70, 0.78, 0.72)]}
    assert "pad does not answer the coarse questions" in ablations.verdict(claim, blind)
    # the other claims say nothing of it
    assert "coarse" not in ablations.verdict(ablations.CLAIMS["stage1"], {
        "stage 1 first": [{"heldout": 0.7, "per_type": {}}], "no stage 1": [{"heldout": 0.5, "per_type": {}}]})
