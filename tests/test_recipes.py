"""recipes.py: every published recipe is a valid TrainConfig, its grids parse to the release's canvases, the
stage-specific settings the official scripts use survive the table's shared parts, and a recipe's images are
unpacked once however many ranks start together."""

import multiprocessing
import zipfile

import pytest

import train
from anyres import NEXT_GRIDS, parse_grid_pinpoints
from recipes import RECIPES, unpack_once


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


def unpack_after(barrier, archive, unpacked, out):
    barrier.wait()  # every process starts together, as torchrun's ranks do
    try:
        unpack_once(archive, unpacked)
        out.put("ok")
    except BaseException as e:  # noqa: BLE001 - the test reports what any process met
        out.put(f"{type(e).__name__}: {e}")


def test_ranks_starting_together_unpack_the_images_once(tmp_path):
    """The recipe's image zip, unpacked by four processes at once (every rank runs parse_args before the process
    group exists): each finds the whole folder, and no file was written twice into it."""
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(300):
            z.writestr(f"coco/{i:04d}.jpg", bytes([i % 256]) * 2000)
    unpacked, ctx = tmp_path / "unpacked", multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=unpack_after, args=(barrier, archive, unpacked, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 4
    files = sorted(unpacked.rglob("*.jpg"))
    assert len(files) == 300 and all(f.read_bytes() == bytes([int(f.stem) % 256]) * 2000 for f in files)
    assert not unpacked.with_suffix(".tmp").exists()
