"""Training checkpoints: the trainer state every rank writes in parallel (torch.distributed.checkpoint, DCP), the
llava-hf export that infer.py and the next stage read, and how both become visible atomically.

    output_dir/checkpoints/step-0000500/
        trainer/              DCP: model + AdamW state, each rank writing its own shard (no gather), .metadata last;
                              read back into any process count and layout (FSDP2 <-> DDP <-> one process)
        trainer_state.json    step, data position, counters summed over ranks, the run's config, every rank's RNG,
                              the run's id (--keep-last deletes only the run's own checkpoints)
        config.json, model*.safetensors, tokenizer.json    the llava-hf folder too, with --hf-checkpoints
    output_dir/final/         the llava-hf folder of the last step

A save goes to .tmp-step-N; every file is fsynced, and after a barrier rank 0 renames it to step-N (a rename is
atomic on POSIX), so a SIGKILL at any moment leaves the newest finished checkpoint whole and --resume continues
from it: bit-identically with the same process count and layout; with another count or layout within ~1e-4 (the
gradients are reduced in another order), and ranks the saved run did not have get RNG streams of their own.
A run refuses an output folder that holds another run's checkpoints or final/ unless --resume or --overwrite.
SIGTERM (a scheduler's preemption or time limit; torchrun passes it to every rank) saves a checkpoint at the end of
the step in flight and stops the run (`Preemption`).
The llava-hf export is streamed: FSDP2 shards are gathered one tensor at a time, so no rank
holds more than one full tensor plus one output shard. The output folder must be shared by all nodes.
"""

import base64
import dataclasses
import json
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import lora
from convert import CheckpointError
from distributed import barrier, device_sum, gather_object, world_size
from export import parse_size, publish, save_pretrained

# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(cfg, model, optimizer, step: int, steps_per_epoch: int, counters: dict, tokenizer, template: str,
                    rank: int, run: str = ""):
    """Write output_dir/checkpoints/step-N from every rank (they all call this), marked with the run's id
    (check_output_dir), then drop this run's oldest beyond --keep-last; another run's checkpoints are never touched."""
    root = Path(cfg.output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if rank == 0:  # the remains of a save that was killed
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)  # this rank's shards (DTensors under FSDP2)
    try:
        # tensors only: DCP would store anything else as a pickle, and reading one back can run code
        with quiet_single_process():
            dcp.save({"model": model_state, "optim": optim_state["state"]}, checkpoint_id=tmp / "trainer",
                     no_dist=not dist.is_initialized())
        if cfg.hf_checkpoints:
            export_hf(cfg, model, tmp, tokenizer, template, rank)
    except (OSError, CheckpointException) as e:  # a full disk, a lost mount: the newest finished one stays whole
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint step {step} into {root} failed ({cause(e)}); the newest finished "
                              f"checkpoint is whole: free space (or fix the folder), then --resume") from None
    epoch, batch = divmod(step, steps_per_epoch)
    trainer_state = {"step": step,
                     "data": {"epoch": epoch, "batch_in_epoch": batch, "samples": step * cfg.global_batch_size,
                              "steps_per_epoch": steps_per_epoch},
                     "counters": global_counters(counters), "config": dataclasses.asdict(cfg),
                     "world_size": world_size(), "rng": gather_rng(), "run": run}
    barrier()  # every rank's files are written (and fsynced by DCP)
    if rank == 0:
        write_json(tmp / "trainer_state.json", trainer_state)
        publish(tmp, final)
        for old in [p for p in sorted(root.glob("step-*")) if run_of(p) == run][: -cfg.keep_last]:
            shutil.rmtree(old)
    barrier()


def publish_final(cfg, model, tokenizer, template: str, rank: int):
    """The stage's result, for infer.py and the next stage: output_dir/final in the llava-hf layout, streamed
    from the live model by every rank and written by rank 0 (to a temporary name, then published). A LoRA stage
    writes its adapters merged into the weights, and final/adapter/ alone in the PEFT format."""
    out = Path(cfg.output_dir)
    final, tmp = out / "final", out / ".tmp-final"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if not cfg.lora_rank:
        export_hf(cfg, model, tmp, tokenizer, template, rank)
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_pretrained(unwrap(model), tmp, state_dict=lora.merge(state, lora.alpha(cfg) / cfg.lora_rank),
                            tokenizer=tokenizer, template=template, max_shard_bytes=parse_size(cfg.max_shard_size))
            lora.save_adapter(state, tmp / "adapter", cfg.lora_rank, lora.alpha(cfg), cfg.lora_dropout,
                              lora.targets(cfg), cfg.model)
    if rank == 0:
        publish(tmp, final)
    barrier()


def export_hf(cfg, model, folder: Path, tokenizer, template: str, rank: int):
    model = unwrap(model)
    save_pretrained(model, folder, state_dict=model.state_dict(), tokenizer=tokenizer, template=template, rank=rank,
                    max_shard_bytes=parse_size(cfg.max_shard_size))


def write_json(path: Path, value):
    path.write_text(json.dumps(value, indent=1))


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def cause(e: BaseException) -> BaseException:
    """What failed inside DCP: a CheckpointException carries each rank's exception (and its traceback)."""
    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e


class Preemption:
    """Notes SIGTERM while it is installed; `asked(device)` is True on every rank once any rank got it (an
    all-reduce a step when several run), so they save together and stop at the same step."""

    def __init__(self):
        self.got, self.before = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to that thread only
            self.before = signal.signal(signal.SIGTERM, self.note)
        return self

    def note(self, signum, frame):
        self.got = True

    def asked(self, device) -> bool:
        if dist.is_initialized() and dist.get_world_size() > 1:
            return bool(device_sum(float(self.got), device).item())
        return self.got

    def __exit__(self, *exc):
        if self.before is not None:
            signal.signal(signal.SIGTERM, self.before)


# ----------------------------------------------------------------------------------------------------------------
# Resuming


def latest_checkpoint(cfg) -> Path | None:
    """The newest finished checkpoint of output_dir (a half-written one still has its temporary name)."""
    found = sorted((Path(cfg.output_dir) / "checkpoints").glob("step-*"))
    if found and not (found[-1] / "trainer_state.json").exists():
        raise CheckpointError(f"{found[-1]} has no trainer_state.json, which every checkpoint train.py writes holds, "
                              f"so it cannot be resumed; start a new --output-dir, with --model {found[-1]}")
    return found[-1] if found else None


def resume_from(ckpt: Path, model, optimizer, cfg, rank: int, steps_per_epoch: int) -> tuple[int, dict]:
    """Load the model, AdamW state and this rank's RNG from `ckpt`, resharded onto this run's ranks and layout;
    returns (step, counters)."""
    state = read_trainer_state(ckpt)
    check_same_run(cfg, state, ckpt, steps_per_epoch)
    reader = SafeReader(ckpt / "trainer")
    stored = reader.read_metadata().state_dict_metadata
    model_state, optim_state = get_state_dict(model, optimizer)  # destinations, laid out as this run shards them
    check_same_parameters({k.removeprefix("model.") for k in stored if k.startswith("model.")}, model_state, ckpt)
    # a parameter that had no gradient yet (e.g. the tower before the first image) has no AdamW state,
    # and must not get one
    kept = {name: s for name, s in optim_state["state"].items() if f"optim.{name}.step" in stored}
    destination = {"model": model_state, "optim": kept}
    try:
        with quiet_single_process():
            dcp.load(destination, storage_reader=reader, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException, with tracebacks
        why = cause(e)
        raise CheckpointError(f"{ckpt / 'trainer'} cannot be read into this run ({type(why).__name__}: "
                              f"{str(why).strip().splitlines()[-1] if str(why).strip() else ''}); resume from "
                              f"an earlier checkpoint, or start a new --output-dir") from None
    set_model_state_dict(model, destination["model"])
    set_optimizer_state_dict(model, optimizer,
                             {"state": destination["optim"], "param_groups": optim_state["param_groups"]},
                             options=StateDictOptions(strict=False))
    try:
        restore_rng(state["rng"], rank, cfg.seed, state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a state not written by gather_rng
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: its \"rng\" is not what train.py writes "
                              f"({type(e).__name__}: {e}); resume from an earlier checkpoint") from None
    counters = state["counters"] if rank == 0 else {"samples": 0, "bad": {}, "bad_ids": [], "truncated": 0}
    return state["step"], counters


def read_trainer_state(ckpt: Path) -> dict:
    where = ckpt / "trainer_state.json"
    try:
        state = json.loads(where.read_text())
    except ValueError as e:
        raise CheckpointError(f"{where} is not valid JSON ({e}); "
                              f"resume from an earlier checkpoint or start a new --output-dir") from None
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("step"), int)):
        raise CheckpointError(f"{where} is not what train.py writes (an object with \"step\" and \"config\"); "
                              f"resume from an earlier checkpoint or start a new --output-dir")
    return state


# what a resumed run must keep: the data order is a function of (data, seed, global batch, grouping), and the
# trained parameters of the stage and the LoRA settings
SAME_RUN = ("stage", "seed", "global_batch_size", "group_by_modality_length", "lora_rank", "lora_alpha",
            "lora_targets")


def check_same_run(cfg, state: dict, ckpt: Path, steps_per_epoch: int):
    """Refuse to resume another run's checkpoint: its folder's checkpoints and final/ are that run's."""
    saved, why = state["config"], "or start a new --output-dir (this one holds that run's checkpoints and final/)"
    for key in SAME_RUN:
        if key in saved and saved[key] != getattr(cfg, key):
            raise CheckpointError(f"{ckpt} was trained with --{key.replace('_', '-')} {saved[key]!r}, this run has "
                                  f"{getattr(cfg, key)!r}: resume with the same value, {why}")
    data = state.get("data") or {}
    same_file = Path(saved.get("data") or "").name == Path(cfg.data).name
    if not same_file or data.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise CheckpointError(f"{ckpt} was trained on --data {saved.get('data')!r} ({data.get('steps_per_epoch')} "
                              f"steps an epoch), this run reads {cfg.data!r} ({steps_per_epoch}): resume on the same "
                              f"data (its order depends on it), {why}")


def check_same_parameters(stored: set[str], model_state: dict, ckpt: Path):
    """The checkpoint's model entries are exactly this run's parameters (DCP loads only those the model has, so
    a LoRA checkpoint resumed without --lora-rank would drop its adapters without a word)."""
    extra, missing = sorted(stored - set(model_state)), sorted(set(model_state) - stored)
    if extra or missing:
        first = f"it holds {extra[0]!r}, which this run's model has not" if extra else \
            f"it lacks {missing[0]!r}, which this run's model has"
        raise CheckpointError(f"{ckpt}: {first} ({len(extra)} such, {len(missing)} missing): resume with the model, "
                              f"stage and LoRA settings it was trained with, or start a new --output-dir")


class SafeReader(FileSystemReader):
    """DCP's reader, made safe for a checkpoint from anywhere: its .metadata (a pickle) goes through an unpickler
    that builds only the classes our saves hold, every entry must be a tensor (DCP reads a non-tensor entry with
    torch.load with weights_only off), and every data file must lie in the folder itself; DCP then reads the tensors
    with weights_only=True. Anything else is refused before a data file is opened."""

    def __init__(self, path: Path):
        if not (path / ".metadata").exists():
            raise CheckpointError(f"{path} has no .metadata: not a finished checkpoint")
        super().__init__(path)
        self.folder = path

    def read_metadata(self, *args, **kwargs):
        where = self.folder / ".metadata"
        with open(where, "rb") as f:
            try:
                metadata = Unpickler(f).load()
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
            except Exception as e:
                raise CheckpointError(f"{where}: not a DCP metadata file ({type(e).__name__}: {e}); "
                                      f"resume from a checkpoint train.py wrote") from None
        check_metadata(metadata, self.folder, where)
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_metadata(metadata, folder: Path, where: Path):
    """Tensor entries only, each stored in a plain file of `folder` (not a path elsewhere, not a symlink out)."""
    if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)):
        raise CheckpointError(f"{where} does not hold DCP metadata; resume from a checkpoint train.py wrote")
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{where}: entry {fqn!r} is a {type(entry).__name__}, "
                                  f"but train.py saves tensors only (DCP would unpickle it with code); "
                                  f"not loading this checkpoint")
    inside = folder.resolve()
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or info.transform_descriptors or not isinstance(name, str):
            raise CheckpointError(f"{where}: a storage entry {info!r} is not a plain DCP file slice; not loading it")
        path = folder / name
        if Path(name).name != name or name in ("", ".", "..") or path.resolve().parent != inside or not path.is_file():
            raise CheckpointError(f"{where}: data file {name!r} is not a file inside {folder} "
                                  f"(it points outside, or is missing); not loading this checkpoint")
        if not (isinstance(info.offset, int) and isinstance(info.length, int)
                and 0 <= info.offset and info.offset + info.length <= path.stat().st_size):
            raise CheckpointError(f"{path} is shorter than its metadata says (cut off in a copy?); resume from an "
                                  f"earlier checkpoint or copy this one again")


class Unpickler(pickle.Unpickler):
    """Builds exactly the (module, name) pairs a DCP save of tensors holds (torch 2.13; checked with pickletools)."""

    ALLOWED = ({("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
        "_MEM_FORMAT_ENCODING")}
        | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
           ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
           ("pathlib._local", "PosixPath")}  # where Python 3.13 defines PosixPath
        | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)})

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:  # exact pairs: protocol 4 would resolve a dotted name through attributes
            return super().find_class(module, name)
        raise CheckpointError(f"names {module}.{name}, which a DCP checkpoint of tensors never holds; not loading it")


# ----------------------------------------------------------------------------------------------------------------
# Non-tensor state: counters and RNG (JSON, gathered to rank 0). The data position is the step: the order is a
# pure function of (seed, epoch)


def global_counters(counters: dict) -> dict:
    """The sample counters summed over ranks (each rank counts only its own micro-batches)."""
    every = gather_object(counters)
    total = {"samples": sum(c["samples"] for c in every), "truncated": sum(c["truncated"] for c in every),
             "bad": {}, "bad_ids": [i for c in every for i in c["bad_ids"]][:1000]}
    for c in every:
        for kind, n in c["bad"].items():
            total["bad"][kind] = total["bad"].get(kind, 0) + n
    return total


def gather_rng() -> list[dict]:
    """Every rank's RNG states (torch, numpy, python, and cuda where used), rank order."""
    state = {"torch": encode(torch.get_rng_state()), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = encode(torch.cuda.get_rng_state())
    return gather_object(state)


def restore_rng(saved: list[dict], rank: int, seed: int, step: int):
    """This rank's saved RNG streams; a rank the saved run did not have (resumed on more processes) gets streams of
    its own from (seed, rank, step), not a copy of another rank's (its LoRA dropout would repeat that rank's)."""
    if rank < len(saved):
        return set_rng(saved[rank])
    entropy = np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint64)
    torch.manual_seed(int(entropy[0]))  # also every CUDA device's generator
    random.seed(int(entropy[1]))
    np.random.seed(int(entropy[1]) % 2**32)


def set_rng(state: dict):
    torch.set_rng_state(decode(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class quiet_single_process(warnings.catch_warnings):
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def check_output_dir(cfg, rank: int) -> str:
    """Before the first step: --max-shard-size parses, on several nodes --output-dir is one shared filesystem, and
    the folder holds no other run's checkpoints or final/ (--keep-last and --resume would mix the two runs) unless
    --resume continues it or --overwrite deletes them. Returns the run's id, which marks each of its checkpoints:
    the resumed checkpoint's with --resume, else a new one."""
    parse_size(cfg.max_shard_size)
    if dist.is_initialized():
        check_shared(cfg, rank)
    if cfg.resume and cfg.overwrite:
        raise SystemExit("error: --resume continues the run in --output-dir, --overwrite deletes it: pass one of them")
    if cfg.resume and (ckpt := latest_checkpoint(cfg)):
        return run_of(ckpt)
    out = Path(cfg.output_dir)  # shared: every rank sees the same folder
    used = sorted(p.name for p in (out / "checkpoints").glob("step-*")) + ["final/"] * (out / "final").exists()
    if used and not cfg.overwrite:
        how = "it has no checkpoint to --resume from" if cfg.resume else "continue that run with --resume"
        raise SystemExit(f"error: --output-dir {out} holds {', '.join(used)} of an earlier run: {how}, start over with "
                         f"--overwrite (deletes them) or pick another --output-dir" if rank == 0 else 1)
    barrier()  # every rank has looked before rank 0 deletes
    if used and rank == 0:
        for name in ("checkpoints", "final", ".tmp-final"):
            shutil.rmtree(out / name, ignore_errors=True)
        print(f"--overwrite: deleted {', '.join(used)} of the earlier run in {out}", file=sys.stderr)
    barrier()
    return gather_object(uuid.uuid4().hex)[0]  # rank 0's


def run_of(ckpt: Path) -> str | None:
    """The id of the run that wrote a checkpoint ("" before train.py marked them; None if unreadable)."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()).get("run", "")
    except (OSError, ValueError, AttributeError):
        return None


def check_shared(cfg, rank: int):
    """DCP has each rank write its own files into one folder; on the nodes' own disks a checkpoint would be
    scattered."""
    probe = Path(cfg.output_dir) / f".shared-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    barrier()
    seen = gather_object(probe.exists())
    barrier()
    if rank == 0:
        probe.unlink()
    if not all(seen):
        missing = [r for r, s in enumerate(seen) if not s]
        if rank == 0:
            print(f"error: --output-dir {cfg.output_dir} is not visible from ranks {missing}: on several nodes it must "
                  f"be a shared filesystem (NFS, Lustre, ...)", file=sys.stderr)
        raise SystemExit(1)
