"""The LLaVA life cycle in miniature: `python train.py` with no arguments, on a laptop CPU in minutes.

    world.write_dataset        shapes-world images, captions and VQA in the LLaVA JSON format (runs/toy/data)
    stage 0 (toy/stage0.py)    the stand-ins for the pretrained CLIP and LLM: a tiny CLIP-style tower learns what each
                               patch of each view holds (the AnyRes crops, the squashed base view, the padded whole)
                               and a tiny Llama-style decoder (by default left at its random initialisation, see
                               ToyRun), saved as an ordinary CLIP tower folder and an ordinary causal-LM folder
    stage 1 / 1.5 / 2          train.train, as the real recipes run it: projector only on captions (plain
                               template), then projector and LLM on detailed captions, then on multi-turn VQA
                               (qwen_1_5 template), AnyRes on throughout; the tower stays frozen after stage 0, and
                               each stage warms up over 10% of its steps, not 3% (ToyRun.warmup_ratio)
    (Interleave)               with ToyRun.stages "1,1.5,2,interleave" (toy/ablations.py): continue from stage 2 on
                               two-image and 3-frame video questions (formats mixed) with single-image replay, as
                               NeXT-Interleave continues a stage-2 model; not in the default (near chance at this size)
    (formats)                  with ToyRun.stages "formats" and ToyRun.init a finished stage-2 model: "which image has
                               the red circle?" with single-image replay, the images placed per ToyRun.image_placement
                               (NeXT-Interleave's placement ablation, toy/ablations.py)
    evaluation                 greedy answers to held-out questions on new scenes, and on the same scenes blanked;
                               after an Interleave stage, the two-image ("which has more shapes?") and motion sets;
                               after a formats stage, its held-out pairs with the images in front and interleaved

The last line printed is `toy: held-out accuracy A, blank-image accuracy B, wall S s` (scripts read it). Then
`python infer.py runs/toy/data/images/eval_000000.png "What color is the circle?" --model runs/toy/stage2/final`.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toy import world
from toy.scene import TALL_SIZES
from anyres import process_image, process_images, process_video
from toy.stage0 import GRID_PINPOINTS, stage0_text, stage0_vision
from data import image_files_of, load_image, load_video, render_prompt, stop_token_ids, tokenize


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
    # also teach the contents of the squashed base view and the padded whole, as CLIP learns whole images (the anyres
    # claim's tower); off by default: it made colour binding near perfect but lost position at 2 seeds of 5
    # (docs/toy-results.md)
    stage0_whole_views: bool = False
    # 0: the "pretrained LLM" is the random initialisation, saved and loaded like any base LLM (pretraining it on
    # the toy's text alone slowed its learning to look: docs/toy-results.md)
    stage0_text_steps: int = 0
    # stages 1-2 and Interleave (batch 32), chosen by the runs in docs/toy-results.md
    batch: int = 32
    stage1_steps: int = 40
    stage15_steps: int = 60
    stage2_steps: int = 750
    interleave_steps: int = 30
    formats_steps: int = 200  # the formats claim (toy/ablations.py): a new question, from a stage-2 model
    stage1_lr: float = 2e-3
    stage15_lr: float = 1e-3
    stage2_lr: float = 5e-4  # at 1e-3 the decoder learned position or shape, not both (docs/toy-results.md)
    interleave_lr: float = 2e-4
    formats_lr: float = 5e-4  # stage 2's: a new question to learn in few steps, with replay against forgetting
    # of each stage's steps; longer than the recipes' 0.03, against stage 2 stalling at some seeds (docs/toy-results.md)
    warmup_ratio: float = 0.1
    # what runs after stage 0 (STAGES), each stage continuing from the one before. The Interleave stage is not in the
    # default: its two-image and video questions stay near chance in the toy (docs/toy-results.md)
    stages: str = "1,1.5,2"
    image_aspect_ratio: str = "anyres"  # of every stage after stage 0 (the ablations try "pad")
    max_grid: int = 0  # Higher-AnyRes: canvases of every grid up to N x N crops (0: GRID_PINPOINTS, 1x2 and 1x3)
    token_threshold: int = 0  # Higher-AnyRes tau (0: none)
    image_placement: str = "mixed"  # the two-image records of the Interleave and formats stages: front | interleaved
    world: str = "default"  # "tall": half of the scenes twice as tall (scene.TALL_SIZES), a data set of its own
    data: str = ""  # the data folder ("": OUT/data), made if missing
    stage0: str = ""  # stage 0's folder ("": OUT/stage0), made if missing or made with other settings
    init: str = ""  # a finished model folder the first stage continues from ("": stage 0's tower and decoder)
    blank_eval: bool = True  # also score the held-out questions on blanked images
    quiet: bool = False  # no progress bars


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
    # its placement ablation: "which image has the red circle?" with single-image replay (world.write_formats)
    "formats": ("formats", "formats.json", "qwen_1_5", "formats_steps", "formats_lr"),
}


def stage_configs(trainer, run: ToyRun, data: Path, stage0: Path) -> list:
    """One TrainConfig per stage of run.stages, exactly as the recipes run them (the tower frozen: see
    stage0_vision)."""
    out, previous, configs = Path(run.out), Path(run.init) if run.init else None, []
    knobs = {k: getattr(run, k) for k in ("max_grid", "token_threshold") if getattr(run, k)}
    for name in run.stages.split(","):
        folder, records, template, steps, lr = STAGES[name]
        start = dict(model=str(previous)) if previous else dict(llm=str(stage0 / "llm"),
                                                                vision_tower=str(stage0 / "tower"))
        configs.append(trainer.TrainConfig(
            stage=name if name in ("1", "1.5") else "2", **start, data=str(data / records),
            image_folder=str(data), template=template, lr=getattr(run, lr), max_steps=getattr(run, steps),
            warmup_ratio=run.warmup_ratio,
            freeze_vision_tower=True, output_dir=str(out / folder), overwrite=True, global_batch_size=run.batch,
            micro_batch_size=run.batch, max_len=512, seed=run.seed, save_every=10_000, keep_last=1,
            image_aspect_ratio=run.image_aspect_ratio, grid_pinpoints=GRID_PINPOINTS, knobs=knobs,
            image_placement=run.image_placement, frames=world.VIDEO_FRAMES, quiet=run.quiet))
        previous = out / folder / "final"
    return configs


# the ToyRun fields stage 0 depends on
STAGE0_FIELDS = ("seed", "vision_width", "vision_layers", "text_width", "text_heads", "text_layers",
                 "stage0_vision_steps", "stage0_images", "stage0_position_std", "stage0_warmup_ratio",
                 "stage0_whole_views", "stage0_text_steps")


def world_config(run: ToyRun) -> world.ToyConfig:
    """The shapes world of run.world."""
    if run.world not in ("default", "tall"):
        raise SystemExit(f"error: ToyRun.world {run.world!r}: expected 'default' or 'tall' (scene.TALL_SIZES)")
    return world.ToyConfig(sizes=TALL_SIZES) if run.world == "tall" else world.ToyConfig()


def stale(stamp: Path, wanted: dict) -> bool:
    """Whether the files `stamp` vouches for are missing or were made with other settings than `wanted`."""
    return not stamp.exists() or json.loads(stamp.read_text()) != json.loads(json.dumps(wanted))  # as read back


def prepare(run: ToyRun, trainer, log) -> tuple[Path, Path]:
    """The data set (with the formats stage's files when the run has that stage) and stage 0's stand-ins, each made
    only if missing or made with other settings: (data folder, stage-0 folder)."""
    data, cfg = Path(run.data or Path(run.out) / "data"), world_config(run)
    wanted = world.manifest(cfg, run.n_train, run.n_eval, run.seed)
    if stale(data / "manifest.json", wanted):
        world.write_dataset(data, cfg, n_train=run.n_train, n_eval=run.n_eval, seed=run.seed, progress=not run.quiet)
    if "formats" in run.stages.split(",") and stale(data / "formats_manifest.json", world.formats_manifest(
            cfg, run.n_train, run.n_eval, run.seed)):
        world.write_formats(data, cfg, n_train=run.n_train, n_eval=run.n_eval, seed=run.seed)
    stage0 = Path(run.stage0 or Path(run.out) / "stage0")
    made_with = {k: getattr(run, k) for k in STAGE0_FIELDS} | {"data": wanted}
    stamp = stage0 / "made_with.json"
    if stale(stamp, made_with):
        from tokenizers import Tokenizer

        torch.manual_seed(run.seed)
        excess = stage0_vision(run, data, stage0 / "tower", trainer.lr_factor)
        log(f"stage 0: vision tower, final loss {excess:.3f} above the floor of its mixed targets")
        text_loss = stage0_text(run, data, Tokenizer.from_file(str(data / "tokenizer.json")), stage0 / "llm")
        log(f"stage 0: language model, "
            f"{f'final loss {text_loss:.3f}' if run.stage0_text_steps else 'random initialisation'}")
        stamp.write_text(json.dumps(made_with) + "\n")
    return data, stage0


BINDING = ("color", "shape", "position")  # the question types that name one object of the scene


def evaluate(model, tokenizer, data: Path, run: ToyRun) -> dict:
    """Held-out accuracy (overall, per type, and per type on the questions about one object among several), on the
    same scenes blanked, and on the two-image and video sets when the model was trained on them: "compare" and
    "motion" after an Interleave stage; after a formats stage, "front" and "interleaved" (the same pairs, images
    placed each way) and "formats", their mean."""
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
    stages, sets = run.stages.split(","), {}
    if "interleave" in stages:  # NeXT-Interleave's inputs: two images, and a 3-frame video
        sets |= {"compare": "eval_compare.json", "motion": "eval_motion.json"}
    if "formats" in stages:  # its two image placements
        sets |= {"front": "eval_formats_front.json", "interleaved": "eval_formats_interleaved.json"}
    for key, name in sets.items():
        scores[key] = float(np.mean(answers_right(model, tokenizer, json.loads((data / name).read_text()), data)))
    if "formats" in stages:
        scores["formats"] = (scores["front"] + scores["interleaved"]) / 2
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
    if "formats" in scores:
        print(f"toy: which-image accuracy, images in front {scores['front']:.2f}, interleaved "
              f"{scores['interleaved']:.2f}")
    print(f"toy: held-out accuracy {scores['heldout']:.2f}, "
          f"blank-image accuracy {scores.get('blank', float('nan')):.2f}, wall {scores['wall']:.0f} s")
    return scores
