"""Checkpoints, as a specification: a run stopped anywhere, also killed in the middle of a save, and resumed under
any number of processes (FSDP2, DDP, one) ends as the run never stopped; the llava-hf folders are streamed into
shards of --max-shard-size; nodes rendezvous over c10d; the model's own chat template travels with its checkpoint;
every flag has a help line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_train import config, dataset, losses, run_torchrun, weights  # noqa: F401 (dataset is a fixture)

from convert import load_pretrained
from export import parse_size
from train import train

STEPS = 8


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The uninterrupted run every test below compares with: 8 steps in one process."""
    out = tmp_path_factory.mktemp("reference")
    train(config(dataset, out, max_steps=STEPS))
    return out / "run"


def same_losses(a, b, rel):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(x) for x, y in zip(a, b))


def test_a_checkpoint_in_several_shards_resumes_bit_identically(dataset, reference, tmp_path):
    flags = dict(max_steps=STEPS, save_every=3, hf_checkpoints=True, max_shard_size="200KB")
    train(config(dataset, tmp_path, stop_after=5, **flags))  # stopped after step 5: its newest checkpoint is step 3
    step3 = tmp_path / "run" / "checkpoints" / "step-0000003"
    shards = sorted(p.name for p in step3.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (step3 / "model.safetensors.index.json").exists(), shards
    assert len(list((step3 / "trainer").glob("*.distcp"))) == 1  # one process: one DCP data file
    train(config(dataset, tmp_path, resume=True, **flags))
    final = tmp_path / "run" / "final"
    assert len(list(final.glob("model-*.safetensors"))) >= 3
    a, b = weights(reference / "final"), sharded_weights(final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(reference) == losses(tmp_path / "run")


def sharded_weights(folder):
    model, _ = load_pretrained(str(folder))
    return dict(model.state_dict())


def test_llava_hf_shards_hold_at_most_max_shard_size(dataset, monkeypatch, tmp_path):
    """Each shard file is at most --max-shard-size (a tensor larger than that gets a file of its own) and together
    they hold every tensor once, as the index says."""
    import safetensors.torch

    from export import save_pretrained

    model, _ = load_pretrained(str(dataset[1]))
    written = {}
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda shard, path, metadata=None: written.update({path: dict(shard)}))
    limit = parse_size("150KB")
    save_pretrained(model, tmp_path, max_shard_bytes=limit)
    sizes = {p: sum(t.numel() * t.element_size() for t in shard.values()) for p, shard in written.items()}
    assert len(written) >= 4 and all(size <= limit or len(written[p]) == 1 for p, size in sizes.items()), sizes
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(k for shard in written.values() for k in shard)
    assert sum(len(s) for s in written.values()) == len(model.state_dict())


def test_parse_size():
    assert ([parse_size(s) for s in ("5GB", "200KB", "2GiB", "1.5MB", "100", "80G")]
            == [5 * 10**9, 200_000, 2 << 30, 1_500_000, 100, 80 * 10**9])
    with pytest.raises(SystemExit, match="--max-shard-size '5 apples'"):
        parse_size("5 apples")


def test_resumes_under_another_process_count_and_layout(dataset, reference, tmp_path):
    """FSDP2 on 2 gloo ranks -> 1 process -> DDP on 2 ranks -> FSDP2 on 2 ranks, two steps each, give the losses of
    the uninterrupted one-process run."""
    common = ("--max-steps", str(STEPS), "--save-every", "2", "--stop-after", "2")
    run_torchrun(dataset, tmp_path, "--fsdp", *common)
    assert len(list((tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer").glob("*.distcp"))) == 2
    train(config(dataset, tmp_path, max_steps=STEPS, save_every=2, stop_after=2, resume=True))
    run_torchrun(dataset, tmp_path, *common, "--resume")
    run_torchrun(dataset, tmp_path, "--fsdp", *common, "--resume")
    one, resharded = losses(reference), losses(tmp_path / "run")
    assert same_losses(one, resharded, 1e-4), (one, resharded)
    a, b = weights(reference / "final"), weights(tmp_path / "run" / "final")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


# Runs train.py with one function made to hang at a chosen point, so that the test can SIGKILL it there.
PAUSING_DRIVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch.distributed.checkpoint.filesystem as dcp_files, safetensors.torch, train

def pause_when(owner, name, hit):
    original = getattr(owner, name)
    def paused(*args, **kwargs):
        if hit(*args, **kwargs):
            print("paused", flush=True)
            time.sleep(3600)
        return original(*args, **kwargs)
    setattr(owner, name, paused)

point = sys.argv[2]
if point == "dcp-metadata":  # step 6's data files are written, its .metadata not yet
    pause_when(dcp_files.FileSystemWriter, "finish", lambda self, *a, **k: ".tmp-step-0000006" in str(self.path))
if point == "llava-hf-shard":  # step 6's DCP files and first llava-hf shard are written, the second not yet
    pause_when(safetensors.torch, "save_file",
               lambda shard, path, **k: ".tmp-step-0000006" in path and "00002-of" in path)
if point == "final":  # the last checkpoint is published, final/ not yet
    pause_when(train, "publish_final", lambda *a, **k: True)
train.main(sys.argv[3:])
"""


@pytest.mark.parametrize("point", ["dcp-metadata", "llava-hf-shard", "final"])
def test_sigkill_during_a_save_then_resume_ends_bit_identical(dataset, reference, tmp_path, point):
    root, model = dataset
    args = ["--model", str(model), "--data", str(root / "data.json"), "--image-folder", str(root / "images"),
            "--output-dir", str(tmp_path / "run"), "--global-batch-size", "8", "--micro-batch-size", "2",
            "--lr", "1e-3", "--max-steps", str(STEPS), "--save-every", "3", "--quiet", "--template", "qwen_1_5",
            "--max-len", "512", "--device", "cpu", "--hf-checkpoints", "--max-shard-size", "200KB"]
    run = subprocess.Popen([sys.executable, "-c", PAUSING_DRIVER, str(ROOT), point, *args], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           # the same sums as in here
                           env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        assert run.stdout.readline().strip() == "paused", run.stderr.read()[-3000:]
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    checkpoints = tmp_path / "run" / "checkpoints"
    visible = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
    assert visible == (["step-0000006", "step-0000008"] if point == "final" else ["step-0000003"])
    assert not (tmp_path / "run" / "final").exists()
    train(config(dataset, tmp_path, max_steps=STEPS, save_every=3, hf_checkpoints=True, max_shard_size="200KB",
                 resume=True))
    a, b = weights(reference / "final"), sharded_weights(tmp_path / "run" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(reference) == losses(tmp_path / "run")


def test_two_nodes_of_one_process_equal_one_process(dataset, reference, tmp_path):
    """torchrun --nnodes 2 with c10d rendezvous on localhost, one process per "node": the losses of one process."""
    root, model = dataset
    args = ["--model", str(model), "--data", str(root / "data.json"), "--image-folder", str(root / "images"),
            "--output-dir", str(tmp_path / "run"), "--global-batch-size", "8", "--micro-batch-size", "2",
            "--lr", "1e-3", "--max-steps", str(STEPS), "--stop-after", "2", "--quiet", "--template", "qwen_1_5",
            "--max-len", "512", "--device", "cpu"]
    port = 30500 + os.getpid() % 1000
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                               "--rdzv-id", "test", "train.py", *args],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [node.communicate(timeout=900) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in results]
    one, two = losses(reference)[:2], losses(tmp_path / "run")
    assert same_losses(one, two, 1e-5), (one, two)


def test_the_models_own_template_is_the_default_and_travels_with_its_checkpoints(dataset, tmp_path):
    """Without --template a stage trains on the model's own format and saves it in config.json; stage 1's "plain"
    captions are not a chat format, so its checkpoint keeps the model's own; infer.py reads what was saved."""
    import infer

    train(config(dataset, tmp_path / "a", template="", stage="1", max_steps=1))
    final = tmp_path / "a" / "run" / "final"
    assert json.loads((final / "config.json").read_text())["llava_template"] == "qwen_1_5"  # the tiny Qwen2's
    train(config(dataset, tmp_path / "b", template="plain", stage="1", max_steps=1))
    raw = json.loads((tmp_path / "b" / "run" / "final" / "config.json").read_text())
    assert raw["llava_template"] == "qwen_1_5"
    raw["llava_template"] = "chatml_direct"
    (tmp_path / "b" / "run" / "final" / "config.json").write_text(json.dumps(raw))
    args = infer.parse_args(["hello", "--model", str(tmp_path / "b" / "run" / "final")])
    assert infer.load_model(args, "cpu", torch.float32, [])[3] == "chatml_direct"


def test_every_flag_has_a_help_line_and_template_lists_its_choices():
    from data import TEMPLATES
    from train import arg_parser

    actions = [a for a in arg_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 45 and [a.dest for a in actions if not a.help] == []
    assert next(a for a in actions if a.dest == "template").choices == sorted(TEMPLATES)


def test_no_pickle_is_ever_loaded_with_code():
    needle = "weights_only=" + "False"
    found = [p for p in ROOT.rglob("*.py") if needle in p.read_text()]
    assert found == []


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    """DCP's .metadata is a pickle; resume reads it with an unpickler that builds only DCP's metadata classes."""
    import pickle

    from checkpoint import SafeReader
    from convert import CheckpointError

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="posix.system"):
        SafeReader(tmp_path).read_metadata()
    assert not (tmp_path / "ran").exists()


def run_ids(run_dir):
    folders = (run_dir / "checkpoints").iterdir()
    return {p.name: json.loads((p / "trainer_state.json").read_text())["run"] for p in folders}


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_starts_over(dataset, tmp_path, capsys):
    train(config(dataset, tmp_path, max_steps=3, save_every=1, keep_last=5))
    before = run_ids(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train(config(dataset, tmp_path, max_steps=2, save_every=1))
    assert e.value.code == (f"error: --output-dir {tmp_path / 'run'} holds step-0000001, step-0000002, step-0000003, "
                            f"final/ of an earlier run: continue that run with --resume, start over with --overwrite "
                            f"(deletes them) or pick another --output-dir")
    assert run_ids(tmp_path / "run") == before  # nothing deleted, nothing written
    capsys.readouterr()
    train(config(dataset, tmp_path, max_steps=2, save_every=1, keep_last=5, overwrite=True))
    deleted = "--overwrite: deleted step-0000001, step-0000002, step-0000003, final/ of the earlier run"
    assert deleted in capsys.readouterr().err
    after = run_ids(tmp_path / "run")
    assert sorted(after) == ["step-0000001", "step-0000002"] and len(set(after.values())) == 1
    assert set(after.values()).isdisjoint(before.values()) and len(losses(tmp_path / "run")) == 2
    with pytest.raises(SystemExit, match="--resume continues the run in --output-dir, --overwrite deletes it"):
        train(config(dataset, tmp_path, max_steps=2, resume=True, overwrite=True))


def test_keep_last_deletes_only_the_runs_own_older_checkpoints(dataset, tmp_path):
    """Another run's checkpoint in the folder (copied in) survives; this run keeps its newest, and a resumed run is
    the same run (its id travels with the checkpoint)."""
    import shutil

    train(config(dataset, tmp_path / "other", max_steps=1, save_every=1))
    flags = dict(max_steps=4, save_every=1, keep_last=1)
    train(config(dataset, tmp_path, stop_after=2, **flags))
    mine = run_ids(tmp_path / "run")
    assert list(mine) == ["step-0000002"]  # its step 1 deleted by --keep-last 1
    name = "step-0000001"
    shutil.copytree(tmp_path / "other" / "run" / "checkpoints" / name, tmp_path / "run" / "checkpoints" / name)
    other = run_ids(tmp_path / "other" / "run")["step-0000001"]
    train(config(dataset, tmp_path, resume=True, **flags))
    assert run_ids(tmp_path / "run") == {"step-0000001": other, "step-0000004": mine["step-0000002"]}
    assert other != mine["step-0000002"]


def test_a_rank_the_saved_run_did_not_have_gets_rng_streams_of_its_own():
    """Resumed on more processes than saved: rank 2 must not replay rank 0's streams (its LoRA dropout masks would
    repeat rank 0's); its streams come from (seed, rank, step), the same on every resume."""
    import random

    import numpy as np

    from checkpoint import gather_rng, restore_rng

    torch.manual_seed(0)
    saved = gather_rng()  # one process saved
    draws = {}
    for rank in (0, 1, 2, 1):
        restore_rng(saved, rank, seed=0, step=3)
        draws.setdefault(rank, []).append((torch.rand(8), random.random(), float(np.random.rand())))
    (r0,), (r1, r1_again), (r2,) = draws[0], draws[1], draws[2]
    assert torch.equal(r1[0], r1_again[0]) and r1[1:] == r1_again[1:]
    for a, b in ((r1, r0), (r2, r0), (r1, r2)):
        assert not torch.equal(a[0], b[0]) and a[1] != b[1] and a[2] != b[2]
    torch.manual_seed(0)
    assert torch.equal(torch.rand(8), r0[0])  # rank 0 continues the saved stream itself
    restore_rng(saved, 1, seed=1, step=3)
    assert not torch.equal(torch.rand(8), r1[0])  # another seed, other streams


def test_resuming_another_runs_checkpoint_is_refused_and_deletes_nothing(dataset, tiny, tmp_path):
    """--resume into a folder of another stage, LoRA setting, data or model: one line, and that run's checkpoints
    and final/ stay (resuming would have deleted them, keep_last, and replaced final/)."""
    from convert import CheckpointError

    train(config(dataset, tmp_path, max_steps=2, save_every=1, keep_last=5))
    before = run_ids(tmp_path / "run")
    fewer = tmp_path / "data.json"  # the same file name, 24 records of the 32
    fewer.write_text(json.dumps(json.loads((dataset[0] / "data.json").read_text())[:24]))
    for overrides, words in [(dict(stage="1.5"), "--stage '2', this run has '1.5'"),
                             (dict(lora_rank=4), "--lora-rank 0, this run has 4"),
                             (dict(data=str(fewer), image_folder=str(dataset[0] / "images")), "4 steps an epoch"),
                             (dict(model=str(tiny("next_llama"))), "which this run's model has")]:
        with pytest.raises(CheckpointError, match=words):
            train(config(dataset, tmp_path, max_steps=4, save_every=1, keep_last=1, resume=True, **overrides))
        assert run_ids(tmp_path / "run") == before and (tmp_path / "run" / "final").is_dir()


def test_a_checkpoint_cut_short_or_damaged_is_one_line(dataset, tmp_path):
    """A data file shorter than its metadata (a partial copy) is refused before loading; one whose bytes are
    damaged fails inside DCP, whose CheckpointException (a BaseException holding every rank's traceback) becomes
    one line."""
    from convert import CheckpointError

    train(config(dataset, tmp_path, max_steps=1, save_every=1))
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer"
    data = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="shorter than its metadata says"):
        train(config(dataset, tmp_path, max_steps=2, save_every=1, resume=True))
    data.write_bytes(whole[:64] + bytes(len(whole) - 128) + whole[-64:])
    with pytest.raises(CheckpointError, match="cannot be read into this run") as e:
        train(config(dataset, tmp_path, max_steps=2, save_every=1, resume=True))
    assert "\n" not in str(e.value)


def preempt(dataset, tmp_path, launcher: list[str], threads: int) -> tuple[int, str]:
    """A run of STEPS steps, sent SIGTERM once two steps are logged; -> (steps logged, the run's stderr)."""
    root, model = dataset
    args = ["--model", str(model), "--data", str(root / "data.json"), "--image-folder", str(root / "images"),
            "--output-dir", str(tmp_path / "run"), "--global-batch-size", "8", "--micro-batch-size", "2",
            "--lr", "1e-3", "--max-steps", str(STEPS), "--save-every", "100", "--quiet", "--template", "qwen_1_5",
            "--max-len", "512", "--device", "cpu"]
    run = subprocess.Popen([sys.executable, *launcher, "train.py", *args], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    step = metrics.read_text().count("\n")
    assert 2 <= step < STEPS and run.returncode != 0, err[-3000:]
    assert (f"stopped by SIGTERM after step {step} of {STEPS}, its checkpoint saved in {tmp_path / 'run'}; continue "
            f"with the same command and --resume") in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [f"step-{step:07d}"]
    return step, err


def test_sigterm_saves_at_the_end_of_the_step_and_resume_ends_bit_identical(dataset, reference, tmp_path):
    """A scheduler's preemption (SIGTERM) mid-run: the step in flight ends, its checkpoint is saved (none was due:
    --save-every 100), the run stops with one line, and --resume ends as the run that never stopped."""
    preempt(dataset, tmp_path, [], torch.get_num_threads())
    train(config(dataset, tmp_path, max_steps=STEPS, save_every=100, resume=True))
    a, b = weights(reference / "final"), weights(tmp_path / "run" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(reference) == losses(tmp_path / "run")


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(dataset, reference, tmp_path):
    """torchrun passes SIGTERM to both ranks; they agree on the step (an all-reduce), save it together, and a
    resume in one process ends as the run that never stopped, within the reduction order's rounding."""
    port = str(29500 + (os.getpid() + 7) % 1000)
    preempt(dataset, tmp_path, ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port], 1)
    train(config(dataset, tmp_path, max_steps=STEPS, save_every=100, resume=True))
    assert same_losses(losses(reference), losses(tmp_path / "run"), 1e-4)


def test_a_save_that_fails_for_lack_of_space_is_one_line_and_the_last_checkpoint_resumes(dataset, reference,
                                                                                        tmp_path, monkeypatch):
    """The disk fills during step 4's save: one line naming the step, no half-written folder left, step 2's
    checkpoint whole, and --resume (space freed) ends as the run that never stopped."""
    import errno

    import checkpoint
    from convert import CheckpointError

    real_save = checkpoint.dcp.save

    def full_at_step_4(state, checkpoint_id, **kwargs):
        if "step-0000004" in str(checkpoint_id):
            (Path(checkpoint_id) / "partial.distcp").parent.mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "partial.distcp").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(checkpoint.dcp, "save", full_at_step_4)
    with pytest.raises(CheckpointError, match=r"writing checkpoint step 4 into .* failed \(\[Errno 28\] No space "
                                              r"left on device\); the newest finished checkpoint is whole") as e:
        train(config(dataset, tmp_path, max_steps=STEPS, save_every=2, keep_last=5))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    train(config(dataset, tmp_path, max_steps=STEPS, save_every=2, keep_last=5, resume=True))
    a, b = weights(reference / "final"), weights(tmp_path / "run" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(reference) == losses(tmp_path / "run")
