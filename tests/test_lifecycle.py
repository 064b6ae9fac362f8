"""The embedded default in miniature: the toy life cycle runs every stage through train.train, its losses fall, it
prints the line other scripts read, and infer.py answers from its result."""

import json
import re

from lifecycle import ToyRun, life_cycle

import infer


def test_toy_life_cycle_end_to_end(tmp_path, capsys):
    run = ToyRun(out=str(tmp_path / "toy"), n_train=256, n_eval=25, stage0_vision_steps=10, stage1_steps=8,
                 stage15_steps=8, stage2_steps=24, interleave_steps=8, batch=16)
    life_cycle(run)
    *_, interleave, last = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"toy: held-out accuracy (\d\.\d\d), blank-image accuracy (\d\.\d\d), wall (\d+) s", last)
    assert match, last
    assert re.fullmatch(r"toy: multi-image accuracy \d\.\d\d \(blank \d\.\d\d\), motion accuracy \d\.\d\d \(blank \d\.\d\d\)",
                        interleave), interleave
    for stage in ("stage1", "stage1.5", "stage2", "interleave"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / "toy" / stage / "metrics.jsonl").read_text().splitlines()]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (stage, losses)
    infer.main([str(tmp_path / "toy" / "data" / "images" / "eval_000000.png"), "What color is the circle?",
                "--model", str(tmp_path / "toy" / "interleave" / "final"), "--json", "--max-new-tokens", "3"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["image_tokens"][0] in (30, 33, 51)  # 9 base tokens + the grid with a newline per row and len(answer["output_token_ids"]) >= 1
