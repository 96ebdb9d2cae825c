"""Checkpoints that survive preemption, mistakes and odd settings: each test breaks a run one way, then resumes it.

Every resumed run is compared with an uninterrupted one, bit for bit (torch.equal): it does the same float
operations in the same order, so any difference is a resume that did not continue the same run.
"""

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file

import minisft.machinery.checkpoint
import minisft.sft.step
from minisft.machinery.checkpoint import CheckpointError, prune
from minisft.machinery.cli import run
from minisft.machinery.config import LoraConfig, PackingConfig
from minisft.machinery.loop import train
from minisft.machinery.stopping import STOPPED_EXIT_CODE
from minisft.train import main

from .tiny_runs import data_file_of, metrics, run_config

FLAGS = dict(max_steps=5, per_device_train_batch_size=4)  # 10 examples: a new shuffle every 2.5 steps


def same_weights(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    first, second = load_file(a / name), load_file(b / name)
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def same_metrics(a: Path, b: Path) -> bool:
    """The logged figures of every step, once each (tokens_per_second and memory are timings, left out)."""
    fields = ("step", "loss", "grad_norm", "learning_rate", "num_tokens")
    return [[record[field] for field in fields] for record in metrics(a)] == [
        [record[field] for field in fields] for record in metrics(b)
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_config(tiny_dir, output_dir, **FLAGS))
    return output_dir


def words_of(text: str) -> str:
    """The console's output with its line wrapping undone."""
    return " ".join(text.split())


def cli_flags(tiny_dir, output_dir, **flags) -> list[str]:
    values = {"max_steps": 5, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1}
    values |= {"max_length": 256, "save_steps": 0, **flags}
    common = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir)), "--output_dir"]
    return common + [str(output_dir)] + [item for name, value in values.items() for item in (f"--{name}", str(value))]


# ----------------------------------------------------------------------------- --save_total_limit


def test_save_total_limit_zero_keeps_every_checkpoint(tiny_dir, tmp_path):
    """0 means no limit, as in transformers; it used to delete each checkpoint right after writing it."""
    train(run_config(tiny_dir, tmp_path, max_steps=3, per_device_train_batch_size=4, save_steps=1, save_total_limit=0))
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Resumed from checkpoint-4 with an older run's checkpoint-9 still there: the new checkpoint-5 stays."""
    for step in (3, 4, 5, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    prune(tmp_path, 2, current=tmp_path / "checkpoint-5")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-9"]


# ----------------------------------------------------------------------------- LoRA with modules_to_save


@pytest.mark.parametrize("lora_r", [4, 1])
def test_lora_with_modules_to_save_resumes_exactly(tiny_dir, tmp_path, lora_r):
    """The saved tensors go back into the parameters of the same name. Paired by position (embed_tokens is first
    among the parameters, last among the saved tensors) they crashed at either rank, and at r 1 first broadcast a
    1 × 64 lora_A over the whole 49152 × 64 embedding without a word."""
    lora = LoraConfig(use_peft=True, lora_r=lora_r, lora_dropout=0.1, lora_modules_to_save=["embed_tokens"])
    flags = dict(FLAGS, save_steps=2)
    train(run_config(tiny_dir, tmp_path / "whole", lora=lora, **flags))
    resume = str(tmp_path / "whole" / "checkpoint-2")
    train(run_config(tiny_dir, tmp_path / "parts", lora=lora, resume_from_checkpoint=resume, **flags))
    assert same_weights(tmp_path / "whole", tmp_path / "parts", "adapter_model.safetensors")

    if lora_r == 1:  # resumed with a wider rank, a (1, 64) lora_A would broadcast over the (4, 64) one: refused
        lora.lora_r = 4
        with pytest.raises(CheckpointError, match=r"lora_A.weight is \(1, 64\) there and \(4, 64\) here"):
            train(run_config(tiny_dir, tmp_path / "wider", lora=lora, resume_from_checkpoint=resume, **flags))


# ----------------------------------------------------------------------------- signals


def signal_during_step(monkeypatch, step: int, signals: list[signal.Signals]):
    """Send these signals to this very process from inside the forward pass of `step` (1-based)."""
    original = minisft.sft.step.model_losses
    calls = {"count": 0}

    def forward(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:  # one micro-batch per step in these runs
            # Without a handler the first signal would end pytest itself: fail instead.
            assert all(signal.getsignal(number) is not signal.SIG_DFL for number in signals), "no handler installed"
            for number in signals:
                os.kill(os.getpid(), number)  # Python runs the handler before the next bytecode
        return original(*args, **kwargs)

    monkeypatch.setattr(minisft.sft.step, "model_losses", forward)


@pytest.mark.parametrize(
    "signals, stopped_after",
    [
        ([signal.SIGTERM], 3),  # the step under way is finished, then saved
        # SLURM's warning ahead of time, then its SIGTERM twice (once from torchrun, which forwards it): one stop
        ([signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM], 3),
        ([signal.SIGINT], 3),  # Ctrl-C
        ([signal.SIGINT, signal.SIGINT], 2),  # Ctrl-C twice: the step under way is abandoned
    ],
    ids=["sigterm", "sigusr1-then-sigterm-twice", "ctrl-c", "ctrl-c-twice"],
)
def test_a_signal_saves_exits_75_and_resumes_exactly(
    tiny_dir,
    tmp_path,
    monkeypatch,
    capsys,
    uninterrupted,
    signals,
    stopped_after,
):
    flags = cli_flags(tiny_dir, tmp_path, save_steps=10000)  # no checkpoint would come before the end
    with monkeypatch.context() as patch:
        signal_during_step(patch, 3, signals)
        with pytest.raises(SystemExit) as exit_info:
            main(flags)
    assert exit_info.value.code == STOPPED_EXIT_CODE
    assert f"stopped after step {stopped_after}, saved in" in words_of(capsys.readouterr().err)
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == [f"checkpoint-{stopped_after}"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # train() gave the handlers back

    main(flags + ["--resume_from_checkpoint", "true"])
    assert same_weights(tmp_path, uninterrupted) and same_metrics(tmp_path, uninterrupted)


# ----------------------------------------------------------------------------- what a resume must match


@pytest.fixture(scope="module")
def saved_run(tiny_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("saved")
    train(run_config(tiny_dir, output_dir, **dict(FLAGS, max_steps=3, save_steps=1)))
    return output_dir


def copy_of(saved_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


GLOBAL_BATCH = (
    "the global batch (processes × --per_device_train_batch_size × --gradient_accumulation_steps) was 4 there and is "
)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(training={"per_device_train_batch_size": 2}), GLOBAL_BATCH + "2 here"),
        (dict(training={"gradient_accumulation_steps": 2}), GLOBAL_BATCH + "8 here"),
        (dict(data={"max_length": 16}), "--max_length was 256 there and is 16 here"),
        (dict(training={"seed": 1}), "--seed was 42 there and is 1 here"),
        (dict(packing=True), "--packing was false there and is true here"),
        (dict(dataset=True), "the tokenized training data was 10 units, sha256"),
    ],
    ids=["batch", "accumulation", "max_length", "seed", "packing", "dataset"],
)
def test_a_resume_that_would_change_the_data_order_is_refused(
    tiny_dir,
    tmp_path,
    saved_run,
    change,
    message,
):
    output_dir = copy_of(saved_run, tmp_path)
    config = run_config(tiny_dir, output_dir, **dict(FLAGS, resume_from_checkpoint="true", save_steps=1))
    for name, value in change.get("training", {}).items():
        setattr(config.training, name, value)
    for name, value in change.get("data", {}).items():
        setattr(config.data, name, value)
    if change.get("packing"):
        config.packing = PackingConfig(packing=True)
    if change.get("dataset"):  # the same file name, one example less
        edited = tmp_path / "train.jsonl"
        edited.write_text("".join(data_file_of(tiny_dir).read_text().splitlines(keepends=True)[1:]))
        config.data.dataset_name = str(edited)
    with pytest.raises(CheckpointError, match="cannot be resumed exactly") as error:
        train(config)
    assert message in str(error.value) and "--ignore_data_order_mismatch" in str(error.value)


def test_ignore_data_order_mismatch_goes_on_from_the_checkpoint(tiny_dir, tmp_path, saved_run, capsys):
    output_dir = copy_of(saved_run, tmp_path)
    flags = dict(FLAGS, per_device_train_batch_size=2, resume_from_checkpoint="true", ignore_data_order_mismatch=True)
    result = train(run_config(tiny_dir, output_dir, **flags))
    assert result.steps == FLAGS["max_steps"] and [record["step"] for record in metrics(output_dir)] == [1, 2, 3, 4, 5]
    assert "resuming although " + GLOBAL_BATCH + "2 here" in words_of(capsys.readouterr().err)


def test_the_same_global_batch_split_otherwise_continues_the_run(tiny_dir, tmp_path, saved_run, capsys):
    """Batch 2 × accumulation 2 covers the units that batch 4 × 1 did, step for step: the same data order."""
    output_dir = copy_of(saved_run, tmp_path)
    flags = dict(FLAGS, per_device_train_batch_size=2, gradient_accumulation_steps=2, resume_from_checkpoint="true")
    train(run_config(tiny_dir, output_dir, **flags))
    assert [record["step"] for record in metrics(output_dir)] == [1, 2, 3, 4, 5]
    assert "resuming although" not in words_of(capsys.readouterr().err)


def test_the_refusal_is_one_line_exit_2(tiny_dir, tmp_path, saved_run, capsys):
    output_dir = copy_of(saved_run, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(main, cli_flags(tiny_dir, output_dir, resume_from_checkpoint="true", per_device_train_batch_size=2))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert GLOBAL_BATCH + "2 here" in words_of(err)


# ----------------------------------------------------------------------------- damaged checkpoints


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (truncate, "optimizer.pt", "is truncated or unreadable"),
        (truncate, "model.safetensors", "is truncated or unreadable"),
        (truncate, "trainer_state.json", "is truncated or unreadable"),
        (Path.unlink, "scheduler.pt", "it has no scheduler.pt"),
        (Path.unlink, "rng_state.pt", "it has no rng_state.pt"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_the_one_before_offered(
    tiny_dir,
    tmp_path,
    saved_run,
    damage,
    file,
    words,
):
    output_dir = copy_of(saved_run, tmp_path)
    damage(output_dir / "checkpoint-2" / file)
    config = run_config(tiny_dir, output_dir, **dict(FLAGS, resume_from_checkpoint="true"))
    with pytest.raises(CheckpointError) as error:
        train(config)
    message = str(error.value)
    assert f"{output_dir / 'checkpoint-2'} is damaged" in message and words in message and file in message
    previous = output_dir / "checkpoint-1"
    assert f"--resume_from_checkpoint {previous}" in message
    if file == "optimizer.pt":  # the one offered resumes
        config.training.resume_from_checkpoint = str(previous)
        assert train(config).steps == FLAGS["max_steps"]


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_stops_the_run_and_keeps_the_checkpoint_before(
    tiny_dir,
    tmp_path,
    monkeypatch,
    uninterrupted,
):
    original = torch.save

    def save_on_a_full_disk(obj, file, *args, **kwargs):
        path = Path(file.name)  # minisft hands torch.save an open file, so that its errno comes through
        if path.name == "optimizer.pt" and ".checkpoint-3." in str(path):
            file.write(b"half a file")  # what a write cut short leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(obj, file, *args, **kwargs)

    flags = dict(FLAGS, save_steps=1, save_total_limit=1)
    with monkeypatch.context() as patch:
        patch.setattr(minisft.machinery.checkpoint.torch, "save", save_on_a_full_disk)
        with pytest.raises(CheckpointError) as error:
            train(run_config(tiny_dir, tmp_path, **flags))
    message = str(error.value)
    assert "No space left on device" in message and "optimizer.pt" in message
    assert f"the last checkpoint, {tmp_path / 'checkpoint-2'}, is intact" in message
    # Nothing half-written left, and the checkpoint before was neither pruned nor touched.
    assert sorted(path.name for path in tmp_path.iterdir() if "checkpoint" in path.name) == ["checkpoint-2"]

    train(run_config(tiny_dir, tmp_path, resume_from_checkpoint="true", **flags))
    assert same_weights(tmp_path, uninterrupted) and same_metrics(tmp_path, uninterrupted)


@pytest.mark.parametrize(
    "error, reason, advice",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied", "Make the folder writable"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory"), "Not a directory", "A file stands where a folder is"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system", "mounted read-only"),
        # safetensors names the OS error only in its text
        (SafetensorError("I/O error: Permission denied (os error 13) at path x"), "os error 13", "writable"),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
            "unexpected pos",
            "Fix",
        ),
    ],
    ids=["permission", "not-a-folder", "read-only", "safetensors-permission", "torch-unexplained"],
)
def test_a_write_that_fails_for_another_reason_than_space_says_that_reason(tmp_path, error, reason, advice):
    """The old line said "Free some space" whatever failed, with 59 GB free."""
    (tmp_path / "checkpoint-2").mkdir()
    message = minisft.machinery.checkpoint.write_failure("checkpoint-3 (x/optimizer.pt)", error, tmp_path)
    assert message.startswith("Could not write checkpoint-3 (x/optimizer.pt): ") and reason in message
    assert f"the last checkpoint, {tmp_path / 'checkpoint-2'}, is intact" in message and advice in message
    assert "space" not in message and "MiB free" not in message


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"'),
    ],
    ids=["enospc", "quota", "safetensors"],
)
def test_a_full_disk_is_told_apart_and_only_it_asks_for_space(tmp_path, error):
    message = minisft.machinery.checkpoint.write_failure("checkpoint-3", error, tmp_path)
    assert "MiB free on that disk" in message and "Free some space, then continue" in message


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full: a device that is always full")
def test_torch_save_on_a_full_disk_raises_its_errno():
    """torch's own writer says only "unexpected pos" on a full disk; written through a Python file, ENOSPC shows."""
    with pytest.raises(OSError) as error:
        minisft.machinery.checkpoint.torch_save({"weights": torch.zeros(10**6)}, Path("/dev/full"))
    assert error.value.errno == errno.ENOSPC


# ----------------------------------------------------------------------------- SIGKILL at random moments

# A checkpoint every step, two kept: SIGKILL lands in steps, in checkpoint writes and in pruning.
KILL_FLAGS = dict(max_steps=10, per_device_train_batch_size=2, save_steps=1, save_total_limit=2)
KILLS = 6  # every other one aimed at a checkpoint write


def train_in_child(tiny_dir, output_dir, resume):
    torch.set_num_threads(1)  # every run, killed or not, does the same float operations in the same order
    # Killed before its first checkpoint, a run has nothing to resume: it starts again.
    resume_from = "true" if resume else None
    config = run_config(
        tiny_dir, output_dir, resume_from_checkpoint=resume_from, overwrite_output_dir=not resume, **KILL_FLAGS
    )
    train(config, Console(quiet=True))


def last_logged_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):  # not there yet, or being rewritten
        return 0


def writing_a_checkpoint(output_dir: Path) -> bool:
    return any(path.name.endswith((".partial", ".trash")) for path in output_dir.glob(".checkpoint-*"))


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tiny_dir, tmp_path):
    # A fork server imports torch and minisft once; each run is forked from it and starts in about a second. (A fork
    # of pytest itself is no good: it can inherit a lock that one of pytest's threads held, and hang.)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    reference = context.Process(target=train_in_child, args=(tiny_dir, tmp_path / "reference", False))
    reference.start()
    reference.join(timeout=300)
    assert reference.exitcode == 0

    output_dir = tmp_path / "killed"
    chance = random.Random(17)
    kills, hit_a_write, attempts = 0, 0, 0
    while True:
        attempts += 1
        resume = bool(list(output_dir.glob("checkpoint-*")))
        child = context.Process(target=train_in_child, args=(tiny_dir, output_dir, resume))
        child.start()
        if kills < KILLS:
            start = last_logged_step(output_dir) if resume else 0
            deadline = time.monotonic() + 60
            # Wait for a step past the resumed one (so that every run makes progress), then aim.
            while child.is_alive() and last_logged_step(output_dir) <= start and time.monotonic() < deadline:
                time.sleep(0.002)
            if kills % 2:  # at a checkpoint write: once one is under way, at a random moment of it
                while child.is_alive() and not writing_a_checkpoint(output_dir) and time.monotonic() < deadline:
                    time.sleep(0.001)
                time.sleep(chance.uniform(0, 0.05))
            else:  # anywhere in the next step or two
                time.sleep(chance.uniform(0, 0.5))
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
                child.join()
                kills += 1
                hit_a_write += writing_a_checkpoint(output_dir)  # its temporary folder is left behind
        child.join(timeout=300)
        if child.exitcode is None:
            child.kill()
            pytest.fail("a run hung")
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL, f"the run failed on its own (exit code {child.exitcode})"
        assert attempts < 3 * KILLS
    print(f"{kills} SIGKILLs, {hit_a_write} of them during a checkpoint write, {attempts} runs")
    assert kills >= KILLS // 2 and hit_a_write >= 1
    assert same_weights(output_dir, tmp_path / "reference") and same_metrics(output_dir, tmp_path / "reference")
