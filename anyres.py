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

Several images in one prompt (NeXT-Interleave, OneVision) are each padded to a mean-colour square and take one
crop, n*n tokens + 1 newline (730 at 384 px): the original trains them so. A video is K frames, each squashed
to one crop, its n x n map pooled 2x2 (bilinear, after the projector: 27 -> 14 per side, 196 tokens per frame),
all frames in a row and one newline for the whole video: 196*K + 1 tokens, one placeholder.

`HigherAnyRes` holds the knobs of the NeXT ablation post (largest grid, token threshold, pooling); its defaults
change nothing, so a released checkpoint behaves exactly as released.

Two readings of the released configs exist (README, "Divergences"): `compat="original"` does what the code the
weights were trained with does; `compat="transformers"` does what the Hugging Face processor does.

`python -m tools.anyres_picture` prints the budget table of the releases; with `IMAGE --model NAME --save grid.png`
it prints where one image's tokens come from and draws it; `--video CLIP` does a video's frames.
"""

import argparse
import ast
import dataclasses
import functools
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
    video: bool = False  # pixels are a video's frames (N = K), pooled and closed by one newline


KNOB_CHOICES = {"pool": ("bilinear", "average"), "pool_position": ("after", "before"), "multi_image": ("pad", "anyres")}


# the largest canvas side, in crops, a config may ask for (releases use 3, OneVision 6): a config from anywhere
# cannot make the range syntax expand to billions of canvases, or a canvas of terabytes
MAX_GRID_SIDE = 12


@dataclass
class HigherAnyRes:
    """The visual-token budget, one place for every knob ("LLaVA-NeXT: what else influences visual instruction
    tuning", May 2024, and the OneVision release). The defaults reproduce the released checkpoints."""

    # The blog's Higher-AnyRes table: bigger grids help text-rich images as long as the token count is held in
    # check (next knob); OneVision trains with N = 6.
    max_grid: int | None = field(default=None, metadata={
        "help": "N: the canvases are every grid from 1x1 to NxN crops, the '(1x1),...,(NxN)' pinpoints, "
                "instead of the checkpoint's list"})
    # anyres_max_N is the released form of the same rule, with tau = N * n * n
    token_threshold: int | None = field(default=None, metadata={
        "help": "tau: a grid feature map of more than 1.1^2 * tau tokens is shrunk bilinearly to about tau "
                "(default: the checkpoint's anyres_max_N, i.e. N crops of tokens; none for plain anyres)"})
    # OneVision pools video frames bilinearly after the projector; LLaVA-NeXT-Video averages before it
    pool: str = field(default="bilinear", metadata={
        "help": "pooling of a crop's n x n feature map: bilinear to ceil(n/s) per side, average to floor(n/s)"})
    pool_stride: int = field(default=2, metadata={"help": "s, the pooling ratio per side"})
    pool_position: str = field(default="after", metadata={"help": "pool before or after the projector"})
    pool_images: bool = field(default=False, metadata={
        "help": "pool image crops (base and grid) too, not only video frames (an ablation; no release does)"})
    # the original trains several images padded, and transformers' OneVision processor agrees; its LLaVA-NeXT
    # processor tiles every image (compat="transformers" follows it, see `tiles_with_anyres`)
    multi_image: str = field(default="pad", metadata={
        "help": "several images in one prompt: pad each to a mean-colour square, one crop (730 tokens at 384 px), "
                "or tile each with AnyRes like a single image"})

    def __post_init__(self):
        for name, allowed in KNOB_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"HigherAnyRes.{name} = {getattr(self, name)!r}: expected one of {allowed}")
        for name in ("max_grid", "token_threshold", "pool_stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"HigherAnyRes.{name} = {value!r}: expected a positive integer")
        if self.max_grid is not None and self.max_grid > MAX_GRID_SIDE:
            raise ValueError(f"HigherAnyRes.max_grid = {self.max_grid}: expected at most {MAX_GRID_SIDE} crops a side")

    def changed(self) -> dict:
        """The knobs that differ from the defaults (what a checkpoint's config records)."""
        default = HigherAnyRes()
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) != getattr(default, f)}


def add_knob_flags(parser: argparse.ArgumentParser):
    """--max-grid, --token-threshold, --pool, ... for infer.py and train.py, one per HigherAnyRes field."""
    group = parser.add_argument_group("Higher-AnyRes knobs (anyres.HigherAnyRes; unset: the checkpoint's own)")
    for f in dataclasses.fields(HigherAnyRes):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            group.add_argument(flag, type=int if int in getattr(f.type, "__args__", (f.type,)) else str, default=None,
                               choices=KNOB_CHOICES.get(f.name), help=f.metadata["help"])


def knobs_from_flags(args) -> dict:
    """The knob flags a user set, as {field: value}."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(HigherAnyRes)
            if getattr(args, f.name, None) is not None}


# ----------------------------------------------------------------------------------------------------------------
# Grid selection


# LLaVA-NeXT's five canvases of 336-px crops (2x1, 1x2, 2x2, 3x1, 1x3): the 1.6 release's image_grid_pinpoints
NEXT_GRIDS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def parse_grid_pinpoints(value, crop_size: int) -> list[list[int]]:
    """Pinpoints from a config: a list, its string form, or the training range syntax "(1x1),...,(6x6)".

    The range form expands to every (i, j) pair, i outer and j inner, times the crop size; this is the list
    OneVision's config.json holds (36 pairs from 384x384 to 2304x2304). Empty or missing: no pinpoints.
    """
    if not value:
        return []
    if isinstance(value, str):
        ranges = re.findall(r"\((\d+)x(\d+)\)", value)
        if ranges:
            (a0, b0), (a1, b1) = [tuple(map(int, r)) for r in (ranges[0], ranges[-1])]
            check_canvas((a1 * crop_size, b1 * crop_size), crop_size)
            return [[i * crop_size, j * crop_size] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
        value = ast.literal_eval(value)
    pinpoints = [list(map(int, p)) for p in value]
    for p in pinpoints:
        check_canvas(p, crop_size)
    return pinpoints


def check_canvas(canvas, crop_size: int):
    """A canvas holds at least one crop and at most MAX_GRID_SIDE a side."""
    if len(canvas) != 2 or not all(crop_size <= side <= MAX_GRID_SIDE * crop_size for side in canvas):
        raise ValueError(f"grid pinpoint {list(canvas)}: expected two sides of {crop_size} to "
                         f"{MAX_GRID_SIDE * crop_size} px (1 to {MAX_GRID_SIDE} crops of {crop_size} px)")


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


def grid_pinpoints(cfg) -> list[list[int]]:
    """The canvases in play: the checkpoint's list, or every grid up to max_grid x max_grid."""
    if (N := cfg.higher_anyres.max_grid) is not None:
        return parse_grid_pinpoints(f"(1x1),...,({N}x{N})", cfg.vision.image_size)
    return cfg.grid_pinpoints


def grid_shape(image_size, cfg) -> tuple[int, int]:
    """(cols, rows) of C x C crops that AnyRes cuts this image into."""
    w, h = select_best_resolution(image_size, candidate_resolutions(grid_pinpoints(cfg), cfg.compat))
    return w // cfg.vision.image_size, h // cfg.vision.image_size


def uses_anyres(cfg) -> bool:
    return cfg.image_aspect_ratio.startswith("anyres")


def anyres_max_crops(cfg) -> int | None:
    match = re.fullmatch(r"anyres_max_(\d+)", cfg.image_aspect_ratio)
    return int(match.group(1)) if match else None


def token_threshold(cfg) -> int | None:
    """tau of the thresholded interpolation: the knob, else anyres_max_N's N crops of tokens, else none."""
    if cfg.higher_anyres.token_threshold is not None:
        return cfg.higher_anyres.token_threshold
    N = anyres_max_crops(cfg)
    return None if N is None else N * feature_side(cfg) ** 2


def tiles_with_anyres(cfg, num_images: int) -> bool:
    """Whether an image gets AnyRes tiles: a lone image does when the model uses AnyRes; one of several does only
    under multi_image="anyres", or in compat="transformers" for LLaVA-NeXT (its processor tiles every image,
    while its OneVision processor pads several as the original does)."""
    if not uses_anyres(cfg) or num_images == 1:
        return uses_anyres(cfg)
    hf_next = cfg.compat == "transformers" and anyres_max_crops(cfg) is None
    return cfg.higher_anyres.multi_image == "anyres" or hf_next


# ----------------------------------------------------------------------------------------------------------------
# Pixels


def fitted_size(size, canvas) -> tuple[int, int]:
    """(w, h) of an image of `size` (W, H) resized to fit the (w, h) canvas keeping its aspect ratio."""
    (W, H), (w, h) = size, canvas
    return (w, min(math.ceil(H * w / W), h)) if w / W < h / H else (min(math.ceil(W * h / H), w), h)


def resize_and_pad(image: Image.Image, canvas) -> Image.Image:
    """Fit `image` inside the (w, h) canvas keeping its aspect ratio; centre it on black (odd pixel right/bottom)."""
    (w, h), (new_w, new_h) = canvas, fitted_size(image.size, canvas)
    out = Image.new("RGB", (w, h), (0, 0, 0))
    out.paste(image.resize((new_w, new_h), Image.BICUBIC), ((w - new_w) // 2, (h - new_h) // 2))
    return out


# 134M pixels (16384 x 8192; 400 MB decoded): data.load_image refuses a larger image from its header, unread, and
# an image is not padded to a square or resized past it either
MAX_IMAGE_PIXELS = 1 << 27


class ImageTooLarge(ValueError):
    """An image within MAX_IMAGE_PIXELS whose padded square or tower resize is not: a 1 x 100000 strip is 10^10
    pixels padded, 336 x 33.6M resized by CLIP. Refused before anything is allocated."""


def check_pixels(size, what: str):
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{what} would be {size[0]} x {size[1]} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                            f"this program allocates")


def expand_to_square(image: Image.Image, background) -> Image.Image:
    """LLaVA-1.5 "pad": paste the image in the middle of a square of the tower's mean colour."""
    W, H = image.size
    if W == H:
        return image
    check_pixels((max(W, H),) * 2, f"the {W} x {H} image padded to a square")
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
        check_pixels((new_w, new_h), f"the {W} x {H} image resized for the tower ({C} px short side)")
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - C) // 2, (new_h - C) // 2
        image = image.crop((left, top, left + C, top + C))
    return image


@functools.cache
def normalise_table(kind: str) -> np.ndarray:
    """(3, 256) float32: every uint8 value of each channel rescaled (through float64, as the Hugging Face processors
    do) and normalised with the tower's mean and std. Looking values up gives bit-identical pixels to computing them
    and is faster: one read per pixel instead of four passes over float arrays."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None] for v in tower_mean_std(kind))
    values = (torch.arange(256, dtype=torch.float64) * (1 / 255)).float()[None]
    return ((values - mean) / std).numpy()


def normalise(rgb: np.ndarray, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), written into `out` when given."""
    out = torch.empty(*rgb.shape[:-3], 3, *rgb.shape[-3:-1]) if out is None else out
    table, target = normalise_table(kind), out.numpy()
    for c in range(3):
        np.take(table[c], rgb[..., c], out=target[..., c, :, :], mode="clip")
    return out


def to_pixels(image: Image.Image, kind: str) -> torch.Tensor:
    """A PIL RGB image -> normalised float32 (3, H, W)."""
    return normalise(np.asarray(image, dtype=np.uint8), kind)


def process_image(image: Image.Image, cfg, num_images: int = 1) -> ProcessedImage:
    """One PIL image -> the crops the tower sees, per the model's `image_aspect_ratio` and `compat` mode and the
    number of images in its prompt (see `tiles_with_anyres`)."""
    image = image.convert("RGB")
    size, vision, C = image.size, cfg.vision, cfg.vision.image_size
    if tiles_with_anyres(cfg, num_images):
        cols, rows = grid_shape(image.size, cfg)
        # the "global" view: the whole image squashed (not padded) to C x C, first in the list; then the crops.
        # The two resizes are independent and Pillow lets go of the GIL while resampling, so they run side by side
        # (they are nearly all of the time here; a thread made per call, as a pool would not survive a fork)
        with ThreadPoolExecutor(1) as pool:
            base = pool.submit(image.resize, (C, C), Image.BICUBIC)
            canvas = np.asarray(resize_and_pad(image, (cols * C, rows * C)))  # (rows*C, cols*C, 3) uint8
            base = np.asarray(base.result())
        pixels, grid = torch.empty(1 + rows * cols, 3, C, C), (cols, rows)
        normalise(base, vision.kind, out=pixels[0])
        crops = rearrange(canvas, "(r h) (k w) c -> (r k) h w c", h=C, w=C)  # row-major (a uint8 copy: cheap)
        normalise(crops, vision.kind, out=pixels[1:])
    else:
        # one of several images in an AnyRes model is padded like LLaVA-1.5's; transformers' LLaVA-1.5 processor
        # centre-crops instead (its do_pad is off by default)
        if uses_anyres(cfg) or (cfg.image_aspect_ratio == "pad" and cfg.compat == "original"):
            image = expand_to_square(image, tuple(int(m * 255) for m in tower_mean_std(vision.kind)[0]))
        pixels, grid = to_pixels(tower_resize(image, vision), vision.kind)[None], None
    return ProcessedImage(pixels, size, grid, num_image_tokens(size, cfg, num_images))


def process_images(images, cfg) -> list[ProcessedImage]:
    """The images of one prompt, each processed knowing how many share it."""
    return [process_image(image, cfg, num_images=len(images)) for image in images]


def process_video(frames, cfg) -> ProcessedImage:
    """A video's sampled frames (PIL images) -> (K, 3, C, C): each frame through the tower's own resize (SigLIP
    squashes to C x C), no AnyRes, no padding, as OneVision trains and evaluates."""
    rgb = np.stack([np.asarray(tower_resize(f.convert("RGB"), cfg.vision)) for f in frames])  # (K, C, C, 3) uint8
    return ProcessedImage(normalise(rgb, cfg.vision.kind), frames[0].size, None, video_tokens(len(frames), cfg),
                          video=True)


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


def threshold_shape(h: int, w: int, threshold: int):
    """Thresholded interpolation (OneVision's anyres_max_N with threshold = N * n^2): a map holding more than
    1.1^2 x threshold tokens is shrunk by t = sqrt(h*w / threshold) per side, to (int(h // t), int(w // t))."""
    t = math.sqrt(h * w / threshold)
    return (int(h // t), int(w // t)) if t > 1.1 else (h, w)


def pooled_side(n: int, knobs: HigherAnyRes) -> int:
    """Side of an n x n map after pooling: bilinear keeps the ragged edge (ceil), average drops it (floor)."""
    return math.ceil(n / knobs.pool_stride) if knobs.pool == "bilinear" else n // knobs.pool_stride


def feature_side(cfg) -> int:
    """Side of one image crop's feature map as it reaches the merge: n, or pooled with pool_images."""
    n = cfg.vision.side
    return pooled_side(n, cfg.higher_anyres) if cfg.higher_anyres.pool_images else n


def grid_token_shape(image_size, grid, cfg) -> tuple[int, int]:
    """(h, w) of the AnyRes feature map after unpad and the threshold: the model's and the counter's rule."""
    n = feature_side(cfg)
    cols, rows = grid
    top, bottom, left, right = unpad_bounds(rows * n, cols * n, image_size, cfg.compat)
    h, w = bottom - top, right - left
    if (tau := token_threshold(cfg)) is not None:
        h, w = threshold_shape(h, w, tau)
    return h, w


def tokens_per_crop(cfg) -> int:
    return feature_side(cfg) ** 2 + (cfg.vision.kind == "clip" and cfg.vision.select_feature == "full")


def num_image_tokens(image_size, cfg, num_images: int = 1) -> int:
    """LLM positions one image of size (W, H) fills; equal to what `merge_image_features` returns."""
    newline = int(cfg.has_newline)
    if not tiles_with_anyres(cfg, num_images):
        return tokens_per_crop(cfg) + newline
    grid = grid_shape(image_size, cfg)
    if cfg.merge_type == "flat":
        return (1 + grid[0] * grid[1]) * tokens_per_crop(cfg)
    h, w = grid_token_shape(image_size, grid, cfg)
    return feature_side(cfg) ** 2 + h * (w + newline)


def video_tokens(num_frames: int, cfg) -> int:
    """LLM positions a video of K frames fills: K pooled maps and one newline (OneVision's "one_token")."""
    return num_frames * pooled_side(cfg.vision.side, cfg.higher_anyres) ** 2 + int(cfg.has_newline)


def pool_features(x, knobs: HigherAnyRes):
    """(N, n*n, D) -> (N, m*m, D): each crop's feature map pooled by knobs.pool_stride."""
    n = math.isqrt(x.shape[1])
    if n * n != x.shape[1]:
        raise ValueError(f"cannot pool {x.shape[1]} features per crop: not a square map (a CLS token kept?)")
    grid = rearrange(x, "N (h w) D -> N D h w", h=n)
    if knobs.pool == "bilinear":
        m = pooled_side(n, knobs)
        grid = F.interpolate(grid, size=(m, m), mode="bilinear", align_corners=False)
    else:
        grid = F.avg_pool2d(grid, knobs.pool_stride)
    return rearrange(grid, "N D h w -> N (h w) D")


def merge_image_features(features, image: ProcessedImage, newline, cfg):
    """features (N, n*n, D) of one image's crops, in LLM space -> its token sequence (T, D)."""
    if image.grid is None or cfg.merge_type == "flat":  # one crop, several crops flat, or a video's frames
        x = features.flatten(0, 1)
        return torch.cat([x, newline[None].to(x)]) if newline is not None else x
    n = feature_side(cfg)
    cols, rows = image.grid
    base, crops = features[0], features[1:]
    x = rearrange(crops, "(r k) (h w) D -> D (r h) (k w)", r=rows, k=cols, h=n, w=n)  # the whole grid as one map
    top, bottom, left, right = unpad_bounds(x.shape[1], x.shape[2], image.size, cfg.compat)
    x = x[:, top:bottom, left:right]
    if (tau := token_threshold(cfg)) is not None:
        h, w = threshold_shape(x.shape[1], x.shape[2], tau)
        if (h, w) != tuple(x.shape[1:]):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    x = torch.cat([x, newline[:, None, None].to(x).expand(-1, x.shape[1], 1)], dim=2)  # (D, h, w + 1)
    return torch.cat([base, rearrange(x, "D h w -> (h w) D")])


# ----------------------------------------------------------------------------------------------------------------
# tools/anyres_picture.py: one image's (or video's) token budget, printed and drawn


def token_parts(image_size, cfg, num_images: int = 1) -> list[tuple[str, int]]:
    """Where one image's tokens come from, as (what, tokens) rows that add up to `num_image_tokens`."""
    n, newline = feature_side(cfg), int(cfg.has_newline)
    if not tiles_with_anyres(cfg, num_images):
        rows = [(f"one {cfg.vision.image_size}px crop, {n} x {n} features", tokens_per_crop(cfg))]
        return rows + [("newline after the image", 1)] * newline
    cols, rows_ = grid_shape(image_size, cfg)
    if cfg.merge_type == "flat":
        return [(f"base view + {cols} x {rows_} crops, {n} x {n} features each, flat",
                 (1 + cols * rows_) * tokens_per_crop(cfg))]
    top, bottom, left, right = unpad_bounds(rows_ * n, cols * n, image_size, cfg.compat)
    h, w = grid_token_shape(image_size, (cols, rows_), cfg)
    shrunk = (h, w) != (bottom - top, right - left)
    return [
        (f"base view: the whole image squashed to one crop, {n} x {n}", n * n),
        (f"{cols} x {rows_} crops (columns x rows): a {rows_ * n} x {cols * n} (h x w) feature map, unpad keeps "
         f"{bottom - top} x {right - left}"
         + (f", anyres_max shrinks it to {h} x {w}" if shrunk else ""), h * w),
        (f"newline after each of the {h} rows", h * newline),
    ]


def video_parts(num_frames: int, cfg) -> list[tuple[str, int]]:
    m = pooled_side(cfg.vision.side, cfg.higher_anyres)
    return [(f"{num_frames} frames, {cfg.vision.side} x {cfg.vision.side} features pooled to {m} x {m}",
             num_frames * m * m),
            ("one newline after the video", int(cfg.has_newline))]
