"""`python -m tools.anyres_picture IMAGE --model NAME --save grid.png`: the printed token rows add up to
`num_image_tokens` and match counts worked out by hand; the canvas panel has its crop boundaries, unpad cut and
newline column where the arithmetic puts them. Only config.json is read: the model folders here hold nothing else."""

import json

import pytest
from conftest import photo
from PIL import Image

import anyres
from tools import anyres_picture

# transformers' defaults for these model types are the released geometry: LLaVA-1.6 (CLIP-336, 5 grids up to
# 672 x 672) and OneVision (SigLIP-384, 1x1 ... 6x6 grids, anyres_max_9)
CONFIGS = {"next": {"model_type": "llava_next"}, "onevision": {"model_type": "llava_onevision"}}


@pytest.fixture
def models(tmp_path):
    for name, config in CONFIGS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    return tmp_path


def rows_of(out: str) -> list[int]:
    return [int(line.split()[0]) for line in out.strip().splitlines()]


def run(args, capsys):
    anyres_picture.main([str(a) for a in args])
    return rows_of(capsys.readouterr().out)


def test_printed_rows_worked_out_by_hand(models, tmp_path, capsys):
    photo(1000, 600).save(tmp_path / "wide.png")
    # LLaVA-1.6: 672 x 672 keeps the most pixels (2 x 2 crops); 48 x 48 features, of which unpad keeps
    # int(600 * 48 / 1000) = 28 rows; 576 + 28 * 48 + 28 newlines
    assert run([tmp_path / "wide.png", "--model", models / "next"], capsys) == [576, 1344, 28, 1948]
    Image.new("RGB", (2000, 1500), (90, 140, 200)).save(tmp_path / "big.png")  # only its size matters here
    # OneVision: 2304 x 1536 (6 x 4 crops of 384), 108 x 162 features, unpad keeps 108 x int(2000 * 108 / 1500) = 144;
    # anyres_max_9 shrinks by t = sqrt(108 * 144 / (9 * 729)) = 1.54 to 70 x 93; 729 + 70 * 93 + 70
    assert run([tmp_path / "big.png", "--model", models / "onevision"], capsys) == [729, 6510, 70, 7309]
    # one of two images in a prompt: padded to one crop, 27 x 27 + 1 newline
    assert run([tmp_path / "big.png", "--model", models / "onevision", "--images", "2"], capsys) == [729, 1, 730]


@pytest.mark.parametrize("size, flags", [((1000, 600), ["--max-grid", "4"]), ((300, 1200), []),
                                         ((640, 480), ["--compat", "transformers"])])
def test_rows_add_up_to_num_image_tokens(models, tmp_path, capsys, size, flags):
    photo(*size).save(tmp_path / "x.png")
    rows = run([tmp_path / "x.png", "--model", models / "next", *flags], capsys)
    cfg = anyres_picture.image_config(str(models / "next"), "transformers" if "--compat" in flags else "original")
    if flags[:1] == ["--max-grid"]:
        cfg.higher_anyres = anyres.HigherAnyRes(max_grid=4)
    assert sum(rows[:-1]) == rows[-1] == anyres.num_image_tokens(size, cfg)


def test_video_rows(models, tmp_path, capsys):
    frames = [photo(64, 48, seed=s) for s in range(3)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    # SigLIP-384/14: 27 x 27 features per frame, pooled bilinearly to ceil(27 / 2) = 14 per side; one newline
    assert run(["--video", tmp_path / "clip.gif", "--model", models / "onevision"], capsys) == [3 * 196, 1, 589]


def test_canvas_panel(models):
    """1000 x 600 on LLaVA-1.6 at one screen pixel per canvas pixel: two 336 px crops per side, unpad cuts 10 feature
    rows (140 px) above and below, the newline column stands beside rows 140..532."""
    cfg = anyres_picture.image_config(str(models / "next"), "original")
    image = photo(1000, 600)
    panel, titles, crop = anyres_picture.draw_canvas(image, cfg, box=672)
    assert crop == 336 and panel.size == (672 + anyres_picture.NEWLINE_COLUMN, 672)
    assert titles[0] == "canvas 672 x 672: 2 columns x 2 rows of 336px crops"
    canvas = anyres.resize_and_pad(image, (672, 672))
    px = panel.load()
    assert any(all(px[x, y] == (255, 255, 255) for y in range(150, 520)) for x in (335, 336))  # crop boundary
    assert any(all(px[x, y] == (255, 255, 255) for x in range(10, 660)) for y in (335, 336))
    assert px[100, 300] == canvas.getpixel((100, 300)) and px[500, 450] == canvas.getpixel((500, 450))  # kept: as is
    for y in (5, 139, 533, 660):  # cut: red blended over the canvas (the image itself reaches rows 134..537)
        expected = [c * (1 - 110 / 255) + red * 110 / 255 for c, red in zip(canvas.getpixel((100, y)), (220, 30, 30))]
        assert all(abs(a - b) <= 1 for a, b in zip(px[100, y], expected))
    assert px[100, 141] == (0, 200, 0)  # the kept region's outline
    assert px[678, 300] == anyres_picture.NEWLINE_BLUE and px[678, 100] == (255, 255, 255)


def test_single_crop_panel_and_saved_picture(models, tmp_path, capsys):
    photo(500, 300).save(tmp_path / "x.png")
    anyres_picture.main([str(tmp_path / "x.png"), "--model", str(models / "onevision"), "--images", "2",
                         "--save", str(tmp_path / "pic.png")])
    assert rows_of(capsys.readouterr().out) == [729, 1, 730]
    picture = Image.open(tmp_path / "pic.png")
    # the image (fitted in 300 px), the padded 384 crop (shown at 460 px) side by side; no base view, no grid
    assert picture.width >= 20 + 300 + 40 + 460 and picture.height >= 50 + 460
    cfg = anyres_picture.image_config(str(models / "onevision"), "original")
    panel, titles, _ = anyres_picture.draw_canvas(Image.open(tmp_path / "x.png"), cfg, num_images=2, box=384)
    assert panel.size == (384, 384) and titles == ["the one crop the tower sees, 384 x 384 (padded to a square)"]
    assert panel.getpixel((192, 10)) == (127, 127, 127)  # SigLIP's mean colour above the image


def test_no_image_prints_the_budget_table(capsys):
    anyres_picture.main([])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| setting |") and "OneVision" in out


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.png", "--model", "{models}/next"], "missing image: "),
    (["{tmp}/x.png", "--model", "{tmp}/empty"], "no config.json; is this a model folder?"),
])
def test_bad_input_is_one_line(models, tmp_path, args, message):
    photo(50, 50).save(tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit:
        anyres_picture.main([a.format(tmp=tmp_path, models=models) for a in args])
    assert str(exit.value).startswith("error: ") and message in str(exit.value) and "\n" not in str(exit.value)


@pytest.mark.parametrize("preset, model_type", [("llava-v1.6-vicuna-7b", "llava_next"), ("llava-v1.5-7b", "llava"),
                                                ("llava-onevision-qwen2-0.5b-ov", "llava_onevision")])
def test_a_preset_needs_no_download(preset, model_type, tmp_path, monkeypatch, capsys):
    """The preset table holds the geometry: offline, with an empty cache, the counts are the released config's."""
    import huggingface_hub

    from convert import llava_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail(f"fetched {a}"))
    photo(1000, 600).save(tmp_path / "wide.png")
    total = run([tmp_path / "wide.png", "--model", preset], capsys)[-1]
    # what transformers' class defaults for the model type give: the released geometry
    cfg = llava_config({"model_type": model_type}, "config.json")
    assert total == anyres.num_image_tokens((1000, 600), cfg)
    assert total == {"llava": 576, "llava_next": 1948}.get(model_type, total)  # the hand-worked counts above
