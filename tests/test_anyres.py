"""AnyRes, as a specification: grid choice, token counts of the facts' worked examples, the two compat readings,
and agreement with the original LLaVA code (pixels and token counts)."""

import pytest
import torch
from conftest import photo

from anyres import (
    grid_shape,
    num_image_tokens,
    parse_grid_pinpoints,
    process_image,
    select_best_resolution,
    unpad_bounds,
)
from model import LlavaConfig, VisionConfig

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP = VisionConfig(kind="clip", image_size=336, patch_size=14, hidden_size=1024, num_layers=23)
SIGLIP = VisionConfig(kind="siglip", image_size=384, patch_size=14, hidden_size=1152, num_layers=26, select_feature="full")


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


def test_select_best_resolution_worked_example():
    # facts §2.17: 640x480 in LLaVA-1.6 picks the 672x672 canvas (2 x 2 crops)
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
    # the grid held fixed (2 rows x 1 col for 55x176 in LLaVA-1.6): int() keeps 1296, round-to-7 keeps 1392 (facts §2.10)
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
