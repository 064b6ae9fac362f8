"""Training, as a specification: what each stage updates, that the loss falls, that checkpoints are what infer.py
reads, that an interrupted run resumes bit-identically, that DDP and FSDP2 on two gloo processes equal one process,
and that bad samples are counted and reported, never trained on silently."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, photo
from safetensors.torch import load_file

from convert import internal_key, load_pretrained
from train import TrainConfig, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny):
    """32 samples for the tiny Qwen2 LLaVA-NeXT: multi-turn image chats of several aspect ratios, 1 in 8 text-only."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for i in range(32):
        if i % 8 == 7:
            answer = "one two three"[: 3 + 4 * (i % 3)]
            records.append({"id": f"text{i}", "conversations": [{"from": "human", "value": f"count to {i % 3 + 1}"},
                                                                 {"from": "gpt", "value": answer}]})
            continue
        photo(24 + 3 * i, 60 - i, seed=i).save(root / "images" / f"{i}.png")
        records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": ["a cat", "a dog"][i % 2]},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root, tiny("next_qwen2")


def config(dataset, tmp_path, **overrides):
    root, model = dataset
    values = dict(model=str(model), data=str(root / "data.json"), image_folder=str(root / "images"),
                  output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=2, lr=1e-3, epochs=2,
                  save_every=4, quiet=True, template="qwen_1_5", max_len=512, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def weights(folder):
    return {internal_key(k): v for k, v in load_file(folder / "model.safetensors").items()}


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage_1_updates_the_projector_and_nothing_else(dataset, tmp_path):
    before, _ = load_pretrained(str(dataset[1]))
    after = train(config(dataset, tmp_path, stage="1", max_steps=3))
    changed = {n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])}
    assert changed == {"projector.linear_1.weight", "projector.linear_1.bias",
                       "projector.linear_2.weight", "projector.linear_2.bias"}


def test_loss_falls_and_the_checkpoint_is_what_infer_reads(dataset, tmp_path):
    model = train(config(dataset, tmp_path, epochs=6))  # 24 steps
    curve = losses(tmp_path / "run")
    assert len(curve) == 24 and sum(curve[-4:]) / 4 < 0.5 * sum(curve[:4]) / 4
    reloaded, _ = load_pretrained(str(tmp_path / "run" / "final"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model.eval()(ids))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000020", "step-0000024"]  # keep 2


def test_killed_and_resumed_run_ends_bit_identical(dataset, tmp_path):
    train(config(dataset, tmp_path / "a", max_steps=7, save_every=3))
    train(config(dataset, tmp_path / "b", max_steps=7, save_every=3, stop_after=4))  # "killed" after step 4
    assert len(losses(tmp_path / "b" / "run")) == 4
    train(config(dataset, tmp_path / "b", max_steps=7, save_every=3, resume=True))  # restarts from step 3
    a, b = weights(tmp_path / "a" / "run" / "final"), weights(tmp_path / "b" / "run" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")


def test_data_loading_processes_give_the_same_batches(dataset, tmp_path):
    train(config(dataset, tmp_path / "a", max_steps=3))
    train(config(dataset, tmp_path / "b", max_steps=3, num_workers=2))  # read, tiled and tokenised in 2 processes
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")


def run_torchrun(dataset, tmp_path, *flags, nproc=2, device="cpu"):
    """The same run as config(...) with max_steps 4, through torchrun's command line on `nproc` processes."""
    root, model = dataset
    args = ["--model", str(model), "--data", str(root / "data.json"), "--image-folder", str(root / "images"),
            "--output-dir", str(tmp_path / "run"), "--global-batch-size", "8", "--micro-batch-size", "2",
            "--lr", "1e-3", "--max-steps", "4", "--save-every", "4", "--quiet", "--template", "qwen_1_5",
            "--max-len", "512", "--device", device, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(29500 + os.getpid() % 1000), "train.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]
    return tmp_path / "run"


@pytest.mark.parametrize("flags", [(), ("--fsdp",)], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_equal_one(dataset, tmp_path, flags):
    # 8 samples a step: one process runs 4 micro-batches of 2, two processes 2 each (gradient accumulation in both)
    single = tmp_path / "single"
    train(config(dataset, single, max_steps=4))
    distributed = run_torchrun(dataset, tmp_path / "dist", *flags)
    one, two = losses(single / "run"), losses(distributed)
    assert len(one) == len(two) == 4
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), (one, two)
    a, b = weights(single / "run" / "final"), weights(distributed / "final")
    # Adam divides by sqrt(v): for parameters with near-zero gradients the all-reduce's rounding moves updates by up
    # to ~1e-5 here; the losses above are the tight check
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory, tiny):
    """16 samples for the tiny OneVision: two or three images interleaved in the text, 3-frame GIF videos, single
    images and text-only chats, as they come in OneVision's stage-2 mixture."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    records = []
    for i in range(16):
        if i % 4 == 0:
            frames = [photo(30, 30, seed=i * 10 + f) for f in range(4)]
            frames[0].save(root / "images" / f"{i}.gif", save_all=True, append_images=frames[1:])
            records.append({"id": f"video{i}", "video": f"{i}.gif", "conversations": [
                {"from": "human", "value": "<image>\nWhat moves?"},
                {"from": "gpt", "value": ["a cat", "a dog"][i % 8 // 4]}]})
        elif i % 4 == 3:
            records.append({"id": f"text{i}", "conversations": [{"from": "human", "value": "count"},
                                                                 {"from": "gpt", "value": "one two"}]})
        else:
            names = [f"{i}_{k}.png" for k in range(i % 4 + 1)]  # one or two images ... and three at i % 4 == 2
            for k, name in enumerate(names):
                photo(20 + 7 * k, 40 - 5 * k, seed=i + k).save(root / "images" / name)
            text = " and ".join(f"<image>" for _ in names) + " which is wider?"
            records.append({"id": f"img{i}", "image": names, "conversations": [
                {"from": "human", "value": text}, {"from": "gpt", "value": ["the first", "the second"][i % 2]}]})
    (root / "data.json").write_text(json.dumps(records))
    return root, tiny("onevision_qwen2")


def test_multi_image_and_video_batches_train_the_same_on_two_processes(mixed_dataset, tmp_path):
    flags = dict(frames=3, image_placement="mixed", global_batch_size=8, micro_batch_size=2, max_steps=3)
    single = tmp_path / "single"
    train(config(mixed_dataset, single, **flags))
    distributed = run_torchrun(mixed_dataset, tmp_path / "dist", "--frames", "3", "--image-placement", "mixed",
                               "--max-steps", "3")
    one, two = losses(single / "run"), losses(distributed)
    assert len(one) == len(two) == 3 and one[-1] < one[0]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), (one, two)
    metrics = [json.loads(line) for line in (single / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["bad_samples"] for m in metrics] == [0, 0, 0]


@pytest.mark.parametrize("kind", ["full", "frozen_tower", "lora"])
def test_mfu_counts_the_flops_torch_counts(dataset, kind):
    """step_flops (what MFU divides by the peak) agrees within 5% with torch's own count of the matmul FLOPs of a
    forward and backward pass over a real batch, with the tower learning, frozen, and with LoRA (frozen decoder
    weights that gradients still cross)."""
    from torch.utils.flop_counter import FlopCounterMode

    import lora
    from data import SupervisedDataset, collate, load_records
    from metrics import step_flops
    from train import set_trainable

    root, folder = dataset
    model, _ = load_pretrained(str(folder))
    if kind == "lora":
        lora.inject(model, rank=4, alpha=8)
    set_trainable(model, TrainConfig(stage="2", freeze_vision_tower=kind != "full",
                                     lora_rank=4 if kind == "lora" else 0))
    from chat_template import load_tokenizer

    records = load_records(root / "data.json")[:4]
    data = SupervisedDataset(records, root / "images", load_tokenizer(folder, str(folder)), "qwen_1_5", model.cfg, 512)
    batches = [collate([data[i] for i in range(4)], 0)]
    batches[0]["padding_mask"][:] = 1  # torch counts the padded positions too
    from torch.nn.attention import SDPBackend, sdpa_kernel

    learned = torch.nn.functional.pad(batches[0]["labels"][:, 1:] != -100, (0, 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # plain matmuls torch can count
        model(batches[0]["input_ids"], batches[0]["images"], logits_at=learned).sum().backward()
    counted = counter.get_total_flops()
    assert abs(step_flops(model, batches) - counted) <= 0.05 * counted, (step_flops(model, batches), counted)


def test_training_without_the_padding_mask_gives_the_masked_losses(dataset):
    """Right padding + the causal rule (no (B, 1, T, T) mask, so SDPA keeps its fast kernels) gives, at every learned
    position, the logits of the explicit causal-and-padding mask: fp32 loss within 1e-6 relative, logits 1e-5."""
    from chat_template import load_tokenizer
    from data import SupervisedDataset, collate, load_records

    root, folder = dataset
    model, _ = load_pretrained(str(folder))
    records = load_records(root / "data.json")[:8]
    data = SupervisedDataset(records, root / "images", load_tokenizer(folder, str(folder)), "qwen_1_5", model.cfg, 512)
    batch = collate([data[i] for i in (0, 7, 1, 6)], 0)  # text-only rows among image rows: lengths differ, padding
    assert (batch["padding_mask"] == 0).any()
    learned = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1))
    with torch.no_grad():
        masked = model(batch["input_ids"], batch["images"], padding_mask=batch["padding_mask"], logits_at=learned)
        causal = model(batch["input_ids"], batch["images"], logits_at=learned)
    targets = batch["labels"][:, 1:][learned[:, :-1]]
    a, b = (torch.nn.functional.cross_entropy(x, targets) for x in (masked, causal))
    assert (masked - causal).abs().max() <= 1e-5 and abs(a - b) <= 1e-6 * abs(a), ((masked - causal).abs().max(), a, b)
