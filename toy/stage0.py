"""Stage 0 of the toy: the stand-ins for the pretrained CLIP tower and LLM that real LLaVA starts from.

    stage0_vision   a tiny CLIP-style tower (48 px views, 16 px patches = one scene cell each) learns what every patch
                    of each AnyRes crop holds and where its objects lie; with ToyRun.stage0_whole_views also the
                    contents of the squashed base view and of the whole scene padded to a square (LLaVA-1.5's "pad"),
                    as CLIP learns from whole images at its resolution
    stage0_text     a tiny Llama-style decoder (by default left at its random initialisation)

A view's targets come from where the scene's 16x16 cells land in it (`cell_overlaps`): (views, 9 patches, rows, cols)
shares of each cell's area. A patch's content target spreads evenly over the classes of the cells it shows (a crop
patch shows one cell; a shrunk view's patch two to nine), so that a shrunk view's features carry what is visible at
that size, and a glyph a few pixels tall is left for the tower to read if it can.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from anyres import fitted_size, process_image
from data import IGNORE_INDEX, load_image, render_conversation, tokenize
from toy import world
from export import padded_vocab_size, save_pretrained
from model import Llava, LlavaConfig, TextConfig, VisionConfig, VisionTower, init_fresh

GRID_PINPOINTS = "[[48, 96], [48, 144]]"  # the toy's AnyRes canvases, as (w, h): one crop wide
VIEWS = ("crops", "base", "pad")  # what stage 0 shows the tower of each scene
VISIBLE = 0.25  # a cell counts as shown by a patch when this share of its area lies in it


def tower_config(run) -> VisionConfig:
    return VisionConfig(kind="clip", image_size=48, patch_size=16, hidden_size=run.vision_width,
                        intermediate_size=4 * run.vision_width, num_heads=4, num_layers=run.vision_layers)


def decoder_config(run, vocab_size: int) -> TextConfig:
    return TextConfig(vocab_size=vocab_size, hidden_size=run.text_width, intermediate_size=4 * run.text_width // 3 * 2,
                      num_layers=run.text_layers, num_heads=run.text_heads, num_kv_heads=2,
                      head_dim=run.text_width // run.text_heads,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=1024)


# ----------------------------------------------------------------------------------------------------------------
# Where a scene's cells land in each view


def view_geometry(size, view: str, grid, C: int):
    """The view's canvas (w, h) and how the scene's pixels map into it: (canvas, (scale_x, scale_y), (dx, dy)).
    Mirrors anyres.py: the crops cut resize_and_pad's canvas, the base view squashes, "pad" centres the scene on a
    square (expand_to_square) and resizes that to C x C."""
    W, H = size
    if view == "crops":
        w, h = grid[0] * C, grid[1] * C
        new_w, new_h = fitted_size(size, (w, h))
        return (w, h), (new_w / W, new_h / H), ((w - new_w) // 2, (h - new_h) // 2)
    if view == "base":
        return (C, C), (C / W, C / H), (0, 0)
    side = max(W, H)
    return (C, C), (C / side, C / side), ((side - W) // 2 * C / side, (side - H) // 2 * C / side)


def cell_overlaps(size, view: str, grid, C: int = 48, patch: int = 16, cell: int = 16) -> torch.Tensor:
    """(views, patches, rows, cols): the share of each scene cell's area that lies in each patch of each C x C image
    the view makes (the crops row-major, like the pixels; one image for "base" and "pad")."""
    (w, h), (sx, sy), (dx, dy) = view_geometry(size, view, grid, C)
    rows, cols = size[1] // cell, size[0] // cell

    def along(n_cells, scale, offset, length):  # (patches along the axis, cells along it)
        c0 = offset + np.arange(n_cells) * cell * scale
        p0 = np.arange(length // patch) * patch
        inside = np.minimum(c0[None] + cell * scale, p0[:, None] + patch) - np.maximum(c0[None], p0[:, None])
        return np.clip(inside, 0, None) / (cell * scale)

    share = np.einsum("yr,xc->yxrc", along(rows, sy, dy, h), along(cols, sx, dx, w))
    n = C // patch
    return torch.from_numpy(rearrange(share, "(r i) (k j) y x -> (r k) (i j) y x", i=n, j=n)).float()


def view_targets(overlap, content, column, n_classes: int):
    """A view's targets from its cell overlaps (V, P, rows, cols) and the scene's per-cell content class and object
    column (rows, cols; content 0 = empty, column IGNORE_INDEX where there is no object):
    (V, P, K) content distributions, even over the classes a patch shows ("empty" when it shows none), and (V, P)
    object columns, IGNORE_INDEX unless every object cell the patch shows lies in one column."""
    shown = overlap >= VISIBLE  # (V, P, rows, cols)
    one_hot = F.one_hot(content, n_classes).float()  # (rows, cols, K)
    present = (torch.einsum("vpyx,yxk->vpk", shown.float(), one_hot) > 0).float()
    present[..., 0] = (present[..., 1:].sum(-1) == 0).float()  # empty only when nothing else is shown
    target = present / present.sum(-1, keepdim=True)
    has_object = shown & (column >= 0)
    col = column.clamp(min=0)
    lo = torch.where(has_object, col, 3).amin(dim=(-2, -1))
    hi = torch.where(has_object, col, -1).amax(dim=(-2, -1))
    return target, torch.where(lo == hi, lo, IGNORE_INDEX)


def scene_targets(color, shape, letter, n_colors: int, n_shapes: int):
    """Per cell (rows, cols): the content class (0 empty, then colour x shape, then letters) and the object's
    column (IGNORE_INDEX where there is no object)."""
    content = torch.where(letter > 0, n_colors * n_shapes + letter, color * n_shapes + shape)
    column = torch.where(color > 0, torch.arange(color.shape[1]), IGNORE_INDEX)
    return content, column


# ----------------------------------------------------------------------------------------------------------------
# The tower


def stage0_vision(run, data: Path, folder: Path, lr_factor):
    """Train the tower as the stand-in for a pretrained CLIP, then save it as a CLIP vision-model folder.

    Everything the toy does that LLaVA does not is here (real LLaVA starts from a CLIP or SigLIP that already sees):
    - views: every scene as the crops AnyRes cuts and the squashed base view (its columns only); with
      run.stage0_whole_views also the base view's contents and the scene padded to a square (VIEWS);
    - a content head, CLIP-style: a patch's feature must point, by cosine, at the embedding of what it shows
      (nothing, one of the 12 colour-shape objects, one of the 6 letters, or an even mix of several in a shrunk
      view), each embedding built from fixed word vectors (class_embeddings), so that the shape weighs as much as
      the colour;
    - a column head: which third of the image the objects a patch shows lie in (when they share one): a real CLIP's
      patch features carry where they are, a tower trained on contents alone keeps too little of it to answer
      "left, middle or right";
    - the position embedding starts at std 0.1 instead of CLIP's 0.02, so that the column head can learn within the
      steps, and the learning rate warms up over the first tenth of them (CLIP's own schedule warms up too);
      without it the column head's loss stayed at 0.3-0.7 at four seeds of five;
    - after stage 0 the tower stays frozen (trained further, it washed the column code out).
    Measurements behind each: docs/toy-results.md."""
    labels = np.load(data / "stage0.npz")
    anyres = LlavaConfig(vision=tower_config(run), image_aspect_ratio="anyres",
                         grid_pinpoints=json.loads(GRID_PINPOINTS))
    pad = LlavaConfig(vision=anyres.vision, image_aspect_ratio="pad")
    tower = init_fresh(_meta(VisionTower, anyres.vision))
    with torch.no_grad():
        tower.position_embedding.weight.normal_(0, run.stage0_position_std)
    C, S, L = (len(labels[f"{k}_names"]) for k in ("color", "shape", "letter"))  # class tables, "none" first
    classes = class_embeddings(C, S, L, run.vision_width)  # (K, D): empty, colour x shape, then letters
    column = nn.Linear(run.vision_width, 3)
    optimizer = torch.optim.AdamW([*tower.parameters(), *column.parameters()], lr=2e-3)
    rng = np.random.default_rng(run.seed)
    for step in range(run.stage0_vision_steps):
        for g in optimizer.param_groups:
            g["lr"] = 2e-3 * lr_factor(step, run.stage0_vision_steps, warmup_ratio=run.stage0_warmup_ratio)
        pixels, contents, columns, taught = [], [], [], []
        for i in rng.choice(len(labels["image"]), run.stage0_images, replace=False):
            image = load_image(data / str(labels["image"][i]))
            size = image.size
            cells = (slice(0, size[1] // 16), slice(0, size[0] // 16))
            content, where = scene_targets(*(torch.from_numpy(labels[k][i][cells].astype(np.int64))
                                             for k in ("color", "shape", "letter")), n_colors=C, n_shapes=S)
            processed = process_image(image, anyres)  # [base, crops...]
            views = {"base": processed.pixels[:1], "crops": processed.pixels[1:],
                     "pad": process_image(image, pad).pixels}
            for view in VIEWS if run.stage0_whole_views else ("crops", "base"):
                target, col = view_targets(cell_overlaps(size, view, processed.grid), content, where, len(classes))
                pixels.append(views[view]), contents.append(target.flatten(0, 1)), columns.append(col.flatten())
                # the base view's contents only with whole views: before, it learned the column alone
                taught.append(torch.full(col.flatten().shape, run.stage0_whole_views or view == "crops"))
        features = tower(torch.cat(pixels)).flatten(0, 1)  # (views * 9, D)
        # cosines at a fixed scale of 16, about CLIP's initial 1/0.07
        logits = 16.0 * F.normalize(features, dim=-1) @ F.normalize(classes, dim=-1).T  # (views * 9, K)
        taught = torch.cat(taught)
        targets = torch.cat(contents)[taught]
        loss = F.cross_entropy(logits[taught], targets) + F.cross_entropy(column(features), torch.cat(columns))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_clip_tower(tower, folder)
    # what is left to learn: the loss less the floor that an even mix of several classes puts under it
    return loss.item() - torch.special.entr(targets).sum(-1).mean().item()


def class_embeddings(n_colors: int, n_shapes: int, n_letters: int, width: int) -> torch.Tensor:
    """(K, D) fixed targets of the content head, indexed as scene_targets numbers the classes: like CLIP's text
    embedding of "a red circle", each is built from words, here one fixed random direction per word (orthonormal),
    an object the sum of its colour's and its shape's. The rows of label 0 ("none") with another label are unused,
    zero. Learned freely instead, the table let colour drown the shape in the features (docs/toy-results.md)."""
    words = torch.linalg.qr(torch.randn(width, n_colors + n_shapes + n_letters))[0].T  # orthonormal rows
    colors, shapes, letters = words.split([n_colors, n_shapes, n_letters])
    table = torch.zeros(n_colors * n_shapes + n_letters, width)
    table[0] = colors[0] + shapes[0]  # empty
    for c in range(1, n_colors):
        table[c * n_shapes + 1: (c + 1) * n_shapes] = colors[c] + shapes[1:]
    table[n_colors * n_shapes + 1:] = letters[1:]
    return table


def save_clip_tower(tower: VisionTower, folder: Path):
    """A CLIPVisionModel folder (config.json + model.safetensors with vision_model.* keys), with one extra, untrained
    last layer: LLaVA reads CLIP's hidden state -2, so the layer after the one it reads exists but is never used."""
    from safetensors.torch import save_file

    from export import hf_key

    v = tower.cfg
    extra = init_fresh(_meta(type(tower.layers[0]), v))
    state = {hf_key(f"vision_tower.{k}")[len("vision_tower."):]: t for k, t in tower.state_dict().items()}
    state |= {f"vision_model.encoder.layers.{v.num_layers}.{k}": t for k, t in extra.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="clip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers + 1, num_attention_heads=v.num_heads, image_size=v.image_size,
        patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act="quick_gelu"), indent=2))


def stage0_text(run, data: Path, tokenizer, folder: Path):
    """Train the decoder as a plain language model on the toy's conversations with the images left out, then save
    it as an ordinary causal-LM folder (config.json, model.safetensors, tokenizer.json)."""
    texts = []
    for name in ("pretrain", "recap"):
        for r in json.loads((data / f"{name}.json").read_text()):
            text, _ = render_conversation("qwen_1_5", world.to_messages(r["conversations"]))
            texts.append(tokenize(tokenizer, text.replace("<image>\n", "")))
    # a row for <image> too, which the saved stages add to the tokenizer (add_media_rows would otherwise be needed)
    cfg = LlavaConfig(vision=None, text=decoder_config(run, padded_vocab_size(tokenizer.get_vocab_size() + 1)))
    model = init_fresh(_meta(Llava, cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(run.seed)
    loss = torch.tensor(float("nan"))
    for _ in range(run.stage0_text_steps):
        batch = [texts[i] for i in rng.choice(len(texts), run.batch, replace=False)]
        T = max(map(len, batch))
        ids = torch.tensor([t + [0] * (T - len(t)) for t in batch])
        labels = torch.tensor([t + [IGNORE_INDEX] * (T - len(t)) for t in batch])
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_pretrained(model, folder, tokenizer=tokenizer, template="qwen_1_5")  # the format stage 2 trains
    return loss.item()


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


