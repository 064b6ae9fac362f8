"""A picture of AnyRes: one image's canvas, crops, unpad cut, newline column and base view, or a video's pooled
frames, with the token count of each part (anyres.token_parts / video_parts). Drawn with PIL alone.

    python -m tools.anyres_picture photo.jpg --model llava-v1.6-vicuna-7b --save grid.png

    image (W, H) -> canvas (cols*C, rows*C) cut into C x C crops        -> one n x n feature map per crop
                 -> a (rows*n, cols*n) map; unpad keeps (h, w) of it (red: cut, green: kept)
                 -> + one newline per kept row (blue)  + the base view's n*n tokens first
"""

import argparse
import dataclasses
import sys

from PIL import Image, ImageDraw, ImageFont

from anyres import (NEXT_GRIDS, HigherAnyRes, add_knob_flags, expand_to_square, feature_side, grid_shape,
                    grid_token_shape, knobs_from_flags, num_image_tokens, parse_grid_pinpoints, pooled_side,
                    resize_and_pad, tiles_with_anyres, token_parts, tower_mean_std, tower_resize, unpad_bounds,
                    uses_anyres, video_parts, video_tokens)
from convert import DEFAULT_MODEL, CheckpointError, config_of
from data import SampleError, load_image, load_video
from model import LlavaConfig, VisionConfig

NEWLINE_COLUMN = 44  # width of the strip beside the canvas that shows the newline tokens
NEWLINE_BLUE = (40, 90, 230)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _fit(size, box: int) -> float:
    return min(box / size[0], box / size[1])


def _fitted(size, box: int) -> tuple[int, int]:
    return tuple(max(1, round(v * _fit(size, box))) for v in size)


def _draw_rows(draw, y: int, parts, font):
    """The token rows, as `python -m tools.anyres_picture` prints them."""
    for what, tokens in parts + [("total", sum(t for _, t in parts))]:
        draw.text((20, y), f"{tokens:>6}", fill="black", font=font)
        draw.text((90, y), what, fill="black", font=font)
        y += 22


def draw_image(image: Image.Image, cfg, num_images: int = 1) -> Image.Image:
    """The picture: the image, the canvas panel (`draw_canvas`), the base view, and the token rows."""
    image, C = image.convert("RGB"), cfg.vision.image_size
    canvas, titles, crop = draw_canvas(image, cfg, num_images)
    panels = [([f"image {image.width} x {image.height}"], image.resize(_fitted(image.size, 300), Image.BICUBIC)),
              (titles, canvas)]
    if tiles_with_anyres(cfg, num_images):
        base = max(crop, 160)
        panels.append(([f"base view {C} x {C}: the whole image squashed"], image.resize((base, base), Image.BICUBIC)))

    parts = token_parts(image.size, cfg, num_images)
    font, small, gap, top = _font(16), _font(12), 40, 50
    widths = [int(max(p.width, *(small.getlength(t) for t in lines))) for lines, p in panels]
    panels_height = max(p.height for _, p in panels) + 50
    out = Image.new("RGB", (max(20 + sum(w + gap for w in widths), 800), top + panels_height + 22 * (len(parts) + 2)),
                    "white")
    draw = ImageDraw.Draw(out)
    n = feature_side(cfg)
    draw.text((20, 14), f"{sum(t for _, t in parts)} image tokens ({cfg.image_aspect_ratio}, {cfg.vision.kind} "
                        f"{C}px, {n} x {n} features per crop)", fill="black", font=font)
    x = 20
    for (lines, panel), w in zip(panels, widths):
        out.paste(panel, (x, top))
        for k, title in enumerate(lines):
            draw.text((x, top + panel.height + 6 + 16 * k), title, fill="black", font=small)
        x += w + gap
    _draw_rows(draw, top + panels_height, parts, font)
    return out


def draw_canvas(image: Image.Image, cfg, num_images: int = 1, box: int = 460):
    """(panel, title lines, one crop's size on screen): the canvas the image is resized and padded onto, fitted in
    `box` pixels, with the crop boundaries (white), the features unpad cuts (red) and keeps (green outline), and a
    NEWLINE column (blue) beside the kept rows. A model without AnyRes tiles shows its one crop."""
    C = cfg.vision.image_size
    tiled = tiles_with_anyres(cfg, num_images)
    if tiled:
        cols, rows = grid_shape(image.size, cfg)
        canvas = resize_and_pad(image, (cols * C, rows * C))
        titles = [f"canvas {canvas.width} x {canvas.height}: {cols} columns x {rows} rows of {C}px crops"]
    else:  # one crop: the square the tower sees
        cols = rows = 1
        pad = uses_anyres(cfg) or (cfg.image_aspect_ratio == "pad" and cfg.compat == "original")
        mean_colour = tuple(int(m * 255) for m in tower_mean_std(cfg.vision.kind)[0])
        square = expand_to_square(image, mean_colour) if pad else image
        canvas = tower_resize(square, cfg.vision)
        titles = [f"the one crop the tower sees, {C} x {C}" + (" (padded to a square)" if pad else "")]
    crop = round(C * _fit(canvas.size, box))
    spatial = tiled and cfg.merge_type != "flat"
    panel = Image.new("RGB", (cols * crop + NEWLINE_COLUMN * spatial, rows * crop), "white")
    panel.paste(canvas.resize((cols * crop, rows * crop), Image.BICUBIC))
    draw, font = ImageDraw.Draw(panel, "RGBA"), _font(12)
    for c in range(1, cols):
        draw.line([(c * crop, 0), (c * crop, rows * crop)], fill="white", width=2)
    for r in range(1, rows):
        draw.line([(0, r * crop), (cols * crop, r * crop)], fill="white", width=2)
    for r in range(rows if tiled else 0):
        for c in range(cols):
            draw.text((c * crop + 6, r * crop + 5), f"crop {r * cols + c + 1}", fill="yellow", font=font)
    if not spatial:
        return panel, titles, crop
    n = feature_side(cfg)
    top, bottom, left, right = unpad_bounds(rows * n, cols * n, image.size, cfg.compat)
    px = crop / n  # screen pixels per feature
    kept = (round(left * px), round(top * px), round(right * px), round(bottom * px))
    W, H = cols * crop, rows * crop
    for x0, y0, x1, y1 in ((0, 0, W, kept[1]), (0, kept[3], W, H),
                           (0, kept[1], kept[0], kept[3]), (kept[2], kept[1], W, kept[3])):
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(220, 30, 30, 110))
    draw.rectangle((kept[0], kept[1], kept[2] - 1, kept[3] - 1), outline=(0, 200, 0), width=3)
    h, _ = grid_token_shape(image.size, (cols, rows), cfg)
    draw.rectangle((W + 4, kept[1], W + 11, kept[3] - 1), fill=NEWLINE_BLUE)
    draw.text((W + 14, kept[1]), f"+{h}", fill=NEWLINE_BLUE, font=font)
    titles.append("red: cut by unpad, green: kept, blue: newlines")
    return panel, titles, crop


def draw_video(frames, cfg) -> Image.Image:
    """The frames as the tower sees them, each with its pooled m x m grid, and the token rows."""
    m, side, per_row = pooled_side(cfg.vision.side, cfg.higher_anyres), 120, 8
    parts = video_parts(len(frames), cfg)
    rows = -(-len(frames) // per_row)
    font, small = _font(16), _font(12)
    out = Image.new("RGB", (20 + per_row * (side + 10) + 10, 50 + rows * (side + 30) + 22 * (len(parts) + 1) + 20),
                    "white")
    draw = ImageDraw.Draw(out)
    draw.text((20, 14), f"{sum(t for _, t in parts)} video tokens ({len(frames)} frames, {m} x {m} each)",
              fill="black", font=font)
    for i, frame in enumerate(frames):
        x, y = 20 + (i % per_row) * (side + 10), 50 + (i // per_row) * (side + 30)
        out.paste(tower_resize(frame.convert("RGB"), cfg.vision).resize((side, side)), (x, y))
        for k in range(1, m):  # the pooled feature grid
            draw.line([(x + k * side / m, y), (x + k * side / m, y + side)], fill=(255, 255, 255), width=1)
            draw.line([(x, y + k * side / m), (x + side, y + k * side / m)], fill=(255, 255, 255), width=1)
        draw.text((x, y + side + 4), f"frame {i + 1}: {m * m}", fill="black", font=small)
    _draw_rows(draw, 50 + rows * (side + 30), parts, font)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The command line: `python -m tools.anyres_picture` (the budget table) and `... IMAGE --model NAME --save grid.png`


def budget_table(sizes=((640, 480), (1024, 1024), (1920, 1080), (2304, 2304), (800, 3000))) -> str:
    clip = VisionConfig(kind="clip", image_size=336, patch_size=14)
    siglip = VisionConfig(kind="siglip", image_size=384, patch_size=14, select_feature="full")
    onevision = dict(vision=siglip, image_aspect_ratio="anyres_max_9",
                     grid_pinpoints=parse_grid_pinpoints("(1x1),...,(6x6)", 384))
    rows = [  # (setting, config, images in the prompt)
        ("LLaVA-1.5 (pad, CLIP-336)", LlavaConfig(vision=clip, image_aspect_ratio="pad", merge_type="flat"), 1),
        ("LLaVA-NeXT (anyres, 5 grids up to 3x1)", LlavaConfig(vision=clip, grid_pinpoints=NEXT_GRIDS), 1),
        ("  + max_grid 6", LlavaConfig(vision=clip, grid_pinpoints=NEXT_GRIDS,
                                       higher_anyres=HigherAnyRes(max_grid=6)), 1),
        ("  + max_grid 6, tau = 9 x 576", LlavaConfig(vision=clip, grid_pinpoints=NEXT_GRIDS,
                                                      higher_anyres=HigherAnyRes(max_grid=6,
                                                                                 token_threshold=9 * 576)), 1),
        ("OneVision (anyres_max_9, 6x6, SigLIP-384)", LlavaConfig(**onevision), 1),
        ("  + tau = 4 x 729", LlavaConfig(**onevision, higher_anyres=HigherAnyRes(token_threshold=4 * 729)), 1),
        ("  + pool_images (bilinear 2x2)", LlavaConfig(**onevision, higher_anyres=HigherAnyRes(pool_images=True)), 1),
        ("  one of several images (pad)", LlavaConfig(**onevision), 2),
    ]
    lines = ["| setting | " + " | ".join(f"{w}x{h}" for w, h in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for name, cfg, n in rows:
        lines.append(f"| {name} | " + " | ".join(str(num_image_tokens(s, cfg, n)) for s in sizes) + " |")
    video = LlavaConfig(**onevision)
    lines.append(f"| OneVision video, 8 / 32 frames | {video_tokens(8, video)} / {video_tokens(32, video)} |"
                 + " |" * (len(sizes) - 1))
    return "\n".join(lines)


def image_config(source: str, compat: str):
    """A checkpoint's LlavaConfig for its image side: a preset's from the table, no download; else its config.json."""
    cfg = config_of(source, compat, image_only=True)
    if cfg.vision is None:
        raise CheckpointError(f"{source}: a text-only model has no image tokens")
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description="Without an image: the visual-token budget table. With an image (or "
                                "--video): how the model cuts it into crops and tokens, printed and drawn (--save).")
    p.add_argument("image", nargs="?", help="an image file")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="short name, hub repo id or folder (only config.json is read)")
    p.add_argument("--video", help="a video file, animated GIF/WebP or folder of frames, instead of an image")
    p.add_argument("--frames", type=int, default=32, help="frames sampled from --video")
    p.add_argument("--images", type=int, default=1,
                   help="images in the prompt (several: each padded to one crop, unless --multi-image anyres)")
    p.add_argument("--compat", choices=["original", "transformers"], default="original")
    p.add_argument("--save", help="write the picture to this PNG")
    add_knob_flags(p)
    args = p.parse_args(argv)
    if args.image is None and args.video is None:
        print(budget_table())
        return
    try:
        cfg = image_config(args.model, args.compat)
        cfg.higher_anyres = dataclasses.replace(cfg.higher_anyres, **knobs_from_flags(args))
        if args.video:
            frames = load_video(args.video, args.frames)
            parts, picture = video_parts(len(frames), cfg), (lambda: draw_video(frames, cfg))
            total = video_tokens(len(frames), cfg)
        else:
            image = load_image(args.image)
            parts, picture = token_parts(image.size, cfg, args.images), (lambda: draw_image(image, cfg, args.images))
            total = num_image_tokens(image.size, cfg, args.images)
    except (CheckpointError, SampleError, ValueError) as e:
        sys.exit(f"error: {e}")
    for what, tokens in parts:
        print(f"{tokens:>6}  {what}")
    print(f"{total:>6}  total")
    if args.save:
        picture().save(args.save)
        print(f"wrote {args.save}", file=sys.stderr)


if __name__ == "__main__":
    main()
