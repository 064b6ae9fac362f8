"""The toy "shapes world": synthetic images, captions and VQA for the LLaVA life cycle in miniature.

A scene (toy/scene.py) is a 48-px-wide strip of 16x16 cells, one cell per ViT patch, holding 1-3 coloured shapes and
sometimes a white letter; by default 48x96 or 48x144 (w x h), exactly the AnyRes canvases of the toy model, so it is
cut into a column of 2 or 3 48x48 crops with no padding.

    render_scene(rng, cfg) -> (PIL image, scene {size, background, objects [{color, shape, col, row}], letter})
    ask_color / ask_shape / ask_count / ask_position / ask_letter (rng, scene, cfg)
        -> (question, one-word answer), or None when the scene cannot answer it unambiguously
    short_caption(scene), detailed_caption(scene, cfg)
    write_dataset(out_dir, cfg, n_train, n_eval, seed) -> {name: Path} of the files below

Files under out_dir (byte-identical for the same arguments):

    images/train_000000.png ...   n_train scenes, shared by all training stages
    images/eval_000000.png ...    n_eval NEW scenes for the held-out evaluation
    pretrain.json   stage 1 (projector only): "<image>\\nDescribe the image briefly." -> "a red circle and a blue
                    square." (4 prompt variants)
    recap.json      stage 1.5 (full model): "<image>\\nDescribe the image in detail." -> "There are two shapes. The
                    red circle is on the left. ... The letter K is written in the middle." (3 prompt variants)
    instruct.json   stage 2 (full model): 1-3 VQA turns per image (types distinct within a conversation, `<image>\\n` in
                    the first human turn only) plus ~5% text-only trivia conversations with no "image" key
    interleave.json the Interleave stage (continues from stage 2): p_compare / p_motion x n_train two-image ("image":
                    [a, b]) and video ("video": a 3-frame GIF under videos/) records, "Which image has more shapes?",
                    "Which way does the red circle move?", and as many single-image instruct records replayed
    eval_compare.json, eval_motion.json   n_eval / 5 held-out records of each (answers in turn, like eval.json)
    eval.json       one question per eval scene, the five types in turn and within a type its answers in turn (equal
                    shares: a constant answer scores chance); each record also holds "answer" (the expected
                    one-word answer) and "type" (a key of QUESTION_TYPES)
    stage0.npz      per-cell labels of the training images for supervised pre-training of the vision tower (the
    stage0_eval.npz stand-in for a pretrained CLIP), and the same for the eval images:
                        image (N,) str, size (N, 2) int16 as (w, h), and color / shape / letter (N, G, G) int8 indexed
                        [row, col] over 16x16 cells: 0 = none, k = class k-1 of cfg.colors / cfg.shapes / cfg.letters,
                        IGNORE_INDEX (-100, torch's default ignore_index) for cells outside the image; G = 9, the
                        tallest scene's rows (18 with scene.TALL_SIZES)
    scenes.json     {image path: scene dict} for every image, for tests and debugging
    manifest.json   what the set was made with (config, sizes, seed); written last, so its presence means complete
    tokenizer.json  byte-level BPE (~500 tokens) trained on every string the qwen_1_5 template and the data produce;
                    <|endoftext|>, <|im_start|>, <|im_end|> are ids 0, 1, 2; no BOS is added

write_formats(out_dir, cfg, n_train, n_eval, seed) adds NeXT-Interleave's image-placement data beside them (the
toy.ablations `formats` claim): formats.json, "Which image has the red circle, the first or the second?" over two
48x48 scenes with single-image replay, and its held-out pairs in each format, eval_formats_front.json and
eval_formats_interleaved.json; formats_manifest.json last.

The JSON files are LLaVA's own format: a list of {"id", "image" (relative to out_dir), "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}, written one record a line.
Every answer is fixed by the image; by symmetry the answers of each question type are about equally common in
training, and exactly so in eval.json, so a model that cannot see the image scores chance(cfg) there: 1/4 colour,
1/3 shape, count and position, 1/6 letter. Answers are single tokens of tokenizer.json.

    python -m toy.world OUT_DIR [--n-train 200] [--n-eval 50] [--seed 0] [--tall]   writes a small set, prints
                                                            samples, draws a contact sheet OUT_DIR/contact_sheet.png
"""

import argparse
import dataclasses
import io
import json
import random
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import place_images
from toy.scene import POSITIONS, TALL_SIZES, ToyConfig, cell_labels, draw_scene, position, render_scene, sample_scene

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 of tokenizer.json
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


# ----------------------------------------------------------------------------------------------------------------
# Questions (one-word answers) and captions


def unique(objects, key):
    """Values of `key` that exactly one object has."""
    values = [o[key] for o in objects]
    return sorted(v for v in set(values) if values.count(v) == 1)


def ask_color(rng, scene, cfg):
    shapes = unique(scene["objects"], "shape")
    if not shapes:
        return None
    s = rng.choice(shapes)
    q = rng.choice(["What color is the {}?", "Which color does the {} have?"]).format(s)
    return q, next(o["color"] for o in scene["objects"] if o["shape"] == s)


def ask_shape(rng, scene, cfg):
    colors = unique(scene["objects"], "color")
    if not colors:
        return None
    c = rng.choice(colors)
    q = rng.choice(["What shape is {}?", "What is the shape of the {} object?"]).format(c)
    return q, next(o["shape"] for o in scene["objects"] if o["color"] == c)


def ask_count(rng, scene, cfg):
    q = rng.choice(["How many shapes are there?", "How many shapes are in the image?"])
    return q, NUMBERS[len(scene["objects"])]


def ask_position(rng, scene, cfg):
    o = rng.choice(scene["objects"])
    q = rng.choice(["Is the {} {} on the left, in the middle or on the right?",
                    "Where is the {} {}: left, middle or right?"]).format(o["color"], o["shape"])
    return q, position(o["col"], scene, cfg)


def ask_letter(rng, scene, cfg):
    if not scene["letter"]:
        return None
    return rng.choice(["What letter is written?", "Which letter is shown?"]), scene["letter"]["char"]


QUESTION_TYPES = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position,
                  "letter": ask_letter}


def answer_words(cfg: ToyConfig) -> dict:
    """The possible answers of each question type."""
    return {"color": list(cfg.colors), "shape": list(cfg.shapes),
            "count": NUMBERS[cfg.min_objects: cfg.max_objects + 1], "position": POSITIONS, "letter": list(cfg.letters)}


def chance(cfg: ToyConfig) -> dict:
    """Accuracy of a model that does not see the image: answers are uniform per type, so 1 / #answers."""
    return {t: 1 / len(words) for t, words in answer_words(cfg).items()}


def a_list(phrases) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def short_caption(scene: dict) -> str:
    """'a red circle and a blue square.' (objects in reading order)"""
    return a_list([f"a {o['color']} {o['shape']}" for o in scene["objects"]]) + "."


def detailed_caption(scene: dict, cfg: ToyConfig) -> str:
    """Count, every object with its horizontal third, the letter (or its absence)."""
    n = len(scene["objects"])
    out = [f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''}."]
    out += [f"The {o['color']} {o['shape']} is {WHERE[position(o['col'], scene, cfg)]}." for o in scene["objects"]]
    L = scene["letter"]
    out.append(f"The letter {L['char']} is written {WHERE[position(L['col'], scene, cfg)]}." if L
               else "There is no letter.")
    return " ".join(out)


PRETRAIN_PROMPTS = ["Describe the image briefly.", "Give a short description of the image.", "What is in the picture?",
                    "Summarize the image in a few words."]
RECAP_PROMPTS = ["Describe the image in detail.", "Give a detailed description of the image.",
                 "What do you see in the picture? Describe everything."]
TRIVIA = [
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and yellow?", "orange"),
    ("What color do you get by mixing red and blue?", "purple"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("Which shape has no corners?", "circle"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is a banana?", "yellow"),
    ("What color is a ripe tomato?", "red"),
    ("What letter comes after A?", "B"),
    ("What letter comes before D?", "C"),
    ("What is one plus one?", "two"),
    ("What is two plus one?", "three"),
    ("What number comes after three?", "four"),
]


def conversation(turns, image: bool = True) -> list:
    """[(question, answer), ...] -> LLaVA "conversations", `<image>\\n` leading the first human turn."""
    out = []
    for i, (q, a) in enumerate(turns):
        out += [{"from": "human", "value": ("<image>\n" if image and i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return out


def to_messages(conversations) -> list:
    """LLaVA "conversations" -> data.render_prompt messages [("user" | "assistant", text), ...]."""
    return [("user" if t["from"] == "human" else "assistant", t["value"]) for t in conversations]


# ----------------------------------------------------------------------------------------------------------------
# One sample: the image and every record made from it (a function of (seed, split, index) alone)


def train_sample(seed: int, i: int, cfg: ToyConfig):
    rng = random.Random(f"toy:{seed}:train:{i}")
    image, scene = render_scene(rng, cfg)
    path, sid = f"images/train_{i:06d}.png", f"train_{i:06d}"
    # the types this scene can answer (a throwaway rng: only whether each can be asked matters here)
    types = [t for t, ask in QUESTION_TYPES.items() if ask(random.Random(0), scene, cfg) is not None]
    first = ["letter"] if cfg.always_ask_letter and "letter" in types else []
    turns = rng.randint(1, min(cfg.max_turns, len(types)))
    picked = first + rng.sample([t for t in types if t not in first], turns - len(first))
    rng.shuffle(picked)
    records = {
        "pretrain": {"id": sid, "image": path,
                     "conversations": conversation([(rng.choice(PRETRAIN_PROMPTS), short_caption(scene))])},
        "recap": {"id": sid, "image": path,
                  "conversations": conversation([(rng.choice(RECAP_PROMPTS), detailed_caption(scene, cfg))])},
        "instruct": {"id": sid, "image": path,
                     "conversations": conversation([QUESTION_TYPES[t](rng, scene, cfg) for t in picked])},
    }
    return path, image, scene, records


def eval_sample(seed: int, i: int, cfg: ToyConfig):
    """Question type i % 5, its answers taken in turn (so every answer is equally common), on a fresh scene drawn
    until it asks that question with that answer."""
    rng = random.Random(f"toy:{seed}:eval:{i}")
    kind = list(QUESTION_TYPES)[i % len(QUESTION_TYPES)]
    words = answer_words(cfg)[kind]
    target = words[i // len(QUESTION_TYPES) % len(words)]
    for _ in range(100_000):
        scene = sample_scene(rng, cfg)
        qa = QUESTION_TYPES[kind](rng, scene, cfg)
        if qa is not None and qa[1] == target:
            break
    else:
        raise ValueError(f"no scene of this config answers a {kind!r} question with {target!r}")
    image = draw_scene(scene, cfg)
    path = f"images/eval_{i:06d}.png"
    record = {"id": f"eval_{i:06d}", "image": path, "conversations": conversation([qa]), "answer": qa[1], "type": kind}
    return path, image, scene, record


def text_sample(seed: int, i: int) -> dict:
    rng = random.Random(f"toy:{seed}:text:{i}")
    return {"id": f"text_{i:06d}", "conversations": conversation(rng.sample(TRIVIA, rng.randint(1, 2)), image=False)}


# ----------------------------------------------------------------------------------------------------------------
# Several images and video, NeXT-Interleave's inputs in miniature. The scenes are one crop (48x48, 3x3 cells), so a
# padded image or a frame shows its cells exactly as the tower learned them in stage 0.

SMALL = (48, 48)
ORDINALS = ["first", "second"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_FRAMES = 3  # the moving shape steps one cell per frame, across the whole scene


def compare_sample(seed: int, split: str, i: int, cfg: ToyConfig):
    """Two small scenes with different numbers of shapes: "Which image has more shapes, the first or the second?".
    Half the records put both images in front of the question, half interleave them with labels: the two formats
    the Interleave blog mixes. Returns (record, {path: image})."""
    rng = random.Random(f"toy:{seed}:{split}:compare:{i}")
    small = dataclasses.replace(cfg, sizes=(SMALL,))
    answer = ORDINALS[i % 2] if split == "eval" else rng.choice(ORDINALS)
    a, b = sample_scene(rng, small), sample_scene(rng, small)
    while len(a["objects"]) == len(b["objects"]):
        b = sample_scene(rng, small)
    if (len(a["objects"]) > len(b["objects"])) != (answer == "first"):
        a, b = b, a
    question = rng.choice(["Which image has more shapes, the first or the second?",
                           "Which of the two images shows more shapes: first or second?"])
    text = rng.choice(["<image>\n<image>\n", "First image: <image>\nSecond image: <image>\n"]) + question
    paths = [f"images/{split}_compare_{i:06d}_{k}.png" for k in ("a", "b")]
    record = {"id": f"{split}_compare_{i:06d}", "image": paths,
              "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}
    return record, {paths[0]: draw_scene(a, small), paths[1]: draw_scene(b, small)}


def motion_sample(seed: int, split: str, i: int, cfg: ToyConfig):
    """A 3-frame clip (animated GIF) of one shape stepping a cell per frame across a small scene, sometimes beside
    a still one: "Which way does the red circle move?" -> left / right / up / down. Returns (record, {path: frames})."""
    rng = random.Random(f"toy:{seed}:{split}:motion:{i}")
    direction = list(DIRECTIONS)[i % 4] if split == "eval" else rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    line, start = rng.randrange(3), 0 if dx + dy > 0 else 2
    path_cells = [(start + dx * t, line) if dx else (line, start + dy * t) for t in range(VIDEO_FRAMES)]
    (color, shape), *others = rng.sample([(c, s) for c in cfg.colors for s in cfg.shapes], 2)
    still = []
    if rng.random() < 0.5:  # a still shape of another colour, off the moving one's path
        col, row = rng.choice([(c, r) for c in range(3) for r in range(3) if (c, r) not in path_cells])
        still = [{"color": others[0][0] if others[0][0] != color else next(c for c in cfg.colors if c != color),
                  "shape": others[0][1], "col": col, "row": row}]
    background = rng.randint(0, cfg.max_background)
    frames = [draw_scene({"size": list(SMALL), "background": background, "letter": None,
                          "objects": [{"color": color, "shape": shape, "col": c, "row": r}] + still}, cfg)
              for c, r in path_cells]
    question = rng.choice(["Which way does the {} {} move?", "In which direction does the {} {} move: left, right, "
                           "up or down?"]).format(color, shape)
    path = f"videos/{split}_motion_{i:06d}.gif"
    turns = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": direction}]
    record = {"id": f"{split}_motion_{i:06d}", "video": path, "conversations": turns}
    return record, {path: frames}


def which_sample(seed: int, split: str, i: int, cfg: ToyConfig):
    """Two small scenes, exactly one of which holds the named object: "Which image has the red circle, the first or
    the second?", each image labelled in the text (the interleaved format, "First image: <image>\\nSecond image:
    <image>\\n..."; data.place_images moves both to the front). It asks for a single-image skill, finding an object
    by colour and shape as the position question does, so that a short stage after stage 2 can learn it ("which has
    more shapes?" took hundreds of steps from stage 1). Returns (record, {path: image})."""
    rng = random.Random(f"toy:{seed}:{split}:which:{i}")
    small = dataclasses.replace(cfg, sizes=(SMALL,))
    answer = ORDINALS[i % 2] if split == "eval" else rng.choice(ORDINALS)
    a = sample_scene(rng, small)
    named = rng.choice(a["objects"])
    b = sample_scene(rng, small)
    while any((o["color"], o["shape"]) == (named["color"], named["shape"]) for o in b["objects"]):
        b = sample_scene(rng, small)
    if answer == "second":
        a, b = b, a
    question = rng.choice(["Which image has the {} {}, the first or the second?",
                           "Which image shows the {} {}: first or second?"]).format(named["color"], named["shape"])
    paths = [f"images/{split}_which_{i:06d}_{k}.png" for k in ("a", "b")]
    turns = [{"from": "human", "value": "First image: <image>\nSecond image: <image>\n" + question},
             {"from": "gpt", "value": answer}]
    record = {"id": f"{split}_which_{i:06d}", "image": paths, "conversations": turns}
    return record, {paths[0]: draw_scene(a, small), paths[1]: draw_scene(b, small)}


# ----------------------------------------------------------------------------------------------------------------
# Files


JSON_FILES = ("pretrain", "recap", "instruct", "interleave", "eval", "eval_compare", "eval_motion")  # the record sets
FORMATS_FILES = ("formats", "eval_formats_front", "eval_formats_interleaved")  # write_formats's


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def gif_bytes(frames) -> bytes:
    """An animated GIF, lossless here (the scenes use fewer than 256 colours)."""
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=400, loop=0)
    return buf.getvalue()


def write_json(path: Path, records: list):
    """A JSON list, one record a line (valid JSON, readable with head, diff-able)."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def write_npz(path: Path, **arrays):
    """np.savez with fixed zip timestamps, so the same arrays give the same bytes. Load with np.load."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(a), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def stage0_arrays(paths, scenes, cfg: ToyConfig) -> dict:
    labels = [cell_labels(s, cfg) for s in scenes]
    return {"image": np.array(paths), "size": np.array([s["size"] for s in scenes], np.int16),
            "color": np.stack([l[0] for l in labels]), "shape": np.stack([l[1] for l in labels]),
            "letter": np.stack([l[2] for l in labels]), "color_names": np.array(["none", *cfg.colors]),
            "shape_names": np.array(["none", *cfg.shapes]), "letter_names": np.array(["none", *cfg.letters])}


def tokenizer_corpus(record_lists) -> list[str]:
    """Every string the tokenizer will be asked to encode: each record rendered with the qwen_1_5 template (and the
    plain one), split at `<image>` as data.tokenize splits it."""
    from data import render_prompt

    texts = []
    for records in record_lists:
        for r in records:
            for template in ("qwen_1_5", "plain"):
                messages = to_messages(r["conversations"])
                texts += render_prompt(template, messages, add_generation_prompt=False).split("<image>")
                texts += render_prompt(template, messages[:1]).split("<image>")  # a prompt awaiting an answer
    return texts


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE; SPECIAL_TOKENS are ids 0, 1, 2 and are never split or merged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer)
    for text in texts[:1000]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text, text
    return tok


def write_dataset(out_dir, cfg: ToyConfig = None, n_train: int = 20000, n_eval: int = 1000, seed: int = 0,
                  progress: bool = True) -> dict:
    """Write the whole toy data set under out_dir (see the module docstring); returns {name: Path}."""
    cfg, out = cfg or ToyConfig(), Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    stages = {"pretrain": [], "recap": [], "instruct": []}
    train_paths, train_scenes, eval_paths, eval_scenes, evals = [], [], [], [], []
    for i in tqdm(range(n_train), desc="toy train images", disable=not progress, mininterval=1):
        path, image, scene, records = train_sample(seed, i, cfg)
        (out / path).write_bytes(png_bytes(image))
        train_paths.append(path), train_scenes.append(scene)
        for k, r in records.items():
            stages[k].append(r)
    for i in tqdm(range(n_eval), desc="toy eval images", disable=not progress, mininterval=1):
        path, image, scene, record = eval_sample(seed, i, cfg)
        (out / path).write_bytes(png_bytes(image))
        eval_paths.append(path), eval_scenes.append(scene), evals.append(record)

    # ~p_text_only of the instruct records are text-only, scattered among the image ones
    n_text = round(n_train * cfg.p_text_only / (1 - cfg.p_text_only))
    stages["instruct"] += [text_sample(seed, i) for i in range(n_text)]
    # two-image and video records: the Interleave stage's, and held-out sets of their own (n_eval / 5 each)
    (out / "videos").mkdir(exist_ok=True)
    interleave, interleave_evals = [], {"compare": [], "motion": []}
    for kind, make, share in (("compare", compare_sample, cfg.p_compare), ("motion", motion_sample, cfg.p_motion)):
        for split, n, sink in (("train", round(n_train * share), interleave),
                               ("eval", n_eval // 5, interleave_evals[kind])):
            for i in range(n):
                record, media = make(seed, split, i, cfg)
                for path, content in media.items():
                    (out / path).write_bytes(gif_bytes(content) if isinstance(content, list) else png_bytes(content))
                sink.append(record if split == "train"
                            else {**record, "answer": record["conversations"][1]["value"], "type": kind})
    random.Random(f"toy:{seed}:shuffle").shuffle(stages["instruct"])
    # replay, as OneVision's last stage replays single-image data: the Interleave stage must not forget stage 2
    interleave += [r for r in stages["instruct"] if isinstance(r.get("image"), str)][: len(interleave)]
    random.Random(f"toy:{seed}:shuffle-interleave").shuffle(interleave)

    files = {k: out / f"{k}.json" for k in (*JSON_FILES, "scenes")}
    for k, records in stages.items():
        write_json(files[k], records)
    write_json(files["interleave"], interleave)
    write_json(files["eval"], evals)
    write_json(files["eval_compare"], interleave_evals["compare"])
    write_json(files["eval_motion"], interleave_evals["motion"])
    files["scenes"].write_text(json.dumps(dict(zip(train_paths + eval_paths, train_scenes + eval_scenes))) + "\n")
    files["stage0"], files["stage0_eval"] = out / "stage0.npz", out / "stage0_eval.npz"
    write_npz(files["stage0"], **stage0_arrays(train_paths, train_scenes, cfg))
    write_npz(files["stage0_eval"], **stage0_arrays(eval_paths, eval_scenes, cfg))

    # the single-image data only: the Interleave stage's new words are spelled from byte-level pieces, so adding that
    # stage leaves stage 2's tokenizer, and so its run, unchanged (docs/toy-results.md)
    tok = train_tokenizer(tokenizer_corpus([*stages.values(), evals]), cfg.tokenizer_vocab)
    files["tokenizer"] = out / "tokenizer.json"
    files["tokenizer"].write_text(tok.to_str(pretty=True) + "\n")
    files["images"] = out / "images"
    files["manifest"] = out / "manifest.json"  # written last: the set is complete, and what it was made with
    files["manifest"].write_text(json.dumps(manifest(cfg, n_train, n_eval, seed)) + "\n")
    return files


def manifest(cfg: ToyConfig, n_train: int, n_eval: int, seed: int) -> dict:
    return {"config": dataclasses.asdict(cfg), "n_train": n_train, "n_eval": n_eval, "seed": seed,
            "files": list(JSON_FILES)}


def write_formats(out_dir, cfg: ToyConfig = None, n_train: int = 20000, n_eval: int = 1000, seed: int = 0) -> dict:
    """NeXT-Interleave's image-placement ablation data, added beside the set write_dataset wrote with the same
    arguments (in files of its own, so that set stays as it was): formats.json, n_train / 8 "which image has the red
    circle?" records, interleaved (the training stage's image_placement decides where each one's images go), and as
    many of the set's single-image instruct records replayed; the same n_eval / 2 held-out pairs in each format,
    eval_formats_front.json (both images in front of the text) and eval_formats_interleaved.json; then
    formats_manifest.json. Returns {name: Path}."""
    cfg, out = cfg or ToyConfig(), Path(out_dir)
    records, evals = [], []
    for split, n, sink in (("train", n_train // 8, records), ("eval", n_eval // 2, evals)):
        for i in range(n):
            record, images = which_sample(seed, split, i, cfg)
            for path, image in images.items():
                (out / path).write_bytes(png_bytes(image))
            sink.append(record)
    instruct = json.loads((out / "instruct.json").read_text())
    records += [r for r in instruct if isinstance(r.get("image"), str)][: len(records)]
    random.Random(f"toy:{seed}:shuffle-formats").shuffle(records)
    files = {k: out / f"{k}.json" for k in FORMATS_FILES}
    write_json(files["formats"], records)
    for placement in ("front", "interleaved"):
        write_json(files[f"eval_formats_{placement}"], [placed(r, placement) for r in evals])
    files["formats_manifest"] = out / "formats_manifest.json"  # last: the files are complete
    files["formats_manifest"].write_text(json.dumps(formats_manifest(cfg, n_train, n_eval, seed)) + "\n")
    return files


def placed(record: dict, placement: str) -> dict:
    """An eval record with its images where `placement` puts them, as the training stage's data.place_images does,
    plus its "answer" and "type"."""
    messages = place_images(to_messages(record["conversations"]), placement)
    turns = [{"from": "human" if role == "user" else "gpt", "value": text} for role, text in messages]
    return {**record, "conversations": turns, "answer": turns[1]["value"], "type": placement}


def formats_manifest(cfg: ToyConfig, n_train: int, n_eval: int, seed: int) -> dict:
    return {"data": manifest(cfg, n_train, n_eval, seed), "files": list(FORMATS_FILES)}


# ----------------------------------------------------------------------------------------------------------------
# A look at it


def contact_sheet(out_dir, n: int = 16, scale: int = 4) -> Path:
    """The first n eval images, upscaled `scale`x (nearest), each with its question and answer, in one PNG."""
    out = Path(out_dir)
    records = json.loads((out / "eval.json").read_text())[:n]
    font = ImageFont.load_default()
    tallest = max(h for _, h in json.loads((out / "manifest.json").read_text())["config"]["sizes"])  # this set's scenes
    tile_w, tile_h, per_row = 96 * scale + 16, tallest * scale + 48, 4  # room for the question under the image
    sheet = Image.new("RGB", (per_row * tile_w, -(-len(records) // per_row) * tile_h), (60, 60, 60))
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(records):
        image = Image.open(out / r["image"])
        x, y = (k % per_row) * tile_w + 8, (k // per_row) * tile_h + 8
        sheet.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST), (x, y))
        q = r["conversations"][0]["value"].replace("<image>\n", "")
        draw.text((x, y + tallest * scale + 4), f"{q}\n-> {r['answer']}", fill=(255, 255, 255), font=font)
    sheet.save(out / "contact_sheet.png")
    return out / "contact_sheet.png"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a small toy shapes-world data set and show samples.")
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tall", action="store_true", help="half of the scenes twice as tall (scene.TALL_SIZES)")
    args = parser.parse_args()
    t0 = time.time()
    files = write_dataset(args.out_dir, ToyConfig(sizes=TALL_SIZES) if args.tall else ToyConfig(), args.n_train,
                          args.n_eval, args.seed)
    print(f"wrote {args.n_train} + {args.n_eval} samples in {time.time() - t0:.1f}s")
    for name in ("pretrain", "recap", "instruct", "eval"):
        records = json.loads(files[name].read_text())
        print(f"\n{name}.json ({len(records)} records), first two:")
        for r in records[:2]:
            print(" ", json.dumps(r))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files["tokenizer"]))
    print(f"\ntokenizer: {tok.get_vocab_size()} tokens, specials "
          f"{ {s: tok.token_to_id(s) for s in SPECIAL_TOKENS} }; chance per type: "
          f"{ {t: round(p, 3) for t, p in chance(ToyConfig()).items()} }")
    print("contact sheet:", contact_sheet(args.out_dir))
