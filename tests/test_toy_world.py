"""The toy shapes world: same seed -> same bytes, LLaVA's JSON format, answers and captions that follow from the
scene, per-cell labels that match the pixels, and a tokenizer that gives back exactly what it was given."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from toy import world as toy
from anyres import candidate_resolutions, select_best_resolution
from data import IGNORE_INDEX, conversation_of, place_images, render_prompt, tokenize, tokenize_conversation
from toy.scene import TALL_SIZES
from toy.stage0 import GRID_PINPOINTS
from model import IMAGE_TOKEN

CFG = toy.ToyConfig()
N_TRAIN, N_EVAL = 60, 30


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    toy.write_dataset(root, CFG, N_TRAIN, N_EVAL, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def scenes(out):
    return json.loads((out / "scenes.json").read_text())


def load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_same_seed_gives_the_same_bytes_and_another_seed_other_data(out, tmp_path):
    files = tree(out)
    assert len([f for f in files if f.startswith("images/") and "compare" not in f]) == N_TRAIN + N_EVAL
    toy.write_dataset(tmp_path / "again", CFG, N_TRAIN, N_EVAL, seed=3, progress=False)
    assert tree(tmp_path / "again") == files
    toy.write_dataset(tmp_path / "other", CFG, 8, 5, seed=4, progress=False)
    assert load(tmp_path / "other", "pretrain") != load(out, "pretrain")[:8]


def test_records_follow_the_llava_format(out, scenes):
    for name in ("pretrain", "recap", "instruct", "eval"):
        records = load(out, name)
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            if isinstance(r.get("image"), list) or "video" in r:
                continue  # two-image and video records: test_two_image_and_motion_answers_follow_from_the_pixels
            turns = r["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert all(isinstance(t["value"], str) and t["value"] for t in turns)
            if "image" in r:
                assert turns[0]["value"].startswith("<image>\n") and turns[0]["value"].count("<image>") == 1
                assert all("<image>" not in t["value"] for t in turns[1:])
                with Image.open(out / r["image"]) as image:
                    assert image.mode == "RGB" and list(image.size) == scenes[r["image"]]["size"]
            else:
                assert name == "instruct" and all("<image>" not in t["value"] for t in turns)
    instruct = load(out, "instruct")
    n_text = sum("image" not in r and "video" not in r for r in instruct)
    assert n_text == round(N_TRAIN * CFG.p_text_only / (1 - CFG.p_text_only)) > 0
    assert max(len(r["conversations"]) for r in instruct) == 2 * CFG.max_turns
    assert {r["image"] for r in load(out, "pretrain")} == {r["image"] for r in load(out, "recap")}
    train = {r["image"] for r in instruct if isinstance(r.get("image"), str)}
    assert len(train) == N_TRAIN and not train & {r["image"] for r in load(out, "eval")}


def test_image_sizes_are_anyres_canvases_so_nothing_is_padded(scenes):
    canvases = candidate_resolutions(json.loads(GRID_PINPOINTS), "original")  # the life cycle's
    sizes = {tuple(s["size"]) for s in scenes.values()}
    assert sizes == set(CFG.sizes)
    assert all(select_best_resolution(size, canvases) == size for size in sizes)


def third(col, scene):  # which third of the width holds the cell's centre
    return ["left", "middle", "right"][int(3 * (col + 0.5) * CFG.cell / scene["size"][0])]


def expected(question: str, scene: dict):
    """The answer re-derived from the scene, independently of toy's question generators."""
    objects, q = scene["objects"], question.removeprefix("<image>\n")
    if m := re.fullmatch(r"What color is the (\w+)\?|Which color does the (\w+) have\?", q):
        (o,) = [o for o in objects if o["shape"] == (m[1] or m[2])]  # exactly one such object
        return o["color"]
    if m := re.fullmatch(r"What shape is (\w+)\?|What is the shape of the (\w+) object\?", q):
        (o,) = [o for o in objects if o["color"] == (m[1] or m[2])]
        return o["shape"]
    if re.fullmatch(r"How many shapes are (there|in the image)\?", q):
        return ["one", "two", "three"][len(objects) - 1]
    if m := re.fullmatch(r"(?:Is|Where is) the (\w+) (\w+)"
                         r"(?: on the left, in the middle or on the right\?|: left, middle or right\?)", q):
        (o,) = [o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        return third(o["col"], scene)
    if q in ("What letter is written?", "Which letter is shown?"):
        return scene["letter"]["char"]
    raise AssertionError(f"unexpected question {q!r}")


def test_answers_follow_from_the_scene(out, scenes):
    trivia = dict(toy.TRIVIA)
    for r in load(out, "instruct") + load(out, "eval"):
        if isinstance(r.get("image"), list) or "video" in r:
            continue  # see test_two_image_and_motion_answers_follow_from_the_pixels
        turns = r["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            want = expected(human["value"], scenes[r["image"]]) if "image" in r else trivia[human["value"]]
            assert gpt["value"] == want, (human["value"], r)
        assert len({h["value"] for h in turns[::2]}) == len(turns) // 2  # no question twice


def test_captions_follow_from_the_scene(out, scenes):
    numbers = {"one": 1, "two": 2, "three": 3}
    for r in load(out, "pretrain"):
        scene, caption = scenes[r["image"]], r["conversations"][1]["value"]
        named = re.findall(r"a (\w+) (\w+)", caption)
        assert caption.endswith(".") and named == [(o["color"], o["shape"]) for o in scene["objects"]]
    for r in load(out, "recap"):
        scene, caption = scenes[r["image"]], r["conversations"][1]["value"]
        assert numbers[re.match(r"There (?:is|are) (\w+) shapes?\.", caption)[1]] == len(scene["objects"])
        said = re.findall(r"The (\w+) (\w+) is (?:on the |in the )(\w+)\.", caption)
        assert said == [(o["color"], o["shape"], third(o["col"], scene)) for o in scene["objects"]]
        letter = re.search(r"The letter (\w) is written (?:on the |in the )(\w+)\.", caption)
        L = scene["letter"]
        assert (letter.groups() if letter else None) == ((L["char"], third(L["col"], scene)) if L else None)
        assert (L is None) == caption.endswith("There is no letter.")


def test_eval_answers_are_answer_words_in_equal_shares(out):
    records, words = load(out, "eval"), toy.answer_words(CFG)
    assert set(words) == set(toy.QUESTION_TYPES) == set(toy.chance(CFG))
    for r in records:
        assert len(r["conversations"]) == 2 and r["conversations"][1]["value"] == r["answer"] in words[r["type"]]
    per_type = Counter(r["type"] for r in records)
    assert set(per_type.values()) == {N_EVAL // len(words)}
    for kind in words:  # answers taken in turn: no constant answer beats chance by more than one question
        counts = Counter(r["answer"] for r in records if r["type"] == kind)
        assert max(counts.values()) - min(counts.get(w, 0) for w in words[kind]) <= 1


def turn_shares(cfg: toy.ToyConfig, n: int = 2000):
    """Share of the instruct turns of each question type over n training samples, and whether every scene with a
    letter was asked about it. A turn's type is told by its answer: the answer words of the types are disjoint."""
    type_of = {w: kind for kind, words in toy.answer_words(cfg).items() for w in words}
    turns, letter_asked = Counter(), []
    for i in range(n):
        _, _, scene, records = toy.train_sample(5, i, cfg)
        kinds = [type_of[t["value"]] for t in records["instruct"]["conversations"][1::2]]
        turns.update(kinds)
        if scene["letter"]:
            letter_asked.append("letter" in kinds)
    return {k: c / sum(turns.values()) for k, c in turns.items()}, letter_asked


def test_stage_2_asks_each_question_type_about_as_often():
    # letters are in half of the scenes, so drawing the types uniformly gives them half the others' share (measured:
    # stage 2 then answered one letter to every letter question in most runs); the default asks whenever it can
    shares, letter_asked = turn_shares(CFG)
    assert all(letter_asked) and len(letter_asked) > 800
    assert set(shares) == set(toy.QUESTION_TYPES)
    assert all(0.15 < share < 0.30 for share in shares.values()), shares
    uniform, letter_asked = turn_shares(toy.ToyConfig(always_ask_letter=False))
    assert uniform["letter"] < 0.13 and not all(letter_asked)


def test_tokenizer_round_trips_chatml_and_has_fixed_special_ids(out):
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert 400 <= tok.get_vocab_size() <= 600
    record = next(r for r in load(out, "instruct") if "image" in r and len(r["conversations"]) >= 4)
    text = render_prompt("qwen_1_5", toy.to_messages(record["conversations"]), add_generation_prompt=False)
    ids = tokenize(tok, text, [7])
    assert ids.count(IMAGE_TOKEN) == 7 and tok.encode(text).ids.count(1) == len(record["conversations"]) + 1
    assert tok.decode([i for i in ids if i != IMAGE_TOKEN], skip_special_tokens=False) == text.replace("<image>", "")
    for odd in ("  two spaces,\ttab\n\nand newlines\n", "unseen: Zebra 42 ünïcødé ✓", ""):
        assert tok.decode(tok.encode(odd).ids, skip_special_tokens=False) == odd
    for words in toy.answer_words(CFG).values():  # each answer is one token after "assistant\n"
        assert all(len(tok.encode(w).ids) == 1 for w in words)
    for r in load(out, "instruct") + load(out, "eval"):  # so a VQA turn's loss is on (answer, <|im_end|>)
        visuals = len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r or "video" in r)
        ids, labels = tokenize_conversation(tok, "qwen_1_5", conversation_of(r), [5] * visuals)
        answers = [t["value"] for t in r["conversations"][1::2]]
        assert tok.decode([i for i in labels if i != IGNORE_INDEX], skip_special_tokens=False) == "<|im_end|>".join(
            answers) + "<|im_end|>"
        if visuals:
            assert sum(i != IGNORE_INDEX for i in labels) == 2 * len(answers)


def test_stage0_labels_match_the_pixels(out, scenes):
    z = np.load(out / "stage0.npz")
    assert list(z["color_names"]) == ["none", *CFG.colors] and list(z["letter_names"]) == ["none", *CFG.letters]
    assert z["color"].shape == (N_TRAIN, 9, 9) and z["color"].dtype == np.int8
    c = CFG.cell
    for n, path in enumerate(z["image"]):
        pixels = np.asarray(Image.open(out / path)).astype(int)
        w, h = z["size"][n]
        assert [w, h] == scenes[path]["size"]
        for row in range(6):
            for col in range(6):
                color, shape, letter = (int(z[k][n, row, col]) for k in ("color", "shape", "letter"))
                if row >= h // c or col >= w // c:
                    assert color == shape == letter == IGNORE_INDEX
                    continue
                block = pixels[row * c:(row + 1) * c, col * c:(col + 1) * c]
                if color:
                    assert shape and not letter
                    rgb = np.array(CFG.colors[z["color_names"][color]])
                    assert (block[c // 2, c // 2] == rgb).all()  # the centre has the object's colour
                    # which of (top-left corner, near the bottom-left corner, middle of the left side) it covers
                    m = CFG.margin
                    covers = tuple(bool((block[y, x] == rgb).all()) for y, x in [(m, m), (c - 3, m + 1), (c // 2, m)])
                    assert covers == {"square": (1, 1, 1), "triangle": (0, 1, 0), "circle": (0, 0, 1)}[
                        z["shape_names"][shape]]
                elif letter:
                    assert not shape and (block == 255).all(-1).sum() >= 20  # white strokes
                else:
                    assert not shape and (block == block[0, 0]).all() and block[0, 0].max() <= CFG.max_background
    assert (np.load(out / "stage0_eval.npz")["shape"] > 0).any(axis=(1, 2)).all()


def colored_cells(image: Image.Image) -> list[tuple[int, int]]:
    """(col, row) of the 16x16 cells holding a saturated colour (a shape; letters are white, backgrounds grey)."""
    a = np.asarray(image.convert("RGB")).astype(int)
    saturated = (a.max(-1) - a.min(-1)) > 100
    h, w = saturated.shape
    return [(c, r) for r in range(h // 16) for c in range(w // 16)
            if saturated[16 * r: 16 * r + 16, 16 * c: 16 * c + 16].sum() > 20]


def test_two_image_and_motion_answers_follow_from_the_pixels(out):
    """"Which image has more shapes?" and "which way does it move?", read off the files with no help from the
    generator: count the coloured cells of each image; follow the cell that changes across the GIF's frames."""
    from data import load_video

    interleave = load(out, "interleave")
    compare = [r for r in interleave if isinstance(r.get("image"), list)] + load(out, "eval_compare")
    motion = [r for r in interleave if "video" in r] + load(out, "eval_motion")
    replayed = [r for r in interleave if isinstance(r.get("image"), str)]
    assert len(replayed) == len(interleave) // 2 and all(r in load(out, "instruct") for r in replayed)
    assert len(compare) == round(N_TRAIN * CFG.p_compare) + N_EVAL // 5
    assert len(motion) == round(N_TRAIN * CFG.p_motion) + N_EVAL // 5
    formats = Counter()
    for r in compare:
        text = r["conversations"][0]["value"]
        assert text.count("<image>") == 2 == len(r["image"])
        formats[text.startswith("<image>\n<image>\n")] += 1
        a, b = (len(colored_cells(Image.open(out / p))) for p in r["image"])
        assert a != b and r["conversations"][1]["value"] == ("first" if a > b else "second")
    assert len(formats) == 2  # both the in-front and the interleaved format occur
    steps = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}
    for r in motion:
        frames = load_video(out / r["video"], 8)
        assert len(frames) == toy.VIDEO_FRAMES and all(f.size == toy.SMALL for f in frames)
        cells = [set(colored_cells(f)) for f in frames]
        still = set.intersection(*cells)
        moving = [next(iter(c - still)) for c in cells]
        step = (moving[1][0] - moving[0][0], moving[1][1] - moving[0][1])
        assert r["conversations"][1]["value"] == steps[step] and moving[2][0] - moving[1][0] == step[0]
    for name, words in (("eval_compare", {"first", "second"}), ("eval_motion", set(toy.DIRECTIONS))):
        answers = Counter(r["answer"] for r in load(out, name))
        assert set(answers) == words and max(answers.values()) - min(answers.values()) <= 1


def objects_in(image: Image.Image) -> set[tuple[str, str]]:
    """(colour, shape) of every object drawn in the image, read off its pixels: a cell's centre has the object's
    colour; the corners it covers tell the shape (as in test_stage0_labels_match_the_pixels)."""
    a, c, m = np.asarray(image.convert("RGB")).astype(int), CFG.cell, CFG.margin
    shapes = {(1, 1, 1): "square", (0, 1, 0): "triangle", (0, 0, 1): "circle"}
    found = set()
    for row in range(a.shape[0] // c):
        for col in range(a.shape[1] // c):
            block = a[row * c:(row + 1) * c, col * c:(col + 1) * c]
            for name, rgb in CFG.colors.items():
                if (block[c // 2, c // 2] == rgb).all():
                    covers = tuple(int((block[y, x] == rgb).all()) for y, x in [(m, m), (c - 3, m + 1), (c // 2, m)])
                    found.add((name, shapes[covers]))
    return found


@pytest.fixture(scope="module")
def formats(out):
    return toy.write_formats(out, CFG, N_TRAIN, N_EVAL, seed=3)


def test_which_image_answers_follow_from_the_pixels_and_sit_beside_the_set(out, formats, tmp_path):
    """"Which image has the red circle?": exactly one of the two images holds the named object, read off the files;
    the records are interleaved, half of the stage replays the set's own instruct records, and the set's files are
    left as they were."""
    stamp = json.loads((out / "formats_manifest.json").read_text())
    assert stamp == json.loads(json.dumps(toy.formats_manifest(CFG, N_TRAIN, N_EVAL, 3)))
    records = load(out, "formats")
    pairs = [r for r in records if isinstance(r.get("image"), list)]
    assert len(pairs) == N_TRAIN // 8 == len(records) - len(pairs)
    assert all(r in load(out, "instruct") for r in records if r not in pairs)
    evals = load(out, "eval_formats_interleaved")
    assert len(evals) == N_EVAL // 2 and Counter(r["answer"] for r in evals) == {"first": 8, "second": 7}
    for r in pairs + evals:
        text = r["conversations"][0]["value"]
        m = re.fullmatch(r"First image: <image>\nSecond image: <image>\n(?:Which image has the (\w+) (\w+), the first "
                         r"or the second\?|Which image shows the (\w+) (\w+): first or second\?)", text)
        named = (m[1] or m[3], m[2] or m[4])
        holds = [named in objects_in(Image.open(out / p)) for p in r["image"]]
        assert holds.count(True) == 1 and r["conversations"][1]["value"] == ("first" if holds[0] else "second")
    files = tree(out)
    toy.write_formats(out, CFG, N_TRAIN, N_EVAL, seed=3)  # the same bytes again
    assert tree(out) == files
    toy.write_dataset(tmp_path, CFG, N_TRAIN, N_EVAL, seed=3, progress=False)  # the set as it is without them
    added = {f for f in files if "which" in f or "formats" in f}
    assert len(added) == 2 * (N_TRAIN // 8 + N_EVAL // 2) + 4 and tree(tmp_path) == {
        f: b for f, b in files.items() if f not in added}


def test_the_two_eval_formats_place_the_same_images_in_front_and_interleaved(out, formats):
    front, interleaved = load(out, "eval_formats_front"), load(out, "eval_formats_interleaved")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [(r["image"], r["answer"]) for r in front] == [(r["image"], r["answer"]) for r in interleaved]
    for f, i in zip(front, interleaved):
        assert (f["type"], i["type"]) == ("front", "interleaved")
        # as the training stage places them (data.place_images with image_placement "front")
        assert toy.to_messages(f["conversations"]) == place_images(toy.to_messages(i["conversations"]), "front")
        question = i["conversations"][0]["value"].split("\n")[-1]
        assert f["conversations"][0]["value"] == "<image>\n<image>\nFirst image: \nSecond image: \n" + question
        # where the image tokens sit in the prompt the model is shown: before any text, or after each label
        for record, before in ((f, ["user\n", "\n"]), (i, ["user\nFirst image: ", "\nSecond image: "])):
            prompt = render_prompt("qwen_1_5", toy.to_messages(record["conversations"][:1]))
            parts = prompt.split("<image>")
            assert len(parts) == 3 and [p[-len(b):] for p, b in zip(parts, before)] == before, parts
            ids = tokenize(tok, prompt, [10, 10])
            images = [k for k, t in enumerate(ids) if t == IMAGE_TOKEN]
            text_before = tok.decode([t for t in ids[:images[0]] if t != IMAGE_TOKEN], skip_special_tokens=False)
            assert len(images) == 20 and text_before.endswith(before[0])


def test_the_tall_world_draws_scenes_twice_as_tall_with_labels_for_every_row(tmp_path):
    cfg = toy.ToyConfig(sizes=TALL_SIZES)
    toy.write_dataset(tmp_path, cfg, 40, 10, seed=3, progress=False)
    scenes, z = json.loads((tmp_path / "scenes.json").read_text()), np.load(tmp_path / "stage0.npz")
    assert {tuple(s["size"]) for s in scenes.values()} == {(48, 96), (48, 144), (48, 192), (48, 288)}
    assert z["color"].shape == (40, 18, 18)  # rows of the tallest scene (288 / 16)
    low = 0
    for n, path in enumerate(z["image"]):
        scene, image = scenes[path], np.asarray(Image.open(tmp_path / path)).astype(int)
        w, h = scene["size"]
        assert image.shape[:2] == (h, w) and (z["color"][n, h // 16:] == IGNORE_INDEX).all()
        for o in scene["objects"]:  # at today's cell size, whatever the scene's height
            assert z["color"][n, o["row"], o["col"]] == list(CFG.colors).index(o["color"]) + 1
            assert (image[o["row"] * 16 + 8, o["col"] * 16 + 8] == CFG.colors[o["color"]]).all()
            low += o["row"] >= 9
    assert low > 5  # objects in the rows a default scene does not have
    # the default canvases hold the tall scenes only shrunk: fitted into 48x144 (the 1x3 grid)
    canvases = candidate_resolutions(json.loads(GRID_PINPOINTS), "original")
    assert select_best_resolution((48, 192), canvases) == select_best_resolution((48, 288), canvases) == (48, 144)
    # the default world is as it was: its scenes and labels are 9 cells at most
    assert toy.ToyConfig().sizes == ((48, 96), (48, 144))
