"""A scene of the toy shapes world (toy/world.py makes its data set): its settings, drawing and per-cell labels.

A scene is a small black (or very dark grey) strip, 48 px wide, cut into 16x16 cells, one cell per ViT patch. 1-3
objects sit in distinct cells, each a saturated red/green/blue/yellow circle, square or triangle filling most of its
cell, no two with the same (colour, shape); half of the scenes also carry one white capital letter (A C E H K T, a
hand-made 5x7 bitmap font drawn at 2x) in an empty cell.

    sample_scene(rng, cfg) -> scene {size [w, h], background, objects [{color, shape, col, row}], letter}
    draw_scene(scene, cfg) -> PIL image;   render_scene(rng, cfg) -> both
    cell_labels(scene, cfg) -> (color, shape, letter) label maps over the cells, for stage 0 (toy/stage0.py)

The default sizes are exactly the toy model's AnyRes canvases, 48x96 and 48x144 (w x h: 2 or 3 crops of 48x48, no
padding). TALL_SIZES adds scenes of twice those heights, 48x192 and 48x288 at the same 16-px cells, which the default
canvases can hold only shrunk (the Higher-AnyRes ablation, toy/ablations.py).
"""

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from data import IGNORE_INDEX

POSITIONS = ["left", "middle", "right"]  # thirds of the image width
# the "tall" world: half of the scenes at twice the default heights (12 and 18 rows of cells), one crop wide
TALL_SIZES = ((48, 96), (48, 144), (48, 192), (48, 288))


@dataclass
class ToyConfig:
    cell: int = 16  # px per cell = the ViT patch
    # (w, h), by default exactly the AnyRes canvases [[48,96],[48,144]] (TALL_SIZES: more). One crop wide, so that a
    # cell's third of the width (left / middle / right) is its column in its crop, which the tower can see (wider
    # scenes: docs/toy-results.md)
    sizes: tuple = ((48, 96), (48, 144))
    colors: dict = field(default_factory=lambda: {
        "red": (255, 0, 0), "green": (0, 220, 0), "blue": (30, 90, 255), "yellow": (255, 230, 0)})
    shapes: tuple = ("circle", "square", "triangle")
    letters: tuple = ("A", "C", "E", "H", "K", "T")
    min_objects: int = 1
    max_objects: int = 3
    p_letter: float = 0.5  # share of scenes with a letter
    margin: int = 1  # px between an object and its cell's border
    max_background: int = 24  # the background is grey level 0..max_background
    max_turns: int = 3  # VQA turns per instruct conversation: 1..max_turns
    # Ask the letter question in every scene that has a letter, so that it gets about the share of turns each other
    # type gets (25% against 19%) instead of half of it (docs/toy-results.md, "Letters")
    always_ask_letter: bool = True
    p_text_only: float = 0.05  # share of instruct records that are text-only trivia
    # the Interleave stage's data (interleave.json), per training image: two-image records ("which has more
    # shapes?"), 3-frame video records ("which way does it move?"), and as many single-image VQA records replayed
    p_compare: float = 0.05
    p_motion: float = 0.05
    tokenizer_vocab: int = 512


# ----------------------------------------------------------------------------------------------------------------
# Drawing

# 5x7 glyphs, drawn at 2x (10x14 px) in the middle of a 16x16 cell
FONT = {
    "A": [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "C": [".####", "#....", "#....", "#....", "#....", "#....", ".####"],
    "E": ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
    "H": ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "K": ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
    "T": ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
}


def draw_letter(draw: ImageDraw.ImageDraw, char: str, x: int, y: int, cell: int):
    """White `char` at 2 px per font pixel, centred in the cell whose top-left corner is (x, y)."""
    rows = FONT[char]
    x0, y0 = x + (cell - 2 * len(rows[0])) // 2, y + (cell - 2 * len(rows)) // 2
    for r, line in enumerate(rows):
        for c, on in enumerate(line):
            if on == "#":
                draw.rectangle([x0 + 2 * c, y0 + 2 * r, x0 + 2 * c + 1, y0 + 2 * r + 1], fill=(255, 255, 255))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, rgb, x: int, y: int, cfg: ToyConfig):
    x0, y0 = x + cfg.margin, y + cfg.margin
    x1, y1 = x + cfg.cell - 1 - cfg.margin, y + cfg.cell - 1 - cfg.margin  # inclusive
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    else:  # triangle, apex up
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=rgb)


def render_scene(rng: random.Random, cfg: ToyConfig):
    """A random scene and its image: (PIL image, scene)."""
    scene = sample_scene(rng, cfg)
    return draw_scene(scene, cfg), scene


def sample_scene(rng: random.Random, cfg: ToyConfig) -> dict:
    """{"size": [w, h], "background": grey level, "objects": [{"color", "shape", "col", "row"}, ...] in reading
    order, "letter": None or {"char", "col", "row"}}; col and row count 16x16 cells from the top left."""
    w, h = rng.choice(cfg.sizes)
    cols, rows = w // cfg.cell, h // cfg.cell
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    has_letter = rng.random() < cfg.p_letter
    cells = rng.sample(range(cols * rows), n + has_letter)
    pairs = rng.sample([(c, s) for c in cfg.colors for s in cfg.shapes], n)
    objects = sorted(({"color": c, "shape": s, "col": k % cols, "row": k // cols} for (c, s), k in zip(pairs, cells)),
                     key=lambda o: (o["row"], o["col"]))
    letter = None
    if has_letter:  # the last sampled cell
        letter = {"char": rng.choice(cfg.letters), "col": cells[-1] % cols, "row": cells[-1] // cols}
    return {"size": [w, h], "background": rng.randint(0, cfg.max_background), "objects": objects, "letter": letter}


def draw_scene(scene: dict, cfg: ToyConfig) -> Image.Image:
    image = Image.new("RGB", tuple(scene["size"]), (scene["background"],) * 3)
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        draw_shape(draw, o["shape"], cfg.colors[o["color"]], o["col"] * cfg.cell, o["row"] * cfg.cell, cfg)
    if scene["letter"]:
        L = scene["letter"]
        draw_letter(draw, L["char"], L["col"] * cfg.cell, L["row"] * cfg.cell, cfg.cell)
    return image


def position(col: int, scene: dict, cfg: ToyConfig) -> str:
    """Which third of the image width a cell lies in (widths must be multiples of 3 cells, so every cell is in one)."""
    return POSITIONS[col * cfg.cell * 3 // scene["size"][0]]


def cell_labels(scene: dict, cfg: ToyConfig):
    """(color, shape, letter) label maps (G, G) int8 for stage 0, G = the largest image side in cells (9; 18 with
    TALL_SIZES), indexed [row, col]: 0 = none, k = class k-1, IGNORE_INDEX outside the image (toy/world.py)."""
    w, h = scene["size"]
    grid = max(max(size) for size in cfg.sizes) // cfg.cell
    maps = [np.full((grid, grid), IGNORE_INDEX, np.int8) for _ in range(3)]
    for m in maps:
        m[: h // cfg.cell, : w // cfg.cell] = 0
    color, shape, letter = maps
    names = list(cfg.colors)
    for o in scene["objects"]:
        color[o["row"], o["col"]] = names.index(o["color"]) + 1
        shape[o["row"], o["col"]] = cfg.shapes.index(o["shape"]) + 1
    if scene["letter"]:
        L = scene["letter"]
        letter[L["row"], L["col"]] = cfg.letters.index(L["char"]) + 1
    return color, shape, letter
