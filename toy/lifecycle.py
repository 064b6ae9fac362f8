"""The LLaVA life cycle in miniature: `python train.py` with no arguments, on a laptop CPU in minutes.

    world.write_dataset        shapes-world images, captions and VQA in the LLaVA JSON format (runs/toy/data)
    stage 0 (stand-ins)        a tiny CLIP-style tower learns what each patch holds (and, on objects, which third
                               of the image it lies in) and a tiny Llama-style decoder (by default left at its
                               random initialisation, see ToyRun): the "pretrained encoders" real LLaVA starts from,
                               saved as an ordinary CLIP tower folder and an ordinary causal-LM folder
    stage 1 / 1.5 / 2          train.train, as the real recipes run it: projector only on captions (plain
                               template), then projector and LLM on detailed captions, then on multi-turn VQA
                               (qwen_1_5 template), AnyRes on throughout; the tower stays frozen after stage 0, and
                               each stage warms up over 10% of its steps, not 3% (ToyRun.warmup_ratio)
    (Interleave)               with ToyRun.stages "1,1.5,2,interleave" (toy/ablations.py): continue from stage 2 on
                               two-image and 3-frame video questions (formats mixed) with single-image replay, as
                               NeXT-Interleave continues a stage-2 model; not in the default (near chance at this size)
    evaluation                 greedy answers to held-out questions on new scenes, and on the same scenes blanked;
                               after an Interleave stage, the two-image ("which has more shapes?") and motion sets

The last line printed is `toy: held-out accuracy A, blank-image accuracy B, wall S s` (scripts read it). Then
`python infer.py runs/toy/data/images/eval_000000.png "What color is the circle?" --model runs/toy/stage2/final`.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from toy import world
from anyres import process_image, process_images, process_video
from export import padded_vocab_size, save_pretrained
from data import (IGNORE_INDEX, image_files_of, load_image, load_video, render_conversation, render_prompt,
                  stop_token_ids, tokenize)
from model import Llava, LlavaConfig, TextConfig, VisionConfig, VisionTower, init_fresh


@dataclass
class ToyRun:
    out: str = "runs/toy"
    seed: int = 0
    n_train: int = 20000
    n_eval: int = 1000
    # model: a CLIP-style tower (48 px crops, 16 px patches = one scene cell each) and a Llama-style decoder
    vision_width: int = 128
    vision_layers: int = 3  # used by LLaVA; the saved tower has one more, as CLIP's hidden state -2 implies
    text_width: int = 192
    text_heads: int = 6  # of head_dim text_width / text_heads, sharing 2 key/value heads
    text_layers: int = 4
    # stage 0: the stand-ins (see stage0_vision)
    # until the per-patch labels are all right (loss ~0.01) at every seed (docs/toy-results.md)
    stage0_vision_steps: int = 450
    stage0_images: int = 16  # scenes per stage-0 step
    stage0_position_std: float = 0.1
    stage0_warmup_ratio: float = 0.1
    # 0: the "pretrained LLM" is the random initialisation, saved and loaded like any base LLM (pretraining it on
    # the toy's text alone slowed its learning to look: docs/toy-results.md)
    stage0_text_steps: int = 0
    # stages 1-2 and Interleave (batch 32), chosen by the runs in docs/toy-results.md
    batch: int = 32
    stage1_steps: int = 40
    stage15_steps: int = 60
    stage2_steps: int = 750
    interleave_steps: int = 30
    stage1_lr: float = 2e-3
    stage15_lr: float = 1e-3
    stage2_lr: float = 5e-4  # at 1e-3 the decoder learned position or shape, not both (docs/toy-results.md)
    interleave_lr: float = 2e-4
    # of each stage's steps; longer than the recipes' 0.03, against stage 2 stalling at some seeds (docs/toy-results.md)
    warmup_ratio: float = 0.1
    # what runs after stage 0 (STAGES), each stage continuing from the one before. The Interleave stage is not in the
    # default: its two-image and video questions stay near chance in the toy (docs/toy-results.md)
    stages: str = "1,1.5,2"
    image_aspect_ratio: str = "anyres"  # of every stage after stage 0 (the ablations try "pad")
    token_threshold: int = 0  # Higher-AnyRes tau (0: none)
    image_placement: str = "mixed"  # the Interleave stage's two-image records: "front" | "interleaved" | "mixed"
    data: str = ""  # the data folder ("": OUT/data), made if missing
    stage0: str = ""  # stage 0's folder ("": OUT/stage0), made if missing or made with other settings
    blank_eval: bool = True  # also score the held-out questions on blanked images
    quiet: bool = False  # no progress bars


GRID_PINPOINTS = "[[48, 96], [48, 144]]"  # the toy's AnyRes canvases, as (w, h): one crop wide


def tower_config(run: ToyRun) -> VisionConfig:
    return VisionConfig(kind="clip", image_size=48, patch_size=16, hidden_size=run.vision_width,
                        intermediate_size=4 * run.vision_width, num_heads=4, num_layers=run.vision_layers)


def decoder_config(run: ToyRun, vocab_size: int) -> TextConfig:
    return TextConfig(vocab_size=vocab_size, hidden_size=run.text_width, intermediate_size=4 * run.text_width // 3 * 2,
                      num_layers=run.text_layers, num_heads=run.text_heads, num_kv_heads=2,
                      head_dim=run.text_width // run.text_heads,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=1024)


# ----------------------------------------------------------------------------------------------------------------
# Stage 0: stand-ins for the pretrained CLIP and LLM


def stage0_vision(run: ToyRun, data: Path, folder: Path, lr_factor):
    """Train the tower as the stand-in for a pretrained CLIP, then save it as a CLIP vision-model folder.

    Everything the toy does that LLaVA does not is here (real LLaVA starts from a CLIP or SigLIP that already sees):
    - a content head, CLIP-style: a crop patch's feature must point, by cosine, at the embedding of what its cell
      holds (nothing, one of the 12 colour-shape objects, or one of the 6 letters) more than at any other class,
      each embedding built from fixed word vectors (class_embeddings), so that the shape weighs as much as the colour;
    - a column head: which of its view's 3 patch columns an object lies in, on the crops and the base view (the
      scenes are one crop wide, so that is the object's third of the image): a real CLIP's patch features carry
      where they are, a tower trained on contents alone keeps too little of it to answer "left, middle or right";
    - the position embedding starts at std 0.1 instead of CLIP's 0.02, so that the column head can learn within the
      steps, and the learning rate warms up over the first tenth of them (CLIP's own schedule warms up too);
      without it the column head's loss stayed at 0.3-0.7 at four seeds of five;
    - after stage 0 the tower stays frozen (trained further, it washed the column code out).
    Measurements behind each: docs/toy-results.md."""
    labels = np.load(data / "stage0.npz")
    cfg = LlavaConfig(vision=tower_config(run), image_aspect_ratio="anyres", grid_pinpoints=json.loads(GRID_PINPOINTS))
    tower = init_fresh(_meta(VisionTower, cfg.vision))
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
        pixels, contents, columns, base, base_columns = [], [], [], [], []
        for i in rng.choice(len(labels["image"]), run.stage0_images, replace=False):
            image = process_image(load_image(data / str(labels["image"][i])), cfg)
            cols, rows = image.grid
            pixels.append(image.pixels[1:])  # the crops
            base.append(image.pixels[:1])
            content, where, base_where = patch_targets(
                *(torch.from_numpy(labels[k][i][: rows * 3, : cols * 3].astype(np.int64))
                  for k in ("color", "shape", "letter")), n_colors=C, n_shapes=S)
            contents.append(content), columns.append(where), base_columns.append(base_where)
        features = tower(torch.cat(pixels))  # (crops, 9, D)
        base_features = tower(torch.cat(base))  # (images, 9, D)
        # (crops, 9, K) cosines at a fixed scale of 16, about CLIP's initial 1/0.07
        logits = 16.0 * F.normalize(features, dim=-1) @ F.normalize(classes, dim=-1).T
        loss = F.cross_entropy(logits.flatten(0, 1), torch.cat(contents).flatten())
        column_logits = torch.cat([column(features).flatten(0, 1), column(base_features).flatten(0, 1)])
        loss = loss + F.cross_entropy(column_logits, torch.cat([torch.cat(columns).flatten(), *base_columns]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_clip_tower(tower, folder)
    return loss.item()


def class_embeddings(n_colors: int, n_shapes: int, n_letters: int, width: int) -> torch.Tensor:
    """(K, D) fixed targets of the content head, indexed as patch_targets numbers the classes: like CLIP's text
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


def patch_targets(color, shape, letter, n_colors: int, n_shapes: int):
    """Stage 0's targets for one scene from its (rows, cols) cell label maps (0 = none, k = class k-1): the content
    class of each crop patch (0 empty, then colour x shape, then letters), the column of each object patch in the
    crops, and the same in the base view (3 x 3 patches over the whole scene), IGNORE_INDEX elsewhere. Crops are
    row-major, 3 x 3 patches each: (crops, 9), (crops, 9), (9,)."""
    content = torch.where(letter > 0, n_colors * n_shapes + letter, color * n_shapes + shape)
    where = torch.where(color > 0, torch.arange(color.shape[1]) % 3, IGNORE_INDEX)
    in_crops = lambda m: rearrange(m, "(r i) (c j) -> (r c) (i j)", i=3, j=3)  # noqa: E731
    # the base view squeezes the scene into 3 x 3 patches: a patch showing an object gets its patch column
    in_base = rearrange(color > 0, "(i h) (j w) -> (i j) (h w)", i=3, j=3).any(-1)
    return in_crops(content), in_crops(where), torch.where(in_base, torch.arange(9) % 3, IGNORE_INDEX)


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


def stage0_text(run: ToyRun, data: Path, tokenizer, folder: Path):
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
    save_pretrained(model, folder, tokenizer=tokenizer)
    return loss.item()


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def visuals(record, cfg, folder: Path, blank: bool):
    """A record's images (one, or several: each padded to one crop) or video, processed as training does; `blank`
    swaps every image or frame for a black one of the same size (same token count)."""
    black = (lambda im: Image.new("RGB", im.size)) if blank else (lambda im: im)  # noqa: E731
    if "video" in record:
        return [process_video([black(f) for f in load_video(folder / record["video"], world.VIDEO_FRAMES)], cfg)]
    return process_images([black(load_image(folder / f)) for f in image_files_of(record)], cfg)


@torch.inference_mode()
def answers_right(model, tokenizer, records, folder: Path, blank: bool = False, batch: int = 50) -> list:
    """Whether each record's one-word answer is right, greedy; `blank` swaps each image for a black one of the same
    size (same token count), which no model can answer from. Prompts go `batch` at a time through
    generate.generate_batch (left-padded: the same greedy answers as one at a time, in fewer passes)."""
    from generate import generate_batch

    model.eval()
    stop = stop_token_ids(tokenizer, "qwen_1_5")
    right = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        visual = [visuals(r, model.cfg, folder, blank) for r in chunk]
        prompts = [tokenize(tokenizer, render_prompt("qwen_1_5", world.to_messages(r["conversations"][:1])),
                            [p.num_tokens for p in processed]) for r, processed in zip(chunk, visual)]
        for r, out in zip(chunk, generate_batch(model, prompts, visual, max_new_tokens=6, stop_ids=stop)):
            answer = tokenizer.decode([t for t in out if t not in stop]).strip().rstrip(".").lower()
            right.append(answer == r["answer"].lower())
    return right


def share_right(right, records, group) -> dict:
    """{group(record): share of its records answered right}, leaving out records whose group is None."""
    tally = {}
    for ok, r in zip(right, records):
        if (g := group(r)) is not None:
            tally.setdefault(g, []).append(ok)
    return {g: sum(oks) / len(oks) for g, oks in tally.items()}


# ----------------------------------------------------------------------------------------------------------------


# The stages after stage 0, each continuing from the one before it (the first from stage 0's tower and decoder):
# name -> (output folder, data file, template, the ToyRun fields of its steps and lr)
STAGES = {
    "1": ("stage1", "pretrain.json", "plain", "stage1_steps", "stage1_lr"),
    "1.5": ("stage1.5", "recap.json", "qwen_1_5", "stage15_steps", "stage15_lr"),
    "2": ("stage2", "instruct.json", "qwen_1_5", "stage2_steps", "stage2_lr"),
    # NeXT-Interleave: two-image and video questions (in front and interleaved, mixed) with single-image replay
    "interleave": ("interleave", "interleave.json", "qwen_1_5", "interleave_steps", "interleave_lr"),
}


def stage_configs(trainer, run: ToyRun, data: Path, stage0: Path) -> list:
    """One TrainConfig per stage of run.stages, exactly as the recipes run them (the tower frozen: see
    stage0_vision)."""
    out, previous, configs = Path(run.out), None, []
    knobs = {"token_threshold": run.token_threshold} if run.token_threshold else {}
    for name in run.stages.split(","):
        folder, records, template, steps, lr = STAGES[name]
        start = dict(model=str(previous / "final")) if previous else dict(llm=str(stage0 / "llm"),
                                                                           vision_tower=str(stage0 / "tower"))
        configs.append(trainer.TrainConfig(
            stage="1" if name == "1" else "2" if name == "interleave" else name, **start, data=str(data / records),
            image_folder=str(data), template=template, lr=getattr(run, lr), max_steps=getattr(run, steps),
            warmup_ratio=run.warmup_ratio,
            freeze_vision_tower=True, output_dir=str(out / folder), overwrite=True, global_batch_size=run.batch,
            micro_batch_size=run.batch, max_len=512, seed=run.seed, save_every=10_000, keep_last=1,
            image_aspect_ratio=run.image_aspect_ratio, grid_pinpoints=GRID_PINPOINTS, knobs=knobs,
            image_placement=run.image_placement, frames=world.VIDEO_FRAMES, quiet=run.quiet))
        previous = out / folder
    return configs


# the ToyRun fields stage 0 depends on
STAGE0_FIELDS = ("seed", "vision_width", "vision_layers", "text_width", "text_heads", "text_layers",
                 "stage0_vision_steps", "stage0_images", "stage0_position_std", "stage0_warmup_ratio",
                 "stage0_text_steps")


def prepare(run: ToyRun, trainer, log) -> tuple[Path, Path]:
    """The data set and stage 0's stand-ins, each made only if missing or made with other settings:
    (data folder, stage-0 folder)."""
    data = Path(run.data or Path(run.out) / "data")
    # as read back
    wanted = json.loads(json.dumps(world.manifest(world.ToyConfig(), run.n_train, run.n_eval, run.seed)))
    if not (data / "manifest.json").exists() or json.loads((data / "manifest.json").read_text()) != wanted:
        world.write_dataset(data, n_train=run.n_train, n_eval=run.n_eval, seed=run.seed, progress=not run.quiet)
    stage0 = Path(run.stage0 or Path(run.out) / "stage0")
    made_with = {k: getattr(run, k) for k in STAGE0_FIELDS} | {"data": wanted}
    stamp = stage0 / "made_with.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != made_with:
        from tokenizers import Tokenizer

        torch.manual_seed(run.seed)
        log(f"stage 0: vision tower, final loss {stage0_vision(run, data, stage0 / 'tower', trainer.lr_factor):.3f}")
        text_loss = stage0_text(run, data, Tokenizer.from_file(str(data / "tokenizer.json")), stage0 / "llm")
        log(f"stage 0: language model, "
            f"{f'final loss {text_loss:.3f}' if run.stage0_text_steps else 'random initialisation'}")
        stamp.write_text(json.dumps(made_with) + "\n")
    return data, stage0


BINDING = ("color", "shape", "position")  # the question types that name one object of the scene


def evaluate(model, tokenizer, data: Path, run: ToyRun) -> dict:
    """Held-out accuracy (overall, per type, and per type on the questions about one object among several), on the
    same scenes blanked, and on the two-image and video sets when the model was trained on them."""
    records = json.loads((data / "eval.json").read_text())
    scores = {"visual_tokens": float(np.mean([process_image(load_image(data / r["image"]), model.cfg).num_tokens
                                               for r in records[:100]]))}
    right = answers_right(model, tokenizer, records, data)
    scores["heldout"], scores["per_type"] = float(np.mean(right)), share_right(right, records, lambda r: r["type"])
    # binding: a question about one object of several needs the decoder to pick that object's tokens out of the
    # others' (what the toy learns last; with one object, any object token answers it)
    objects = {path: len(scene["objects"]) for path, scene in json.loads((data / "scenes.json").read_text()).items()}
    scores["among_several"] = share_right(right, records, lambda r: r["type"] if r["type"] in BINDING and
                                          objects[r["image"]] > 1 else None)
    if run.blank_eval:
        scores["blank"] = float(np.mean(answers_right(model, tokenizer, records, data, blank=True)))
    if "interleave" in run.stages.split(","):  # NeXT-Interleave's inputs: two images, and a 3-frame video
        for kind in ("compare", "motion"):
            scores[kind] = float(np.mean(answers_right(model, tokenizer, json.loads(
                (data / f"eval_{kind}.json").read_text()), data)))
    return scores


def life_cycle(trainer, run: ToyRun = ToyRun()) -> dict:
    """Every stage, then the evaluation; returns the scores. `trainer` is train.py itself, handed in by its main() so
    that the two files do not import each other: its `train`, `TrainConfig` and `lr_factor` run the stages exactly
    as the recipes."""
    from tokenizers import Tokenizer

    from convert import load_pretrained

    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    data, stage0 = prepare(run, trainer, log)
    configs = stage_configs(trainer, run, data, stage0)
    for cfg in configs:
        torch.manual_seed(run.seed)
        trainer.train(cfg)
        last = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        log(f"{Path(cfg.output_dir).name}: {cfg.max_steps} steps, final loss {last['loss']:.3f}")

    model, _ = load_pretrained(configs[-1].output_dir + "/final")
    scores = evaluate(model, Tokenizer.from_file(str(data / "tokenizer.json")), data, run)
    scores["wall"] = time.perf_counter() - start
    log("held-out accuracy per type: " + ", ".join(f"{t} {a:.2f}" for t, a in scores["per_type"].items()))
    log("the same, about one object among 2-3: " + ", ".join(f"{t} {scores['among_several'][t]:.2f}" for t in BINDING
                                                            if t in scores["among_several"]))
    if "compare" in scores:
        print(f"toy: multi-image accuracy {scores['compare']:.2f}, motion accuracy {scores['motion']:.2f}")
    print(f"toy: held-out accuracy {scores['heldout']:.2f}, "
          f"blank-image accuracy {scores.get('blank', float('nan')):.2f}, wall {scores['wall']:.0f} s")
    return scores
