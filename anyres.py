"""AnyRes: how one image of any size becomes crops for the vision tower, and how their features become tokens.

Pixels side (before the model), for an image of width W and height H:

    select_best_resolution  pick the canvas (w, h) from `grid_pinpoints` that keeps the most pixels, then wastes least
    resize_and_pad          fit the image in the canvas keeping its aspect ratio, centred on black
    crops                   cut the canvas into C x C crops, row-major; prepend the whole image squashed to C x C
                            -> pixels (1 + rows*cols, 3, C, C)

Feature side (inside the model, after tower and projector; every crop is (n*n, D) in LLM space):

    grid      crop (r, c) fills rows r*n.. and columns c*n.. of one (D, rows*n, cols*n) map
    unpad     cut away the rows or columns that only saw the black padding
    anyres_max_N (OneVision)  if the map is much larger than N crops, shrink it bilinearly to about N crops
    newline   append `image_newline` after every row; flatten row-major; the base image's n*n tokens go first

LLaVA-1.5 uses none of this: "pad" pastes the image on a square of the mean colour and takes one crop (576
tokens). `num_image_tokens` runs the same arithmetic as the model, so prompts reserve exactly the right count.

Two readings of the released configs exist (README, "Divergences"): `compat="original"` does what the code the
weights were trained with does; `compat="transformers"` does what the Hugging Face processor does.
"""

import ast
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

# Normalisation constants of the two towers (their own image processors).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def tower_mean_std(kind: str):
    return (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)


@dataclass
class ProcessedImage:
    pixels: torch.Tensor  # (N, 3, C, C): [base, crop_0, crop_1, ...] for AnyRes, a single crop otherwise
    size: tuple[int, int]  # the original image's (W, H)
    grid: tuple[int, int] | None  # (cols, rows) of AnyRes crops; None for a single crop
    num_tokens: int  # how many LLM positions this image fills


# ----------------------------------------------------------------------------------------------------------------
# Grid selection


def parse_grid_pinpoints(value, crop_size: int) -> list[list[int]]:
    """Pinpoints from a config: a list, its string form, or the training range syntax "(1x1),...,(6x6)".

    The range form expands to every (i, j) pair, i outer and j inner, times the crop size; this is the list
    OneVision's config.json holds (36 pairs from 384x384 to 2304x2304).
    """
    if isinstance(value, str):
        ranges = re.findall(r"\((\d+)x(\d+)\)", value)
        if ranges:
            (a0, b0), (a1, b1) = [tuple(map(int, r)) for r in (ranges[0], ranges[-1])]
            return [[i * crop_size, j * crop_size] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
        value = ast.literal_eval(value)
    return [list(map(int, p)) for p in value]


def candidate_resolutions(grid_pinpoints, compat: str) -> list[tuple[int, int]]:
    """The canvases as (width, height). The original code reads each pair as (w, h), transformers as (h, w);
    the released lists are symmetric, so only the order differs, and with it the winner of an exact tie."""
    if compat == "transformers":
        return [(b, a) for a, b in grid_pinpoints]
    return [(a, b) for a, b in grid_pinpoints]


def select_best_resolution(image_size, resolutions) -> tuple[int, int]:
    """The (w, h) canvas that shows the most of the image's pixels (no credit for upscaling beyond the
    original count), breaking ties by the least wasted canvas area; the first candidate wins exact ties."""
    W, H = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for w, h in resolutions:
        scale = min(w / W, h / H)
        effective = min(int(W * scale) * int(H * scale), W * H)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def grid_shape(image_size, cfg) -> tuple[int, int]:
    """(cols, rows) of C x C crops that AnyRes cuts this image into."""
    w, h = select_best_resolution(image_size, candidate_resolutions(cfg.grid_pinpoints, cfg.compat))
    return w // cfg.vision.image_size, h // cfg.vision.image_size


def uses_anyres(cfg) -> bool:
    return cfg.image_aspect_ratio.startswith("anyres")


def anyres_max_crops(cfg) -> int | None:
    match = re.fullmatch(r"anyres_max_(\d+)", cfg.image_aspect_ratio)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------------
# Pixels


def resize_and_pad(image: Image.Image, canvas) -> Image.Image:
    """Fit `image` inside the (w, h) canvas keeping its aspect ratio; centre it on black (odd pixel right/bottom)."""
    W, H = image.size
    w, h = canvas
    if w / W < h / H:
        new_w, new_h = w, min(math.ceil(H * w / W), h)
    else:
        new_w, new_h = min(math.ceil(W * h / H), w), h
    out = Image.new("RGB", (w, h), (0, 0, 0))
    out.paste(image.resize((new_w, new_h), Image.BICUBIC), ((w - new_w) // 2, (h - new_h) // 2))
    return out


def expand_to_square(image: Image.Image, background) -> Image.Image:
    """LLaVA-1.5 "pad": paste the image in the middle of a square of the tower's mean colour."""
    W, H = image.size
    if W == H:
        return image
    out = Image.new(image.mode, (max(W, H),) * 2, background)
    out.paste(image, (0, (W - H) // 2) if W > H else ((H - W) // 2, 0))
    return out


def tower_resize(image: Image.Image, vision) -> Image.Image:
    """The tower's own image processor: CLIP resizes the short side to C and centre-crops; SigLIP squashes to C x C."""
    C, (W, H) = vision.image_size, image.size
    if vision.kind != "clip":
        return image.resize((C, C), Image.BICUBIC)
    if (W, H) != (C, C):
        new_w, new_h = (C, int(C * H / W)) if W <= H else (int(C * W / H), C)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - C) // 2, (new_h - C) // 2
        image = image.crop((left, top, left + C, top + C))
    return image


def to_pixels(image: Image.Image, kind: str) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> normalised float32 (3, H, W). Rescaling goes through float64 as the Hugging Face
    processors do, so the two give bit-identical pixels."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in tower_mean_std(kind))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    x = (x.double() * (1 / 255)).float()
    return (x - mean) / std


def process_image(image: Image.Image, cfg) -> ProcessedImage:
    """One PIL image -> the crops the tower sees, per the model's `image_aspect_ratio` and `compat` mode."""
    image = image.convert("RGB")
    size, vision, C = image.size, cfg.vision, cfg.vision.image_size
    if uses_anyres(cfg):
        cols, rows = grid_shape(image.size, cfg)
        canvas = to_pixels(resize_and_pad(image, (cols * C, rows * C)), vision.kind)  # (3, rows*C, cols*C)
        crops = rearrange(canvas, "c (r h) (k w) -> (r k) c h w", h=C, w=C)  # row-major
        # the "global" view: the whole image squashed (not padded) to C x C, first in the list
        base = to_pixels(image.resize((C, C), Image.BICUBIC), vision.kind)
        pixels, grid = torch.cat([base[None], crops]), (cols, rows)
    else:
        if cfg.image_aspect_ratio == "pad" and cfg.compat == "original":
            # transformers' LLaVA-1.5 processor centre-crops instead (its do_pad is off by default)
            image = expand_to_square(image, tuple(int(m * 255) for m in tower_mean_std(vision.kind)[0]))
        pixels, grid = to_pixels(tower_resize(image, vision), vision.kind)[None], None
    return ProcessedImage(pixels, size, grid, num_image_tokens(size, cfg))


# ----------------------------------------------------------------------------------------------------------------
# Features


def unpad_bounds(map_h: int, map_w: int, image_size, compat: str):
    """(top, bottom, left, right) of the part of a (map_h, map_w) feature grid that saw the image, not padding.

    The original truncates the scaled side with int(); transformers first rounds to 7 decimals, which differs
    when the product lands just below an integer (e.g. a 55x176 image in LLaVA-1.6)."""
    W, H = image_size
    trunc = int if compat == "original" else (lambda x: int(round(x, 7)))
    if W / H > map_w / map_h:  # image wider than the canvas: padding was added above and below
        pad = (map_h - trunc(H * (map_w / W))) // 2
        return pad, map_h - pad, 0, map_w
    pad = (map_w - trunc(W * (map_h / H))) // 2
    return 0, map_h, pad, map_w - pad


def anyres_max_shape(h: int, w: int, side: int, max_crops: int):
    """OneVision's Higher-AnyRes budget: a map holding more than 1.1^2 x max_crops crops' worth of tokens is shrunk
    by t = sqrt(h*w / (max_crops * side^2)) per side (int(h // t), int(w // t))."""
    t = math.sqrt(h * w / (max_crops * side * side))
    return (int(h // t), int(w // t)) if t > 1.1 else (h, w)


def grid_token_shape(image_size, grid, cfg) -> tuple[int, int]:
    """(h, w) of the AnyRes feature map after unpad and the anyres_max shrink: the model's and the counter's rule."""
    n = cfg.vision.side
    cols, rows = grid
    top, bottom, left, right = unpad_bounds(rows * n, cols * n, image_size, cfg.compat)
    h, w = bottom - top, right - left
    if (max_crops := anyres_max_crops(cfg)) is not None:
        h, w = anyres_max_shape(h, w, n, max_crops)
    return h, w


def tokens_per_crop(vision) -> int:
    return vision.side**2 + (vision.kind == "clip" and vision.select_feature == "full")


def num_image_tokens(image_size, cfg) -> int:
    """LLM positions one image of size (W, H) fills; equal to what `merge_image_features` returns."""
    newline = int(cfg.has_newline)
    if not uses_anyres(cfg):
        return tokens_per_crop(cfg.vision) + newline
    grid = grid_shape(image_size, cfg)
    if cfg.merge_type == "flat":
        return (1 + grid[0] * grid[1]) * tokens_per_crop(cfg.vision)
    h, w = grid_token_shape(image_size, grid, cfg)
    return cfg.vision.side**2 + h * (w + newline)


def merge_image_features(features, image: ProcessedImage, newline, cfg):
    """features (N, n*n, D) of one image's crops, in LLM space -> its token sequence (T, D)."""
    if image.grid is None or cfg.merge_type == "flat":
        x = features.flatten(0, 1)
        return torch.cat([x, newline[None].to(x)]) if newline is not None else x
    n = cfg.vision.side
    cols, rows = image.grid
    base, crops = features[0], features[1:]
    x = rearrange(crops, "(r k) (h w) D -> D (r h) (k w)", r=rows, k=cols, h=n, w=n)  # the whole grid as one map
    top, bottom, left, right = unpad_bounds(x.shape[1], x.shape[2], image.size, cfg.compat)
    x = x[:, top:bottom, left:right]
    if (max_crops := anyres_max_crops(cfg)) is not None:
        h, w = anyres_max_shape(x.shape[1], x.shape[2], n, max_crops)
        if (h, w) != tuple(x.shape[1:]):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    x = torch.cat([x, newline[:, None, None].to(x).expand(-1, x.shape[1], 1)], dim=2)  # (D, h, w + 1)
    return torch.cat([base, rearrange(x, "D h w -> (h w) D")])
