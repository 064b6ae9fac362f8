"""recipes.py: every published recipe is a valid TrainConfig, its grids parse to the release's canvases, and the
stage-specific settings the official scripts use survive the table's shared parts."""

import pytest

import train
from anyres import NEXT_GRIDS, parse_grid_pinpoints
from recipes import RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_a_train_config(name):
    cfg = train.parse_args(["--recipe", name, "--plan"])  # --plan: nothing is downloaded
    for key, value in RECIPES[name].items():
        if not key.startswith("data_"):
            assert getattr(cfg, key) == value, key


def test_grids_and_stage_settings():
    assert parse_grid_pinpoints(RECIPES["llava-next-stage2"]["grid_pinpoints"], 336) == NEXT_GRIDS
    assert len(parse_grid_pinpoints(RECIPES["onevision-0.5b-stage2"]["grid_pinpoints"], 384)) == 36
    assert RECIPES["llava-next-stage2"]["vision_lr"] == 2e-6 and "lora_rank" not in RECIPES["llava-next-stage2"]
    lora = RECIPES["llava-next-stage2-lora"]
    assert (lora["lr"], lora["projector_lr"], lora["lora_rank"], lora["lora_alpha"]) == (2e-4, 2e-5, 128, 256)
    assert RECIPES["onevision-0.5b-stage1.5"]["max_len"] == 8192
    assert RECIPES["onevision-0.5b-stage2"]["max_len"] == 32768
    assert RECIPES["llava-v1.5-stage1"]["template"] == "plain"
    assert RECIPES["llava-v1.5-stage2"]["template"] == "vicuna_v1"
