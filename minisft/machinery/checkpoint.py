"""Checkpoints: everything needed to continue a run exactly where it stopped, and never half of it.

    output_dir/checkpoint-40/
        model.safetensors + config.json    the weights (or adapter_model.safetensors + adapter_config.json with LoRA)
        optimizer.pt                       AdamW's running averages m and v
        sharded/                           under FSDP instead of the two above: weights (LoRA: the adapter) and
                                           optimizer state, each process's own shards (torch.distributed.checkpoint)
        scheduler.pt                       where the learning-rate schedule is
        rng_state.pt                       the random generators (dropout, shuffling); under torchrun
                                           one rng_state_{rank}.pt per process
        trainer_state.json                 the step, epoch and tokens so far, what the data order depends on, the
                                           base model's identity, and the size and sha256 of every file above

Writing. A checkpoint is written to .checkpoint-40.partial, flushed to the disk (fsync), and renamed
into place. A rename is atomic, so a process killed at any moment (SIGKILL, or the machine losing
power) leaves each checkpoint-N folder whole or absent. An old checkpoint is renamed away before it is
deleted, for the same reason. A write that fails (a full disk) removes its partial folder and stops
the run with one line; the checkpoints before it stay as they were. Under FSDP every process writes
its shards in parallel, and nothing is gathered to one process: the save costs what one shard does.
--save_total_limit prunes the oldest, but never the newest nor, with --load_best_model_at_end, the best
(machinery/best_checkpoint.py), whose record the trainer state keeps for a resume.

Resuming. The examples a step sees are a function of the seed, the step, and the settings that cut the
data into steps (minisft/machinery/loop.py). The checkpoint stores those settings and a fingerprint of the
tokenized training data, and a resume that would change them is refused by name: it would no longer
continue the same run. --ignore_data_order_mismatch lets a user who means it go on anyway.

Another number of processes. What decides a step's examples is the global batch (processes ×
per-process batch × accumulation), not its split, so a checkpoint of N processes continues on M
when the per-process batch or the accumulation is re-derived to keep it; the run says which. A
sharded checkpoint loads into any number of processes, with FSDP or without: DCP reshards each
tensor by name. Only the float rounding of the sums differs; with N = M the run goes on bit for bit.

Reading. Each file is read with its name at hand, so a truncated or missing file is reported by name,
with the previous checkpoint offered. Everything but the weights is loaded with
torch.load(weights_only=True): plain tensors and numbers, no pickled code; DCP's files hold tensors
and their layout only.

Verifying. A truncated file fails to load, but a flipped bit loads fine and trains on (into a loss of
1e28). So trainer_state.json, written last, lists the size and sha256 of every other file, and a resume
checks them all before it loads anything: a damaged file is refused by name. Hashing costs what reading
does (~0.6 s per GB here), once per save and once per resume. Checkpoints written before the list existed
resume unchecked, as they did.

The base model. A LoRA checkpoint holds only the adapter; a full one, every weight but not what it was
trained from. Each records the base's identity (base_identity): its config, and a fingerprint of its
weights as loaded (every tensor's name, shape, dtype and first and last 4 KiB: milliseconds, where hashing
every byte would take seconds). A resume over another base is refused by name, whatever
--ignore_data_order_mismatch says: that flag is about data, and a run over other weights is no longer the
run the checkpoint belongs to.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from minisft.errors import UserError
from minisft.sft.lora import LoraSettings

from .distributed import DataParallel
from .peft_files import ADAPTER_WEIGHTS, PEFT_PREFIX, save_adapter
from .storage import file_checksums, from_examples, sha256_of

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
PARTIAL = ".partial"  # .checkpoint-N.partial: being written
TRASH = ".trash"  # .checkpoint-N.trash: being deleted
SHARDED = "sharded"  # under FSDP: the weights and optimizer state, one file of shards per process (DCP)
# What a failed write raises: plain Python files (torch.save writes through one here) an OSError with its errno,
# safetensors a SafetensorError ("No space left on device (os error 28)"), torch's own writer a RuntimeError.
# DCP gathers every process's failure into one CheckpointException (a BaseException) on all of them.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, dcp.CheckpointException)
READ_ERRORS = (
    OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError, KeyError,
    dcp.CheckpointException,
)  # fmt: skip


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be found, read or written, or does not fit this run."""


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    output_dir: Path, step: int, model, optimizer, schedule, state: dict, lora: LoraSettings | None,
    base_name: str, parallel: DataParallel,
) -> Path:  # fmt: skip
    """Write checkpoint-{step}: every process its random state (and under FSDP its shards), rank 0 the rest.

    All processes succeed, or all raise: under torchrun they check together after each phase (the folder
    made, the files written, the trainer state listing them, the folder renamed into place), so one failing
    never leaves the others waiting.
    """
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}{PARTIAL}"
    writing = [partial]  # the file being written, for the message if it fails (torch.save's own names no file)

    def write(name: str, save) -> None:
        writing[0] = partial / name
        save(writing[0])

    def write_files():
        processes = parallel.processes
        if parallel.sharded:  # every process its own shards, in parallel; first, as every process must enter it
            write(SHARDED, lambda path: dcp.save(sharded_state(model, optimizer, lora), checkpoint_id=path))
        write(rng_file(processes.rank, processes.world_size), lambda path: torch_save(rng_state(), path))
        if not processes.is_main:
            return
        if not parallel.sharded:  # rank 0 holds them whole
            if lora is not None:
                write(ADAPTER_WEIGHTS, lambda path: save_adapter(model, partial, lora, base_name))
            else:  # an ordinary HF folder: from_pretrained can open the checkpoint
                write("model.safetensors", lambda path: model.save_pretrained(partial))
            write("optimizer.pt", lambda path: torch_save(optimizer.state_dict(), path))
        write("scheduler.pt", lambda path: torch_save(schedule.state_dict(), path))

    def write_state():
        # Last, and after every process has written its files (the phase before ends with all of them checking
        # together), so rank 0 lists them all: the shards each process wrote under FSDP too, read back from the
        # shared folder the checkpoint is renamed into.
        def save(path: Path) -> None:
            listed = {**state, "files": file_checksums(partial)}  # taken before this file exists: it lists the others
            path.write_text(json.dumps(listed, indent=2) + "\n", encoding="utf-8")

        write(STATE_FILE, save)

    def commit():
        writing[0] = final
        _commit(partial, final)

    phases = [(lambda: _make_folder(partial), False), (write_files, True), (write_state, False), (commit, False)]
    for work, everyone in phases:
        failure = None
        if everyone or parallel.processes.is_main:
            try:
                work()
            except WRITE_ERRORS as error:
                failure = error
        if parallel.sum([float(failure is not None)])[0]:
            if parallel.processes.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(write_failure(f"checkpoint-{step} ({writing[0]})", failure, output_dir))
    return final


def torch_save(value, path: Path) -> None:
    """torch.save through a Python file: a failed write then raises the OSError with its errno (ENOSPC: a full
    disk), where torch's own writer says only "unexpected pos"."""
    with path.open("wb") as file:
        torch.save(value, file)


def _make_folder(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing this step
    partial.mkdir(parents=True)


def _commit(partial: Path, final: Path) -> None:
    """Rename the written folder into place; an older folder of the same step is moved away first, not deleted."""
    # fsync first: after a power cut the renamed folder must not hold files the disk never received.
    for path in [*partial.rglob("*"), partial]:
        _fsync(path)
    replaced = final.with_name(f".{final.name}{TRASH}")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    partial.rename(final)
    _fsync(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def sharded_state(model, optimizer, lora: LoraSettings | None) -> dict:
    """The model's and the optimizer's state as torch.distributed.checkpoint saves and loads it: keyed by
    parameter name, each tensor this process's shard (a DTensor) under FSDP, or whole in a single process,
    which is what lets DCP load a checkpoint into another number of processes (it reshards by name).
    With LoRA only the trained tensors: the frozen base is the base model's, already on disk."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if lora is not None:
        trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        model_state = {name: tensor for name, tensor in model_state.items() if name in trained}
    return {"model": model_state, "optimizer": optimizer_state}


# What to do about a failed write, by its errno; a full disk (or quota) is told apart: only then is space the answer.
FULL_DISK = {errno.ENOSPC, errno.EDQUOT}
WRITE_ADVICE = {
    errno.EACCES: "Make the folder writable for this user (or choose another --output_dir)",
    errno.EPERM: "Make the folder writable for this user (or choose another --output_dir)",
    errno.EROFS: "That disk is mounted read-only: choose an --output_dir on a writable one",
    errno.ENOTDIR: "A file stands where a folder is needed: move it away (or choose another --output_dir)",
    errno.EISDIR: "A folder stands where a file is needed: move it away (or choose another --output_dir)",
    errno.EEXIST: "Something stands where the checkpoint goes: move it away (or choose another --output_dir)",
    errno.EIO: "The disk reported an I/O error: check it (dmesg) before writing to it again",
}


def write_failure(what: str, error: BaseException | None, output_dir: Path) -> str:
    """One line for a write that failed: why, what was kept, and what to do (room on the disk only if it is full)."""
    if error is None:
        return f"Could not write {what}: another process failed to write its part (see its message)."
    if isinstance(error, dcp.CheckpointException) and error.failures:  # each process's own error, wrapped
        error = next(iter(error.failures.values()))[0]
    number = _errno_of(error)
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        reason += f" ({error.filename})" if error.filename and str(error.filename) not in what else ""
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kept = checkpoints(output_dir)
    previous = f"the last checkpoint, {kept[-1]}, is intact" if kept else "there is no earlier checkpoint"
    if number in FULL_DISK:
        free = shutil.disk_usage(output_dir).free / 2**20 if output_dir.is_dir() else float("nan")
        return (
            f"Could not write {what}: {reason}; {free:,.0f} MiB free on that disk. The run stopped; {previous}. "
            "Free some space, then continue with --resume_from_checkpoint true."
        )
    advice = WRITE_ADVICE.get(number, "Fix the cause")
    return (
        f"Could not write {what}: {reason}. The run stopped; {previous}. {advice}, then continue with "
        "--resume_from_checkpoint true."
    )


def _errno_of(error: BaseException) -> int | None:
    """The OS error behind a failed write: an OSError's own, or the one safetensors names ("(os error 28)")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        text = str(error)
        found = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", text)
        if found:
            return int(found[1] or found[2])
        if "no space left on device" in text.lower():
            return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint: renamed first, so that a kill halfway never leaves a checkpoint-N that looks whole."""
    trash = checkpoint.with_name(f".{checkpoint.name}{TRASH}")
    shutil.rmtree(trash, ignore_errors=True)
    checkpoint.rename(trash)
    shutil.rmtree(trash)


def remove_leftovers(output_dir: Path) -> None:
    """The partial and half-deleted folders that runs killed while saving or pruning left behind."""
    for leftover in output_dir.glob(f".{PREFIX}*"):
        if leftover.name.endswith((PARTIAL, TRASH)):
            shutil.rmtree(leftover, ignore_errors=True)


def prune(output_dir: Path, keep: int | None, current: Path, best: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond `keep`; None or ≤ 0 keeps all, as in transformers. Never `current`, nor
    `best` (--load_best_model_at_end's): with keep 1 both stay, as transformers keeps the best plus the newest."""
    if keep is None or keep <= 0:
        return
    kept = {current, best} - {None}
    others = [path for path in checkpoints(output_dir) if path not in kept]
    for old in others[: max(len(others) - (keep - len(kept)), 0)]:
        _remove(old)


def rng_file(rank: int, world_size: int) -> str:
    return "rng_state.pt" if world_size == 1 else f"rng_state_{rank}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- finding and checking


def checkpoints(output_dir: Path) -> list[Path]:
    """The finished checkpoints of output_dir, oldest first."""
    found = [path for path in output_dir.glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", path.name)]
    return sorted(found, key=lambda path: int(path.name[len(PREFIX) :]))


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() == "false":
        return None
    if resume_from_checkpoint.lower() == "true":
        found = checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint true: no checkpoint-N folder in {output_dir}.")
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path}: no such folder.")
    return path


def data_fingerprint(units: Sequence[dict]) -> str:
    """The tokenized training data in a few characters: its size and a hash of every unit's ids and labels.

    Prepared examples and packed rows hash their arrays (storage.py, pack_plans.py): a second or so for
    200M tokens, with no unit built as a list. Units given as lists are first laid out the same way.
    """
    hashed = units if hasattr(units, "fingerprint") else from_examples(units)
    return f"{len(units)} units, sha256 {hashed.fingerprint()[:16]}"


def read_trainer_state(directory: Path) -> dict:
    """The checkpoint's trainer state, its fields checked, once every file it lists is verified (verify_files)."""
    with reading(directory / STATE_FILE) as path:
        state = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(_damaged(directory, f"{STATE_FILE} holds no step (it is not a trainer state)"))
    for name, (meaning, valid) in STATE_FIELDS.items():
        if name in state and not valid(state[name]):
            shown = json.dumps(state[name])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise CheckpointError(
                _damaged(directory, f"its {STATE_FILE} has {name} {shown}, where {meaning} belongs (edited by hand?)")
            )
    verify_files(directory, state.get("files", {}))  # absent from checkpoints written before it was recorded
    return state


def _whole(value, least: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def _number(value, least: float | None = 0) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (least is None or value >= least)
    )  # fmt: skip


def _base_record(value) -> bool:
    """{} (a Run built without a base, as a benchmark may), or base_identity's fields."""
    return isinstance(value, dict) and (
        not value
        or isinstance(value.get("config"), dict)
        and all(isinstance(value.get(key), str) for key in BASE_TEXT_FIELDS)
    )


def _listed_files(files) -> bool:
    return isinstance(files, dict) and all(
        isinstance(entry, dict) and _whole(entry.get("bytes"), 0) and isinstance(entry.get("sha256"), str)
        and not Path(name).is_absolute() and ".." not in Path(name).parts  # inside the checkpoint
        for name, entry in files.items()
    )  # fmt: skip


# The trainer state's fields (only step is required: the others are absent from older checkpoints): what each
# must be, as the message says it, and its test. A resume computes with them, so a hand-edited "3" or a list
# where an object belongs must stop here, by name, rather than as a traceback steps later.
STATE_FIELDS = {
    "step": ("a whole number ≥ 0", lambda value: _whole(value, 0)),
    "epoch": ("a number ≥ 0", _number),
    "seed": ("a whole number", _whole),
    "world_size": ("a whole number ≥ 1", lambda value: _whole(value, 1)),
    "num_tokens": ("a whole number ≥ 0", lambda value: _whole(value, 0)),
    "data_order": (
        "an object with a whole global_batch_size ≥ 1",
        lambda value: isinstance(value, dict) and _whole(value.get("global_batch_size", 1), 1),
    ),
    "files": ('an object of {"name": {"bytes", "sha256"}} inside the checkpoint', _listed_files),
    "base_model": ("an object with config, weights_sha256 and model_name_or_path", _base_record),
    # --load_best_model_at_end's (machinery/best_checkpoint.py): None before the first evaluation
    "best_metric": ("a number, or null", lambda value: value is None or _number(value, least=None)),
    "best_global_step": ("a whole number ≥ 1, or null", lambda value: value is None or _whole(value, 1)),
    "metric_for_best_model": ("a metric's name", lambda value: isinstance(value, str)),
    "greater_is_better": ("true or false", lambda value: isinstance(value, bool)),
    "early_stopping_patience_counter": ("a whole number ≥ 0", lambda value: _whole(value, 0)),
}


def verify_files(directory: Path, files: dict[str, dict]) -> None:
    """Every file the checkpoint listed is there, of the size and sha256 it was written with.

    Each process checks them all, before any is loaded: under torchrun they then refuse together, with the
    same line, rather than one process stopping while the others wait for it. The price is a read of the
    checkpoint per process (the page cache shares it between the processes of one machine).
    """
    for name, written in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(_damaged(directory, f"it has no {name}, which was written with it"))
        size = path.stat().st_size
        if size < written["bytes"]:
            what = f"{name} is truncated or unreadable ({size:,} bytes of the {written['bytes']:,} written)"
            raise CheckpointError(_damaged(directory, what))
        if size > written["bytes"]:
            raise CheckpointError(
                _damaged(directory, f"{name} is {size:,} bytes, and was written with {written['bytes']:,}")
            )
        if sha256_of(path) != written["sha256"]:
            raise CheckpointError(
                _damaged(
                    directory,
                    f"{name} is not the file that was written: its sha256 differs from the one {STATE_FILE} recorded "
                    "(changed on the disk, or in a copy)",
                )
            )


def batch_for_processes(
    directory: Path, state: dict, batch_size: int, accumulation: int, world_size: int
) -> tuple[int, int, str | None]:
    """The per-process batch and accumulation that keep the checkpoint's global batch on `world_size` processes.

    A step covers the same units of the epoch's order whatever the split of its global batch
    (processes × per-process batch × accumulation), so a checkpoint continues exactly on another number of
    processes if the global batch stays (the sums differ only in float rounding). The flags given are kept
    if they keep it; else the per-process batch is kept and the accumulation re-derived, or the other way.
    Returns (batch, accumulation, what was re-derived or None).
    """
    saved_by = state.get("world_size", 1)
    if saved_by == world_size:
        return batch_size, accumulation, None  # any change is the data order's to refuse (check_resume)
    global_batch = state.get("data_order", {}).get("global_batch_size")
    if global_batch is None:  # written before minisft could resume on another number of processes
        raise CheckpointError(
            f"{directory} was saved by {saved_by} processes; resume it with as many "
            f"(torchrun --nproc_per_node {saved_by}), not {world_size}."
        )
    for batch, steps in [(batch_size, accumulation), (batch_size, None), (None, accumulation)]:
        batch = batch or global_batch // (world_size * steps)
        steps = steps or global_batch // (world_size * batch)
        if batch >= 1 and steps >= 1 and world_size * batch * steps == global_batch:
            note = (
                f"resuming on {world_size} processes a checkpoint of {saved_by}: --per_device_train_batch_size "
                f"{batch} × --gradient_accumulation_steps {steps} keeps its global batch of {global_batch}"
                + ("" if (batch, steps) == (batch_size, accumulation) else f" (given: {batch_size} × {accumulation})")
            )
            return batch, steps, note
    raise CheckpointError(
        f"{directory} was saved by {saved_by} processes with a global batch of {global_batch}, which "
        f"{world_size} processes cannot split: pass --per_device_train_batch_size and "
        f"--gradient_accumulation_steps whose product × {world_size} is {global_batch}."
    )


def check_resume(directory: Path, state: dict, data_order: dict, ignore_mismatch: bool) -> list[str]:
    """Whether this run continues the checkpoint's: the data-order changes that --ignore_data_order_mismatch
    allowed (refused without it)."""
    saved = state.get("data_order", {})  # absent from checkpoints older than this check
    changes = [
        _change(name, saved[name], value)
        for name, value in data_order.items()
        if name in saved and saved[name] != value
    ]
    if changes and not ignore_mismatch:
        raise CheckpointError(
            f"{directory} cannot be resumed exactly: {'; '.join(changes)}. The examples of each step depend on "
            "these: resume with the checkpoint's values, or pass --ignore_data_order_mismatch to go on with the "
            "new ones (the rest of the run then differs from the one the checkpoint came from)."
        )
    return changes


def _change(name: str, saved, now) -> str:
    if name == "global_batch_size":
        return (
            f"the global batch (processes × --per_device_train_batch_size × --gradient_accumulation_steps) was "
            f"{saved} there and is {now} here"
        )
    if name == "train_data":
        return (
            f"the tokenized training data was {saved} there and is {now} here (another dataset or file content, "
            "split, chat template or masking flag)"
        )
    return f"--{name} was {_flag_text(saved)} there and is {_flag_text(now)} here"


def _flag_text(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------- the base model

# Config keys that say how a model was loaded or saved, not what it is: left out of its identity.
LOAD_CONFIG_KEYS = {
    "transformers_version", "dtype", "torch_dtype", "quantization_config", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states",
}  # fmt: skip
BASE_TEXT_FIELDS = ("model_name_or_path", "config_sha256", "weights_sha256", "dtypes")
SAMPLE_BYTES = 4096  # of each end of every tensor, for the weights' fingerprint


def base_identity(model, name_or_path: str) -> dict:
    """What a run trains from, recorded in its checkpoints: the base as loaded (before LoRA, before any resizing).

    Its config without the keys of loading (above) and the private ones (_name_or_path...), and a fingerprint of
    its weights: every tensor's name, shape and dtype, and its first and last SAMPLE_BYTES bytes. Another model
    differs everywhere, a fine-tuned one in every tensor, another --dtype or a 4-bit load in every dtype: a sample
    tells them apart for milliseconds, where hashing every byte would take seconds. The dtypes are kept aside too,
    so that a base loaded another way is told from another base.
    """
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if not key.startswith("_") and key not in LOAD_CONFIG_KEYS
    }
    config = json.loads(json.dumps(config, sort_keys=True, default=str))  # as the trainer state will hold it
    weights, dtypes = hashlib.sha256(), set()
    for name, parameter in model.named_parameters():
        data = parameter.detach().contiguous().reshape(-1).view(torch.uint8)  # 4-bit codes are uint8 already
        if data.numel() > 2 * SAMPLE_BYTES:
            data = torch.cat([data[:SAMPLE_BYTES], data[-SAMPLE_BYTES:]])
        weights.update(f"{name} {tuple(parameter.shape)} {parameter.dtype}\n".encode())
        weights.update(data.cpu().numpy().tobytes())
        dtypes.add(str(parameter.dtype).removeprefix("torch."))
    return {
        "model_name_or_path": name_or_path,
        "config_sha256": _sha256_text(json.dumps(config, sort_keys=True)),
        "weights_sha256": weights.hexdigest()[:16],
        "dtypes": ", ".join(sorted(dtypes)),
        "config": config,
    }


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_base_model(directory: Path | None, state: dict, base: dict) -> None:
    """Refuse a resume over another base model than the checkpoint's: other weights, another config, or the same
    model loaded otherwise (--dtype, --load_in_4bit). Checkpoints from before this record pass unchecked."""
    saved = state.get("base_model")
    if directory is None or not saved:
        return
    # Keys in one config only are another transformers version's additions or renames, not another model.
    then_config, now_config = saved["config"], base["config"]
    fields = sorted(key for key in then_config.keys() & now_config.keys() if then_config[key] != now_config[key])
    differences = []
    if fields:
        shown = ", ".join(f"{key} {then_config[key]} there, {now_config[key]} here" for key in fields[:3])
        differences.append(f"whose config differs ({shown}{', ...' if len(fields) > 3 else ''})")
    loaded_otherwise = saved["dtypes"] != base["dtypes"]  # then every weight differs: say why instead
    if loaded_otherwise:
        differences.append(f"loaded as {base['dtypes']} where the checkpoint's base was {saved['dtypes']}")
    elif saved["weights_sha256"] != base["weights_sha256"]:
        differences.append("whose weights differ")
    if not differences:
        return
    then, now = saved["model_name_or_path"], base["model_name_or_path"]
    flags = "the --dtype and --load_in_4bit it was trained with"
    if then != now:
        remedy = f"resume with --model_name_or_path {shlex.quote(then)}" + (f" and {flags}" if loaded_otherwise else "")
    elif loaded_otherwise:
        remedy = f"resume with {flags}"
    else:
        remedy = f"{then} has changed since: resume over the model it was then, or start a new run"
    raise CheckpointError(
        f"{directory} was trained from {then} (config {saved['config_sha256']}, weights {saved['weights_sha256']}); "
        f"this run loads {now} (config {base['config_sha256']}, weights {base['weights_sha256']}), "
        f"{' and '.join(differences)}: {remedy}."
    )


# ----------------------------------------------------------------------------- reading


def load_checkpoint(
    directory: Path, model, optimizer, schedule, lora: LoraSettings | None, parallel: DataParallel, saved_by: int
) -> None:
    """Restore the weights, optimizer, schedule and random state (check_resume has read the trainer state).

    A checkpoint saved under FSDP (its `sharded` folder) loads into any number of processes, with FSDP or
    without: DCP reshards. One saved without FSDP holds the whole model and loads into DDP or one process.
    `saved_by` processes wrote it; process r takes the random state of process r mod saved_by.
    """
    if (directory / SHARDED).is_dir():
        with reading(directory / SHARDED / ".metadata") as path, warnings.catch_warnings():
            # One process loading a sharded checkpoint is meant: DCP's warning that it assumed so is not news.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            check_metadata(path)
            state = sharded_state(model, optimizer, lora)
            dcp.load(state, checkpoint_id=path.parent, planner=WeightsOnlyPlanner())
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=lora is None),
        )  # fmt: skip
    elif parallel.sharded:
        raise CheckpointError(
            f"{directory} was saved without --fsdp (it holds the whole model): resume it without --fsdp, "
            "with any number of processes."
        )
    else:
        load_whole(directory, model, optimizer, lora)
    with reading(directory / "scheduler.pt") as path:
        schedule.load_state_dict(torch.load(path, weights_only=True))
    rank = parallel.processes.rank % saved_by
    with reading(directory / rng_file(rank, saved_by)) as path:
        restore_rng_state(torch.load(path, weights_only=True))


# What DCP's .metadata may name: its own layout classes, torch's sizes, dtypes and layouts, and a path.
METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": None,  # any of its classes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in METADATA_CLASSES and (METADATA_CLASSES[module] is None or name in METADATA_CLASSES[module]):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata never holds")


def check_metadata(path: Path) -> None:
    """DCP reads its .metadata with a plain pickle.load, which would run any code the file names. Unpickled
    here first with only DCP's own classes allowed, the same bytes can then only build those."""
    with path.open("rb") as file:
        MetadataUnpickler(file).load()


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's loader, with the non-tensor values (the optimizer's lr, betas...) read by torch.load(weights_only=True)
    first: DCP itself reads them with weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything but tensors and plain values
        value.seek(0)
        super().load_bytes(read_item, value)


def load_whole(directory: Path, model, optimizer, lora: LoraSettings | None) -> None:
    """The weights (or adapter) and the optimizer of a checkpoint written without FSDP."""
    _load_weights_file(directory, model, lora)
    with reading(directory / "optimizer.pt") as path:
        optimizer.load_state_dict(torch.load(path, weights_only=True))


def load_weights(directory: Path, model, lora: LoraSettings | None) -> None:
    """Only the weights (or adapter) of a checkpoint written without FSDP, checked first against the size and sha256
    its trainer state lists (the other files need not be read): --load_best_model_at_end's load at the end."""
    name = ADAPTER_WEIGHTS if lora is not None else "model.safetensors"
    with reading(directory / STATE_FILE) as path:
        listed = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    verify_files(directory, {name: listed[name]} if name in listed else {})
    _load_weights_file(directory, model, lora)


def _load_weights_file(directory: Path, model, lora: LoraSettings | None) -> None:
    with reading(directory / (ADAPTER_WEIGHTS if lora is not None else "model.safetensors")) as path:
        saved = load_file(path)
    if lora is not None:
        # peft's key for a trained tensor is its parameter name behind base_model.model. (peft_files.py).
        saved = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in saved.items()}
    _copy_into(model, saved, path)


@contextmanager
def reading(path: Path):
    """Read a checkpoint file; if it is missing or damaged, say which, and offer the checkpoint before."""
    try:
        yield path
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} is damaged, or not a minisft checkpoint: it has no {path.name}.{_earlier(path.parent)}"
        ) from None
    except READ_ERRORS as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise CheckpointError(_damaged(path.parent, f"{path.name} is truncated or unreadable ({reason})")) from None


def _damaged(directory: Path, what: str) -> str:
    return f"{directory} is damaged: {what}.{_earlier(directory)}"


def _earlier(directory: Path) -> str:
    """The checkpoint before `directory` in its folder, offered as the one to resume from instead."""
    number = re.fullmatch(rf"{PREFIX}(\d+)", directory.name)
    if number is None:
        return ""
    before = [path for path in checkpoints(directory.parent) if int(path.name[len(PREFIX) :]) < int(number[1])]
    return (
        f" Resume from the checkpoint before it with --resume_from_checkpoint {shlex.quote(str(before[-1]))}."
        if before
        else ""
    )


def _copy_into(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy saved tensors into the trainable parameters of the same name; every one must be there, in its shape."""
    parameters = dict(model.named_parameters(remove_duplicate=False))  # a tied head under both of its names
    covered = {id(parameters[name]) for name in tensors if name in parameters}
    missing = [
        name for name, parameter in model.named_parameters() if parameter.requires_grad and id(parameter) not in covered
    ]
    if missing:
        raise CheckpointError(f"{path} does not fit this model: it lacks {missing[:3]}.")
    for name, tensor in tensors.items():
        # copy_ would broadcast a (1, n) tensor over an (r, n) parameter without a word.
        if name in parameters and parameters[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path} does not fit this model: {name} is {tuple(tensor.shape)} there and "
                f"{tuple(parameters[name].shape)} here (another --lora_r, or another model?)."
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in parameters:
                parameters[name].copy_(tensor)
