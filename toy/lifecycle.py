"""The LLaVA life cycle in miniature: `python train.py` with no arguments, on a laptop CPU in minutes.

    world.write_dataset        shapes-world images, captions and VQA in the LLaVA JSON format (runs/toy/data)
    stage 0 (stand-ins)        a tiny CLIP-style tower learns what each patch holds (and, on objects, which third
                               of the image it lies in) and a tiny Llama-style decoder (by default left at its
                               random initialisation, see ToyRun): the "pretrained encoders" real LLaVA starts from,
                               saved as an ordinary CLIP tower folder and an ordinary causal-LM folder
    stage 1 / 1.5 / 2          train.train, exactly as the real recipes run it: projector only on captions (plain
                               template), then projector and LLM on detailed captions, then on multi-turn VQA
                               (qwen_1_5 template), AnyRes on throughout; the tower stays frozen after stage 0
    Interleave                 continue from stage 2 on two-image and 3-frame video questions (formats mixed) with
                               single-image replay, the tower frozen, as NeXT-Interleave continues a stage-2 model
    evaluation                 greedy answers to held-out questions on new scenes, and on the same scenes blanked;
                               then the two-image ("which has more shapes?") and motion ("which way?") sets

The last line printed is `toy: held-out accuracy A, blank-image accuracy B, wall S s` (scripts read it). Then
`python infer.py runs/toy/data/images/eval_000000.png "What color is the circle?" --model runs/toy/interleave/final`.
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
from export import save_pretrained
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
    text_layers: int = 4
    # steps per stage (batch 32), chosen by the runs in docs/toy-results.md
    stage0_vision_steps: int = 300  # until the per-patch labels are all right (loss ~0)
    # 0: the "pretrained LLM" is the random initialisation, saved and loaded like any base LLM (pretraining it on
    # the toy's text alone slowed its learning to look: docs/toy-results.md)
    stage0_text_steps: int = 0
    stage1_steps: int = 40
    stage15_steps: int = 60
    stage2_steps: int = 750  # the most that keeps the whole life cycle under 10 minutes on 2 cores
    interleave_steps: int = 30
    batch: int = 32


GRID_PINPOINTS = "[[48, 96], [48, 144]]"  # the toy's AnyRes canvases, as (w, h): one crop wide


def tower_config(run: ToyRun) -> VisionConfig:
    return VisionConfig(kind="clip", image_size=48, patch_size=16, hidden_size=run.vision_width,
                        intermediate_size=4 * run.vision_width, num_heads=4, num_layers=run.vision_layers)


def decoder_config(run: ToyRun, vocab_size: int) -> TextConfig:
    return TextConfig(vocab_size=vocab_size, hidden_size=run.text_width, intermediate_size=4 * run.text_width // 3 * 2,
                      num_layers=run.text_layers, num_heads=6, num_kv_heads=2, head_dim=run.text_width // 6,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=1024)


# ----------------------------------------------------------------------------------------------------------------
# Stage 0: stand-ins for the pretrained CLIP and LLM


def stage0_vision(run: ToyRun, data: Path, folder: Path, lr_factor):
    """Train the tower as the stand-in for a pretrained CLIP, then save it as a CLIP vision-model folder.

    This is the toy's own stand-in, not LLaVA: real LLaVA starts from a CLIP or SigLIP that already sees. Two heads
    read the features LLaVA will use:
    - content, CLIP-style: a crop patch's feature must point at the embedding of what its cell holds (nothing, one
      of the 12 colour-shape objects, or one of the 6 letters) more than at any other, by cosine, as CLIP's image
      embedding points at its caption's;
    - column: which of its view's 3 patch columns an object lies in, on the crops and on the base view (the scenes
      are one crop wide, so in both views that is the object's third of the image). Only object patches are
      labelled, so that the "where" code rides on the objects' own tokens.
    The position embedding starts at std 0.1 instead of 0.02, so that the column head can learn within 300 steps.
    Why each choice: docs/toy-results.md."""
    labels = np.load(data / "stage0.npz")
    cfg = LlavaConfig(vision=tower_config(run), image_aspect_ratio="anyres", grid_pinpoints=json.loads(GRID_PINPOINTS))
    tower = init_fresh(_meta(VisionTower, cfg.vision))
    with torch.no_grad():
        tower.position_embedding.weight.normal_(0, 0.1)
    C, S, L = (len(labels[f"{k}_names"]) for k in ("color", "shape", "letter"))  # class tables, "none" first
    classes = nn.Parameter(torch.randn(C * S + L, run.vision_width))  # (K, D): empty, colour x shape, then letters
    column = nn.Linear(run.vision_width, 3)
    optimizer = torch.optim.AdamW([*tower.parameters(), classes, *column.parameters()], lr=2e-3)
    rng = np.random.default_rng(run.seed)
    for step in range(run.stage0_vision_steps):
        pixels, contents, columns, base, base_columns = [], [], [], [], []
        for i in rng.choice(len(labels["image"]), run.batch // 2, replace=False):
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
        for g in optimizer.param_groups:
            g["lr"] = 2e-3 * lr_factor(step + 1, run.stage0_vision_steps, warmup_ratio=0.0)
    save_clip_tower(tower, folder)
    return loss.item()


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

    from convert import hf_key

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
    cfg = LlavaConfig(vision=None, text=decoder_config(run, tokenizer.get_vocab_size()))
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
def vqa_accuracy(model, tokenizer, records, folder: Path, blank: bool = False, batch: int = 50):
    """Share of one-word answers right, greedy, overall and per question type; `blank` swaps each image for a black
    one of the same size (same token count), which no model can answer from. Prompts go `batch` at a time through
    generate.generate_batch (left-padded: the same greedy answers as one at a time, in fewer passes)."""
    from generate import generate_batch

    model.eval()
    stop = stop_token_ids(tokenizer, "qwen_1_5")
    right, per_type = 0, {}
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        visual = [visuals(r, model.cfg, folder, blank) for r in chunk]
        prompts = [tokenize(tokenizer, render_prompt("qwen_1_5", world.to_messages(r["conversations"][:1])),
                            [p.num_tokens for p in processed]) for r, processed in zip(chunk, visual)]
        for r, out in zip(chunk, generate_batch(model, prompts, visual, max_new_tokens=6, stop_ids=stop)):
            answer = tokenizer.decode([t for t in out if t not in stop]).strip().rstrip(".").lower()
            ok = answer == r["answer"].lower()
            right += ok
            n, k = per_type.get(r["type"], (0, 0))
            per_type[r["type"]] = (n + 1, k + ok)
    return right / len(records), {t: k / n for t, (n, k) in per_type.items()}


# ----------------------------------------------------------------------------------------------------------------


def life_cycle(trainer, run: ToyRun = ToyRun()):
    """Every stage, then the evaluation. `trainer` is train.py itself, handed in by its main() so that the two files
    do not import each other: its `train`, `TrainConfig` and `lr_factor` run the stages exactly as the recipes."""
    from tokenizers import Tokenizer

    from convert import load_pretrained

    start = time.perf_counter()
    torch.manual_seed(run.seed)
    out = Path(run.out)
    data = out / "data"
    wanted = json.loads(json.dumps(world.manifest(world.ToyConfig(), run.n_train, run.n_eval, run.seed)))  # as read back
    if not (data / "manifest.json").exists() or json.loads((data / "manifest.json").read_text()) != wanted:
        world.write_dataset(data, n_train=run.n_train, n_eval=run.n_eval, seed=run.seed)  # new, changed or incomplete
    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    log(f"stage 0: vision tower, final loss {stage0_vision(run, data, out / 'stage0' / 'tower', trainer.lr_factor):.3f}")
    text_loss = stage0_text(run, data, tokenizer, out / "stage0" / "llm")
    log(f"stage 0: language model, {f'final loss {text_loss:.3f}' if run.stage0_text_steps else 'random initialisation'}")

    common = dict(image_folder=str(data), global_batch_size=run.batch, micro_batch_size=run.batch, max_len=512,
                  seed=run.seed, save_every=10_000, keep_last=1, image_aspect_ratio="anyres", grid_pinpoints=GRID_PINPOINTS)
    stages = [
        trainer.TrainConfig(stage="1", llm=str(out / "stage0" / "llm"), vision_tower=str(out / "stage0" / "tower"),
                    data=str(data / "pretrain.json"), template="plain", lr=2e-3, max_steps=run.stage1_steps,
                    output_dir=str(out / "stage1"), **common),
        # the tower stays frozen from here on: trained further, it washed the column code out (docs/toy-results.md)
        trainer.TrainConfig(stage="1.5", model=str(out / "stage1" / "final"), data=str(data / "recap.json"), template="qwen_1_5",
                    lr=1e-3, freeze_vision_tower=True, max_steps=run.stage15_steps, output_dir=str(out / "stage1.5"),
                    **common),
        # lr 5e-4: at 1e-3 the decoder learned position or shape, not both (docs/toy-results.md)
        trainer.TrainConfig(stage="2", model=str(out / "stage1.5" / "final"), data=str(data / "instruct.json"), template="qwen_1_5",
                    lr=5e-4, freeze_vision_tower=True, max_steps=run.stage2_steps, output_dir=str(out / "stage2"),
                    **common),
        # NeXT-Interleave: continue the stage-2 model on two-image and video questions (in front and interleaved,
        # mixed) with single-image replay, the tower frozen
        trainer.TrainConfig(stage="2", model=str(out / "stage2" / "final"), data=str(data / "interleave.json"), template="qwen_1_5",
                    lr=2e-4, freeze_vision_tower=True, max_steps=run.interleave_steps, image_placement="mixed",
                    frames=world.VIDEO_FRAMES, output_dir=str(out / "interleave"), **common),
    ]
    for cfg in stages:
        trainer.train(cfg)
        last = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        log(f"{Path(cfg.output_dir).name}: {cfg.max_steps} steps, final loss {last['loss']:.3f}")

    model, _ = load_pretrained(str(out / "interleave" / "final"))
    records = json.loads((data / "eval.json").read_text())
    accuracy, per_type = vqa_accuracy(model, tokenizer, records, data)
    blank, _ = vqa_accuracy(model, tokenizer, records, data, blank=True)
    log("held-out accuracy per type: " + ", ".join(f"{t} {a:.2f}" for t, a in per_type.items()))
    # NeXT-Interleave's inputs: two images in one prompt, and a 3-frame video (chance 0.50 and 0.25)
    interleave = {kind: json.loads((data / f"eval_{kind}.json").read_text()) for kind in ("compare", "motion")}
    scores = {kind: (vqa_accuracy(model, tokenizer, recs, data)[0], vqa_accuracy(model, tokenizer, recs, data, blank=True)[0])
              for kind, recs in interleave.items()}
    print(f"toy: multi-image accuracy {scores['compare'][0]:.2f} (blank {scores['compare'][1]:.2f}), "
          f"motion accuracy {scores['motion'][0]:.2f} (blank {scores['motion'][1]:.2f})")
    print(f"toy: held-out accuracy {accuracy:.2f}, blank-image accuracy {blank:.2f}, wall {time.perf_counter() - start:.0f} s")
