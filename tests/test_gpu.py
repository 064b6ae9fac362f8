"""On a CUDA GPU, the same numbers as on the CPU: fp32 logits and training losses equal the CPU's, bf16 autocast
and the compiled blocks track fp32, one torchrun process trains over NCCL, and generation (eager, and the
compiled decode step with CUDA graphs) gives the CPU's greedy tokens. Skipped where there is no GPU (CI)."""

import json

import pytest
import torch
from conftest import photo
from test_train import config, dataset, losses, run_torchrun  # noqa: F401  (dataset is a fixture)

import generate as generation
from anyres import process_image
from convert import load_pretrained
from model import IMAGE_TOKEN
from train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off: fp32 on the GPU must be fp32 (cuDNN's convolutions, the patch embedding, default to TF32)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def image_prompt(model):
    images = [process_image(photo(45, 30, seed=1), model.cfg)]
    return [5, 6] + [IMAGE_TOKEN] * images[0].num_tokens + [7, 8, 9], images


def test_fp32_logits_on_cuda_equal_the_cpu(dataset):  # noqa: F811
    cpu, _ = load_pretrained(str(dataset[1]))
    gpu, _ = load_pretrained(str(dataset[1]), device="cuda")
    ids, images = image_prompt(cpu)
    with torch.no_grad():
        a = cpu(torch.tensor([ids]), images)
        b = gpu(torch.tensor([ids], device="cuda"), images).cpu()
    assert (a - b).abs().max() <= 1e-4


def test_fp32_training_on_cuda_equals_the_cpu(dataset, tmp_path):  # noqa: F811
    train(config(dataset, tmp_path / "cpu", max_steps=4))
    train(config(dataset, tmp_path / "gpu", max_steps=4, device="cuda"))
    one, two = losses(tmp_path / "cpu" / "run"), losses(tmp_path / "gpu" / "run")
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, two)), (one, two)
    metrics = [json.loads(line) for line in (tmp_path / "gpu" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["gpu_memory_gb"] > 0 for m in metrics)


@pytest.mark.parametrize("flags", [dict(bf16=True), dict(compile=True), dict(bf16=True, compile=True),
                                   dict(bf16=True, gradient_checkpointing=True)],
                         ids=["bf16", "compile", "bf16+compile", "bf16+checkpointing"])
def test_fast_paths_track_fp32(dataset, tmp_path, flags):  # noqa: F811
    """Same weights, data and steps: the first loss (before any update) within 1% of fp32 in bf16 and 1e-4 compiled
    in fp32, and the loss falls by half over 24 steps as it does in fp32."""
    train(config(dataset, tmp_path / "ref", epochs=6, device="cuda"))
    train(config(dataset, tmp_path / "fast", epochs=6, device="cuda", **flags))
    ref, fast = losses(tmp_path / "ref" / "run"), losses(tmp_path / "fast" / "run")
    assert abs(fast[0] - ref[0]) <= (1e-2 if flags.get("bf16") else 1e-4) * ref[0], (ref[0], fast[0])
    assert sum(fast[-4:]) / 4 < 0.5 * sum(fast[:4]) / 4, fast


def test_one_torchrun_process_trains_over_nccl(dataset, tmp_path):  # noqa: F811
    """torchrun on one GPU: the NCCL process group, the all-reduced loss and token counts, the same losses as
    without torchrun. (Two ranks need two GPUs: DDP and FSDP2 across ranks are checked on gloo in test_train.py.)"""
    train(config(dataset, tmp_path / "plain", max_steps=4, device="cuda"))
    nccl = run_torchrun(dataset, tmp_path / "nccl", nproc=1, device="cuda")
    one, two = losses(tmp_path / "plain" / "run"), losses(nccl)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), (one, two)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_tokens_on_cuda_equal_the_cpu(dataset, compile):  # noqa: F811
    cpu, _ = load_pretrained(str(dataset[1]))
    gpu, _ = load_pretrained(str(dataset[1]), device="cuda")
    ids, images = image_prompt(cpu)
    want = list(generation.generate(cpu, ids, images, max_new_tokens=12))
    got = list(generation.generate(gpu, ids, images, max_new_tokens=12, compile=compile))
    assert got == want
