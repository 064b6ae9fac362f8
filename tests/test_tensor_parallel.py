"""Tensor parallelism (tensor_parallel.py): two gloo processes under torchrun give the logits of one process and
the same greedy tokens, on tiny checkpoints with grouped-query attention (4 heads, 2 key/value heads) and q/k/v
biases (Qwen2, tied head) or an untied head (Mistral), text-only and with an image; `infer.py` under torchrun prints
one JSON object, from rank 0 only; a head count that does not divide by the ranks is a one-line error."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, photo

import infer
from convert import load_pretrained
from tp_worker import cases, cli_args

CHECKPOINTS = ("onevision_qwen2", "next_mistral")


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    """Runs tests/tp_worker.py on 2 processes once; -> (folders, image path, rank 0's saved results, stdout lines)."""
    tmp = tmp_path_factory.mktemp("tp")
    image = tmp / "photo.png"
    photo(70, 30, seed=7).save(image)
    folders = [str(tiny(name)) for name in CHECKPOINTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), "tests/tp_worker.py", str(tmp / "out.pt"), str(image),
                           *folders], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]
    return folders, image, torch.load(tmp / "out.pt"), done.stdout.splitlines()


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("case", ["text", "image"])
def test_two_ranks_equal_one(two_ranks, name, case):
    folders, image, results, _ = two_ranks
    folder = folders[CHECKPOINTS.index(name)]
    model, _ = load_pretrained(folder)
    logits, tokens = cases(model, image)[case]
    split_logits, split_tokens = results[folder][case]
    assert split_logits.shape == logits.shape and logits.shape[-1] == 320
    assert (split_logits - logits).abs().max() <= 1e-5
    assert split_tokens == tokens and len(tokens) == 6


def test_cli_prints_once_from_rank_0(two_ranks, capsys):
    folders, image, _, lines = two_ranks
    assert len(lines) == len(folders)  # one JSON object per run: rank 1 printed nothing
    for folder, line in zip(folders, lines):
        infer.main(cli_args(folder, image))
        assert json.loads(line)["output_token_ids"] == json.loads(capsys.readouterr().out)["output_token_ids"]


def test_heads_not_dividing_is_one_clear_line(tiny, monkeypatch):
    # 3 ranks for 4 heads: refused before any process group is created, so one process shows it
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"needs the head counts to divide by 3, but this model has 4 attention heads "
                                         r"and 2 key/value heads: run with --nproc_per_node"):
        infer.main(["Hi", "--model", str(tiny("next_qwen2"))])
