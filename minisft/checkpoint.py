"""Checkpoints: everything needed to continue a run exactly where it stopped, and never half of it.

    output_dir/checkpoint-40/
        model.safetensors + config.json    the weights (or adapter_model.safetensors + adapter_config.json with LoRA)
        optimizer.pt                       AdamW's running averages m and v
        scheduler.pt                       where the learning-rate schedule is
        rng_state.pt                       the random generators (dropout, shuffling); under torchrun
                                           one rng_state_{rank}.pt per process
        trainer_state.json                 the step, epoch and tokens so far, and what the data order depends on

Writing. A checkpoint is written to .checkpoint-40.partial, flushed to the disk (fsync), and renamed
into place. A rename is atomic, so a process killed at any moment (SIGKILL, or the machine losing
power) leaves each checkpoint-N folder whole or absent. An old checkpoint is renamed away before it is
deleted, for the same reason. A write that fails (a full disk) removes its partial folder and stops
the run with one line; the checkpoints before it stay as they were.

Resuming. The examples a step sees are a function of the seed, the step, and the settings that cut the
data into steps (minisft/loop.py). The checkpoint stores those settings and a fingerprint of the
tokenized training data, and a resume that would change them is refused by name: it would no longer
continue the same run. --ignore_data_order_mismatch lets a user who means it go on anyway.

Reading. Each file is read with its name at hand, so a truncated or missing file is reported by name,
with the previous checkpoint offered. Everything but the weights is loaded with
torch.load(weights_only=True): plain tensors and numbers, no pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .distributed import Processes, device_of, sum_across
from .errors import UserError
from .lora import ADAPTER_WEIGHTS, PEFT_PREFIX, LoraSettings, save_adapter
from .storage import from_examples

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
PARTIAL = ".partial"  # .checkpoint-N.partial: being written
TRASH = ".trash"  # .checkpoint-N.trash: being deleted
# What a failed write raises: torch.save reports a full disk as a RuntimeError ("unexpected pos"), safetensors
# as a SafetensorError ("No space left on device"), plain Python files as an OSError (errno ENOSPC).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError, KeyError)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be found, read or written, or does not fit this run."""


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer,
    schedule,
    state: dict,
    lora: LoraSettings | None,
    base_name: str,
    processes: Processes = Processes(),
) -> Path:
    """Write checkpoint-{step}: every process its random state, rank 0 the rest. All succeed, or all raise."""
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}{PARTIAL}"
    writing = partial  # what is being written, for the message if it fails (torch.save's own names no file)

    def make_folder():
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing this step
        partial.mkdir(parents=True)

    def write(name: str, save) -> None:
        nonlocal writing
        writing = partial / name
        save(writing)

    def write_files():
        write(rng_file(processes), lambda path: torch.save(rng_state(), path))  # dropout and shuffling generators
        if not processes.is_main:
            return
        if lora is not None:
            write(ADAPTER_WEIGHTS, lambda path: save_adapter(model, partial, lora, base_name))
        else:  # an ordinary HF folder: from_pretrained can open any checkpoint
            write("model.safetensors", lambda path: model.save_pretrained(partial))
        write("optimizer.pt", lambda path: torch.save(optimizer.state_dict(), path))
        write("scheduler.pt", lambda path: torch.save(schedule.state_dict(), path))
        write(STATE_FILE, lambda path: path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8"))

    def commit():
        nonlocal writing
        writing = final
        # fsync first: after a power cut the renamed folder must not hold files the disk never received.
        for path in partial.iterdir():
            _fsync(path)
        _fsync(partial)
        replaced = output_dir / f".{final.name}{TRASH}"
        if final.exists():  # an older run's checkpoint of this step: moved away, not deleted in place
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        partial.rename(final)
        _fsync(output_dir)
        shutil.rmtree(replaced, ignore_errors=True)

    # Under torchrun the processes check together after each phase, so one failing never leaves the others waiting.
    for work, everyone in ((make_folder, False), (write_files, True), (commit, False)):
        failure = None
        if everyone or processes.is_main:
            try:
                work()
            except WRITE_ERRORS as error:
                failure = error
        if sum_across(processes, [float(failure is not None)], device_of(processes))[0]:
            if processes.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(write_failure(f"checkpoint-{step} ({writing})", failure, output_dir))
    return final


def write_failure(what: str, error: Exception | None, output_dir: Path) -> str:
    """One line for a write that failed: why, how much room the disk has left, and what was kept."""
    if error is None:
        return f"Could not write {what}: another process failed to write its part (see its message)."
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        reason += f" ({error.filename})" if error.filename and str(error.filename) not in what else ""
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    free = shutil.disk_usage(output_dir).free / 2**20 if output_dir.is_dir() else float("nan")
    kept = checkpoints(output_dir)
    previous = f"the last checkpoint, {kept[-1]}, is intact" if kept else "there is no earlier checkpoint"
    return (
        f"Could not write {what}: {reason}; {free:,.0f} MiB free on that disk. The run stopped; {previous}. "
        "Free some space, then continue with --resume_from_checkpoint true."
    )


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


def prune(output_dir: Path, keep: int | None, current: Path) -> None:
    """Delete the oldest checkpoints beyond `keep`; None or ≤ 0 keeps all, as in transformers. Never `current`."""
    if keep is None or keep <= 0:
        return
    others = [path for path in checkpoints(output_dir) if path != current]
    for old in others[: max(len(others) - (keep - 1), 0)]:
        _remove(old)


def rng_file(processes: Processes) -> str:
    return "rng_state.pt" if not processes.distributed else f"rng_state_{processes.rank}.pt"


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

    Prepared examples and packed rows hash their arrays (storage.py, packing.py): a second or so for
    200M tokens, with no unit built as a list. Units given as lists are first laid out the same way.
    """
    hashed = units if hasattr(units, "fingerprint") else from_examples(units)
    return f"{len(units)} units, sha256 {hashed.fingerprint()[:16]}"


def check_resume(
    directory: Path, processes: Processes, data_order: dict, ignore_mismatch: bool
) -> tuple[dict, list[str]]:
    """The checkpoint's trainer state, once it is known that this run can continue it.

    Returns the state and the data-order changes the user allowed with --ignore_data_order_mismatch.
    """
    with reading(directory / STATE_FILE) as path:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("it holds no step")
    saved_by = state.get("world_size", 1)
    if saved_by != processes.world_size:
        raise CheckpointError(
            f"{directory} was saved by {saved_by} processes; resume it with as many "
            f"(torchrun --nproc_per_node {saved_by}), not {processes.world_size}: the data order and the "
            "random states are per process."
        )
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
    return state, changes


def _change(name: str, saved, now) -> str:
    if name == "train_data":
        return (
            f"the tokenized training data was {saved} there and is {now} here (another dataset or file content, "
            "split, chat template or masking flag)"
        )
    return f"--{name} was {_flag_text(saved)} there and is {_flag_text(now)} here"


def _flag_text(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------- reading


def load_checkpoint(
    directory: Path, model, optimizer, schedule, lora: LoraSettings | None, processes: Processes = Processes()
) -> None:
    """Restore the weights, optimizer, schedule and random state (check_resume has read the trainer state)."""
    with reading(directory / (ADAPTER_WEIGHTS if lora is not None else "model.safetensors")) as path:
        saved = load_file(path)
    if lora is not None:
        # peft's key for a trained tensor is its parameter name behind base_model.model. (minisft/lora.py).
        saved = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in saved.items()}
    _copy_into(model, saved, path)
    with reading(directory / "optimizer.pt") as path:
        optimizer.load_state_dict(torch.load(path, weights_only=True))
    with reading(directory / "scheduler.pt") as path:
        schedule.load_state_dict(torch.load(path, weights_only=True))
    with reading(directory / rng_file(processes)) as path:
        restore_rng_state(torch.load(path, weights_only=True))


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
        raise CheckpointError(
            f"{path.parent} is damaged: {path.name} is truncated or unreadable ({reason}).{_earlier(path.parent)}"
        ) from None


def _earlier(directory: Path) -> str:
    """The checkpoint before `directory` in its folder, offered as the one to resume from instead."""
    number = re.fullmatch(rf"{PREFIX}(\d+)", directory.name)
    if number is None:
        return ""
    before = [path for path in checkpoints(directory.parent) if int(path.name[len(PREFIX) :]) < int(number[1])]
    return f" Resume from the checkpoint before it with --resume_from_checkpoint {before[-1]}." if before else ""


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
