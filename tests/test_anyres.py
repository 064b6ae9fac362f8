"""AnyRes, as a specification: grid choice, token counts of the facts' worked examples, the two compat readings,
and agreement with the original LLaVA code (pixels and token counts)."""

import re

import pytest
import torch
from conftest import photo

from anyres import (
    MAX_GRID_SIDE,
    HigherAnyRes,
    grid_shape,
    num_image_tokens,
    parse_grid_pinpoints,
    process_image,
    process_images,
    select_best_resolution,
    unpad_bounds,
    video_tokens,
)
from model import LlavaConfig, VisionConfig

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP = VisionConfig(kind="clip", image_size=336, patch_size=14, hidden_size=1024, num_layers=23)
SIGLIP = VisionConfig(kind="siglip", image_size=384, patch_size=14, hidden_size=1152, num_layers=26,
                      select_feature="full")


def llava_16(compat="original"):
    return LlavaConfig(vision=CLIP, grid_pinpoints=NEXT_PINPOINTS, compat=compat)


def onevision(compat="original"):
    return LlavaConfig(vision=SIGLIP, image_aspect_ratio="anyres_max_9",
                       grid_pinpoints=parse_grid_pinpoints("(1x1),...,(6x6)", 384), compat=compat)


def llava_15(compat="original"):
    return LlavaConfig(vision=CLIP, image_aspect_ratio="pad", merge_type="flat", compat=compat)


def test_range_syntax_expands_i_outer_j_inner():
    grid = parse_grid_pinpoints("(1x1),...,(6x6)", 384)
    assert len(grid) == 36
    assert grid[:3] == [[384, 384], [384, 768], [384, 1152]] and grid[6] == [768, 384] and grid[-1] == [2304, 2304]
    assert parse_grid_pinpoints("[[336, 672], [672, 336]]", 336) == [[336, 672], [672, 336]]


def test_pinpoints_from_a_config_are_bounded_before_they_are_expanded():
    """A config from anywhere: the range syntax is checked before it expands (100000 x 100000 would be 10^10
    canvases), every canvas holds 1 to MAX_GRID_SIDE crops a side (smaller gives no crop, larger a canvas of
    terabytes), and max_grid likewise."""
    for value, words in [("(1x1),...,(100000x100000)", "[33600000, 33600000]"), ([[3360000, 3360000]], "3360000"),
                         ([[100, 336]], "[100, 336]"), ("[[336, 672], [672]]", "[672]")]:
        with pytest.raises(ValueError, match=re.escape(words) + ".*expected two sides of 336 to 4032 px"):
            parse_grid_pinpoints(value, 336)
    assert len(parse_grid_pinpoints(f"(1x1),...,({MAX_GRID_SIDE}x{MAX_GRID_SIDE})", 336)) == MAX_GRID_SIDE ** 2
    with pytest.raises(ValueError, match="max_grid = 13: expected at most 12"):
        HigherAnyRes(max_grid=13)


def test_select_best_resolution_worked_example():
    # 640x480 in LLaVA-1.6 picks the 672x672 canvas (2 x 2 crops)
    assert select_best_resolution((640, 480), [tuple(p) for p in NEXT_PINPOINTS]) == (672, 672)
    assert grid_shape((640, 480), llava_16()) == (2, 2)
    assert grid_shape((1920, 1080), onevision()) == (5, 3)


def test_small_image_tie_is_transposed_in_transformers_mode():
    # both 336x672 rectangles hold a <=336 image at scale >= 1: the original takes (w=336, h=672), transformers
    # reads the same pair as (h=336, w=672)
    assert grid_shape((300, 200), llava_16("original")) == (1, 2)
    assert grid_shape((300, 200), llava_16("transformers")) == (2, 1)


@pytest.mark.parametrize("cfg, size, tokens", [
    (llava_16(), (640, 480), 2340),
    (llava_16(), (300, 100), 776),
    (onevision(), (640, 480), 2929),
    (onevision(), (1920, 1080), 7269),  # interpolated from 75x135 to 60x108 by anyres_max_9
    (onevision(), (2304, 2304), 7371),
    (onevision(), (1000, 1000), 7371),
    (llava_15(), (640, 480), 576),
])
def test_token_counts_of_the_worked_examples(cfg, size, tokens):
    assert num_image_tokens(size, cfg) == tokens


def test_unpad_rounding_differs_between_compat_modes():
    # the grid held fixed (2 rows x 1 col for 55x176 in LLaVA-1.6): int() keeps 1296, round-to-7 keeps 1392
    # 55 * 48/176 = 14.999999999999998: int() gives 14 columns of image, round-to-7 gives 15
    assert unpad_bounds(48, 24, (55, 176), "original") == (0, 48, 5, 19)  # 14 columns kept
    assert unpad_bounds(48, 24, (55, 176), "transformers") == (0, 48, 4, 20)  # 16 columns kept
    assert num_image_tokens((55, 176), llava_16("original")) == 576 + 48 * 15 == 1296
    # with the real processors, transformers also transposes the tied grid, giving 792 and 1128 tokens
    assert num_image_tokens((55, 176), llava_16("transformers")) == 792
    assert num_image_tokens((88, 99), llava_16("transformers")) == 1128


def test_processed_image_layout():
    image = photo(640, 480)
    p = process_image(image, llava_16())
    assert p.pixels.shape == (5, 3, 336, 336) and p.grid == (2, 2) and p.size == (640, 480) and p.num_tokens == 2340
    # the canvas was padded with black: the top rows of the first crop are (0 - mean) / std
    assert torch.allclose(p.pixels[1, 0, 0, 0], torch.tensor(-0.48145466 / 0.26862954))
    q = process_image(image, llava_15())
    assert q.pixels.shape == (1, 3, 336, 336) and q.grid is None and q.num_tokens == 576


SIZES = [(640, 480), (300, 100), (55, 176), (88, 99), (1024, 200), (200, 1024), (336, 336), (1000, 333), (37, 501)]


@pytest.mark.parametrize("size", SIZES)
def test_counts_agree_with_the_original_llava_code(original_llava, size):
    mm = original_llava.mm_utils
    cfg = llava_16()
    cols, rows = mm.get_anyres_image_grid_shape(size, NEXT_PINPOINTS, 336)
    assert (cols, rows) == grid_shape(size, cfg)
    unpadded = original_llava.unpad_image(torch.zeros(1, rows * 24, cols * 24), size)
    assert num_image_tokens(size, cfg) == 576 + unpadded.shape[1] * (unpadded.shape[2] + 1)


@pytest.mark.parametrize("size", [(640, 480), (150, 500), (1000, 333), (336, 336)])
@pytest.mark.parametrize("aspect", ["anyres", "pad"])
def test_pixels_identical_to_the_original_llava_code(original_llava, size, aspect):
    from types import SimpleNamespace

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image = photo(*size, seed=size[0])
    model_cfg = SimpleNamespace(image_aspect_ratio=aspect, image_grid_pinpoints=str(NEXT_PINPOINTS))
    theirs = original_llava.mm_utils.process_images([image], processor, model_cfg)[0]
    ours = process_image(image, llava_16() if aspect == "anyres" else llava_15()).pixels
    theirs = theirs if theirs.dim() == 4 else theirs[None]
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------------------------------------------
# Several images, video, and the Higher-AnyRes knobs


def knobs(cfg, **values):
    cfg.higher_anyres = HigherAnyRes(**values)
    return cfg


def test_several_images_are_padded_to_one_crop_each():
    # 27 * 27 + 1 newline = 730 per image at 384; 576 + 1 for LLaVA-1.6's CLIP
    assert num_image_tokens((640, 480), onevision(), num_images=2) == 730
    assert num_image_tokens((640, 480), llava_16(), num_images=3) == 577
    # transformers' OneVision processor agrees; its LLaVA-NeXT processor tiles every image
    assert num_image_tokens((640, 480), onevision("transformers"), num_images=2) == 730
    assert num_image_tokens((640, 480), llava_16("transformers"), num_images=2) == 2340
    assert num_image_tokens((640, 480), knobs(onevision(), multi_image="anyres"), num_images=2) == 2929
    images = [photo(60, 30, seed=1), photo(30, 90, seed=2)]
    ours = process_images(images, onevision())
    assert [p.pixels.shape[0] for p in ours] == [1, 1] and all(p.grid is None for p in ours)
    assert [p.num_tokens for p in ours] == [730, 730]
    # the 60x30 image sits on a 60x60 square of SigLIP's mean colour (127, 127, 127): the top row is flat grey
    top = ours[0].pixels[0, :, 0]
    assert torch.allclose(top, torch.full_like(top, 127 / 255 * 2 - 1), atol=1e-6)
    assert process_images(images[:1], onevision())[0].num_tokens == num_image_tokens((60, 30), onevision())


def test_video_tokens_are_196_per_frame_plus_one_newline():
    # bilinear 27 -> ceil(27 / 2) = 14 per side after the projector, one newline per video
    assert video_tokens(32, onevision()) == 196 * 32 + 1 == 6273
    assert video_tokens(8, onevision()) == 1569
    # NeXT-Video's average pooling drops the ragged edge: floor(27 / 2) = 13
    assert video_tokens(8, knobs(onevision(), pool="average")) == 169 * 8 + 1
    assert video_tokens(8, knobs(onevision(), pool_stride=3)) == 81 * 8 + 1


def test_knobs_off_reproduce_the_release():
    assert HigherAnyRes().changed() == {}
    for cfg, size, tokens in [(llava_16(), (640, 480), 2340), (onevision(), (1920, 1080), 7269),
                              (llava_15(), (640, 480), 576)]:
        assert num_image_tokens(size, knobs(cfg)) == tokens


def test_max_grid_uses_every_grid_up_to_n_by_n():
    # LLaVA-1.6's five canvases give 1920x1080 a 3x1 grid (1948 tokens); up to 6x6 it gets 6 cols x 4 rows of 24 x 24
    # features, a 96 x 144 map whose unpadding keeps 82 rows: 576 + 82 * (144 + 1)
    assert num_image_tokens((1920, 1080), llava_16()) == 1948
    assert grid_shape((1920, 1080), knobs(llava_16(), max_grid=6)) == (6, 4)
    assert num_image_tokens((1920, 1080), knobs(llava_16(), max_grid=6)) == 576 + 82 * 145 == 12466
    assert grid_shape((1920, 1080), knobs(onevision(), max_grid=2)) == (2, 2)


def test_token_threshold_shrinks_the_grid_map_as_the_formula_says():
    # tau = 9 crops of 576: t = sqrt(82 * 144 / 5184) = 1.509 -> (int(82 // t), int(144 // t)) = (54, 95)
    assert num_image_tokens((1920, 1080), knobs(llava_16(), max_grid=6, token_threshold=9 * 576)) == 576 + 54 * 96
    # OneVision with tau = 4 crops instead of anyres_max_9's 9: 75 x 135 -> t = 1.863 -> 40 x 72
    assert num_image_tokens((1920, 1080), knobs(onevision(), token_threshold=4 * 729)) == 729 + 40 * 73
    # under 1.1^2 tau nothing changes: 640x480 keeps its 40 x 54 map
    assert num_image_tokens((640, 480), knobs(onevision(), token_threshold=4 * 729)) == 2929


def test_pooling_images_shrinks_every_crop_map():
    # 27 -> 14 per side: base 196, grid 2 x 2 crops = a 28 x 28 map, unpadded to 22 rows (int(480 * 28 / 640) = 21,
    # padding (28 - 21) // 2 = 3 each side)
    assert num_image_tokens((640, 480), knobs(onevision(), pool_images=True)) == 196 + 22 * 29
    assert num_image_tokens((640, 480), knobs(onevision(), pool_images=True), num_images=2) == 196 + 1


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="pool"):
        HigherAnyRes(pool="max")
    with pytest.raises(ValueError, match="max_grid"):
        HigherAnyRes(max_grid=0)
