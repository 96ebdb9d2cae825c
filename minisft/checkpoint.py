"""Checkpoints: everything needed to continue a run exactly where it stopped.

    output_dir/checkpoint-40/
        model.safetensors + config.json    the weights (or adapter_model.safetensors + adapter_config.json with LoRA)
        optimizer.pt                       AdamW's running averages m and v
        scheduler.pt                       where the learning-rate schedule is
        rng_state.pt                       the random generators (dropout, shuffling); under torchrun
                                           one rng_state_{rank}.pt per process
        trainer_state.json                 the step, epoch and data position

A checkpoint is written to a temporary folder and renamed into place, so a run killed while
saving never leaves a half-written checkpoint that a resume would trust. Everything but the
weights is loaded with torch.load(weights_only=True): plain tensors and numbers, no pickled code.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .distributed import Processes, barrier
from .errors import UserError
from .lora import ADAPTER_WEIGHTS, LoraSettings, adapter_state_dict, save_adapter

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be found or does not fit this run."""


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
    """Write checkpoint-{step}; under torchrun rank 0 writes it all but the other ranks' random states."""
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}.partial"
    if processes.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(processes)
    torch.save(rng_state(), partial / rng_file(processes))  # each process's dropout and shuffling generators
    barrier(processes)
    if not processes.is_main:
        barrier(processes)  # wait until rank 0 has renamed the folder into place
        return final
    if lora is not None:
        save_adapter(model, partial, lora, base_name)
    else:
        model.save_pretrained(partial)  # an ordinary HF folder: from_pretrained can open any checkpoint
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(schedule.state_dict(), partial / "scheduler.pt")
    (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    barrier(processes)
    return final


def rng_file(processes: Processes) -> str:
    return "rng_state.pt" if not processes.distributed else f"rng_state_{processes.rank}.pt"


def load_checkpoint(
    directory: Path, model, optimizer, schedule, lora: LoraSettings | None, processes: Processes = Processes()
) -> dict:
    """Restore the weights, optimizer, schedule and random state; return the trainer state."""
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"{directory} is not a minisft checkpoint: it has no {STATE_FILE}.")
    state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    saved_by = state.get("world_size", 1)
    if saved_by != processes.world_size:
        raise CheckpointError(
            f"{directory} was saved by {saved_by} processes; resume it with as many "
            f"(torchrun --nproc_per_node {saved_by}), not {processes.world_size}: the data order and the "
            "random states are per process."
        )
    if lora is not None:
        saved = load_file(directory / ADAPTER_WEIGHTS)
        names = {key: name for key, name in zip(adapter_state_dict(model, lora), _trainable_names(model))}
        _copy_into(model, {names[key]: tensor for key, tensor in saved.items() if key in names}, directory)
    else:
        _copy_into(model, load_file(directory / "model.safetensors"), directory)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    schedule.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    restore_rng_state(torch.load(directory / rng_file(processes), weights_only=True))
    return state


def _trainable_names(model) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def _copy_into(model, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if parameters[name].requires_grad and name not in tensors]
    if missing:
        raise CheckpointError(f"{directory} does not fit this model: it lacks {missing[:3]}.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in parameters:
                parameters[name].copy_(tensor)


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


def prune(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in checkpoints(output_dir)[: -keep or None]:
        shutil.rmtree(old)
