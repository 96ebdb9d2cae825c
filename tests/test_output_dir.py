"""The output folder (machinery/outputs.py): --overwrite_output_dir removes only what the previous run wrote, never
before every input is open; folders holding the run's inputs are refused; one run holds a folder at a time."""

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

import minisft.machinery.loop
import minisft.machinery.outputs
from minisft.machinery.cli import run
from minisft.machinery.config import ConfigError
from minisft.machinery.loop import train
from minisft.machinery.outputs import LOCK_FILE, MANIFEST, clear_previous_run, read_manifest, take_lock
from minisft.sft.examples import DataError
from minisft.train import main

from .tiny_runs import data_file_of, run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def quick_run(tiny_dir, output_dir, **flags):
    """A 2-step run that leaves checkpoint-1, and what it printed."""
    printed = io.StringIO()
    settings = dict(max_steps=2, per_device_train_batch_size=2, save_steps=1, overwrite_output_dir=True)
    train(run_config(tiny_dir, output_dir, **{**settings, **flags}), Console(file=printed, width=1000))
    return printed.getvalue()


def snapshot(folder: Path) -> dict:
    """Every file under folder, with its bytes: what must come through a refused or failed run unchanged."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def cli_flags(tiny_dir, output_dir, *more):
    data = str(data_file_of(tiny_dir))
    return ["--model_name_or_path", tiny_dir, "--dataset_name", data, "--output_dir", str(output_dir), *more]


# ----------------------------------------------------------------------------- what overwrite removes


def test_overwrite_removes_only_what_the_previous_run_wrote(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "vocab.json").write_text('{"mine": 1}')  # named like a tokenizer's file, but the user's
    # No record in the folder: not a minisft run's, so overwrite only lets the run write beside what is there.
    printed = quick_run(tiny_dir, out)
    assert "holds no record of a minisft run" in printed and "nothing in it was removed" in printed
    assert (out / "checkpoint-1").is_dir() and (out / "model.safetensors").is_file()
    assert {"checkpoint-1", "metrics.jsonl", "model.safetensors", "tokenizer.json"} <= read_manifest(out)["created"]
    shutil.copy(data_file_of(tiny_dir), out / "data.jsonl")  # put there after the run: the user's too

    printed = quick_run(tiny_dir, out, max_steps=1, save_steps=0)
    assert not (out / "checkpoint-1").exists()  # the old run's checkpoint is gone ...
    assert (out / "notes.txt").read_text() == "my notes" and (out / "vocab.json").read_text() == '{"mine": 1}'
    assert (out / "data.jsonl").read_bytes() == data_file_of(tiny_dir).read_bytes()  # ... the user's files stay
    assert (out / "model.safetensors").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    line = next(line for line in printed.splitlines() if line.startswith("--overwrite_output_dir"))
    assert "removed the previous run's" in line and line.endswith(
        "kept 3 it did not write: data.jsonl, notes.txt, vocab.json"
    )
    assert not (out / LOCK_FILE).exists()  # released, and its file deleted, when train() returned


def test_a_resumed_run_keeps_the_record_and_overwrite_then_removes_both_parts(tiny_dir, tmp_path):
    quick_run(tiny_dir, tmp_path, max_steps=4, save_steps=2)  # checkpoint-2
    quick_run(tiny_dir, tmp_path, max_steps=6, save_steps=2, resume_from_checkpoint="true")  # checkpoint-4
    assert {"checkpoint-2", "checkpoint-4"} <= read_manifest(tmp_path)["created"]
    (tmp_path / "notes.txt").write_text("mine")
    quick_run(tiny_dir, tmp_path, max_steps=1, save_steps=0)
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_never_removes_what_the_record_names_outside_minisfts_own_names(tmp_path):
    folder, outside = tmp_path / "out", tmp_path / "precious.bin"
    folder.mkdir()
    outside.write_text("the user's weights")
    for name in ("notes.txt", "checkpoint-3/model.safetensors", "merged/config.json"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("x")
    (folder / "model.safetensors").symlink_to(outside)
    # A record that lists more than minisft writes (edited by hand, say): only its own names go.
    record = {"found": [], "created": ["notes.txt", "../precious.bin", "checkpoint-3", "merged", "model.safetensors"]}
    (folder / MANIFEST).write_text(json.dumps(record))
    line = clear_previous_run(folder, read_manifest(folder))
    assert sorted(os.listdir(folder)) == [MANIFEST, "notes.txt"]
    assert outside.read_text() == "the user's weights"  # the link went, not what it pointed to
    assert line.endswith("removed the previous run's 3 files from " + f"{folder}; kept 1 it did not write: notes.txt")


# ----------------------------------------------------------------------------- nothing removed before the inputs open


def test_a_typo_in_the_dataset_or_a_model_that_fails_to_load_leaves_the_old_run_whole(tiny_dir, tmp_path, monkeypatch):
    quick_run(tiny_dir, tmp_path)
    before = snapshot(tmp_path)
    assert "checkpoint-1/trainer_state.json" in before
    config = run_config(tiny_dir, tmp_path, max_steps=1, overwrite_output_dir=True)
    config.data.dataset_name = str(tmp_path.parent / "trian.jsonl")
    with pytest.raises(DataError, match="trian.jsonl"):
        train(config, Console(quiet=True))
    assert snapshot(tmp_path) == before

    def load_model_fails(*args, **kwargs):
        raise ConfigError("the model could not be loaded")

    with monkeypatch.context() as patch:
        patch.setattr(minisft.machinery.loop, "load_model", load_model_fails)
        with pytest.raises(ConfigError, match="could not be loaded"):
            quick_run(tiny_dir, tmp_path)
    assert snapshot(tmp_path) == before
    # Both failed runs let go of the folder: a third run in this same process may take it.
    quick_run(tiny_dir, tmp_path, max_steps=1, save_steps=0)
    assert not (tmp_path / "checkpoint-1").exists()


# ----------------------------------------------------------------------------- folders a run may not write into


def unsafe_folders(tiny_dir, work: Path, home: Path) -> dict:
    """Output folders that hold the run's inputs: tiny_dir's parent holds the model folder and the data file."""
    inputs = Path(tiny_dir).parent
    (work / "link").symlink_to(inputs)
    return {
        "the current folder": (".", "is the current folder"),
        "the home folder": (str(home), "is the home folder"),
        "the root": ("/", "is the root of the file system"),
        "the dataset's folder": (str(inputs), "holds --dataset_name"),
        "a parent of the dataset's folder": (str(inputs.parent), "holds --dataset_name"),
        "a link to the dataset's folder": (str(work / "link"), "holds --dataset_name"),
        "the model's folder": (tiny_dir, "holds --model_name_or_path"),
    }


@pytest.mark.parametrize(
    "which",
    [
        "the current folder",
        "the home folder",
        "the root",
        "the dataset's folder",
        "a parent of the dataset's folder",
        "a link to the dataset's folder",
        "the model's folder",
    ],
)
def test_a_folder_holding_the_runs_inputs_is_refused_and_nothing_is_removed(
    which, tiny_dir, tmp_path, monkeypatch, capsys
):
    work, home = tmp_path / "work", tmp_path / "home"
    for folder in (work, home):
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    output_dir, message = unsafe_folders(tiny_dir, work, home)[which]
    before = snapshot(Path(tiny_dir).parent), snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(main, cli_flags(tiny_dir, output_dir, "--overwrite_output_dir"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --output_dir {output_dir} {message}")
    assert (snapshot(Path(tiny_dir).parent), snapshot(tmp_path)) == before


def test_a_model_folder_inside_the_output_dir_is_refused(tiny_dir, tmp_path):
    inner = tmp_path / "base"
    shutil.copytree(tiny_dir, inner)
    with pytest.raises(ConfigError, match="holds --model_name_or_path"):
        train(run_config(str(inner), tmp_path, overwrite_output_dir=True))
    assert sorted(os.listdir(tmp_path)) == ["base"]


@pytest.mark.parametrize("where, message", [("file", "is a file, not a folder"), ("file/out", "Not a directory")])
def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_one_line(where, message, tiny_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run(main, cli_flags(tiny_dir, tmp_path / where))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --output_dir {tmp_path / where}") and message in err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_read_only_output_dir_is_refused_naming_the_reason(tmp_path):
    # root writes into a chmod 555 folder anyway, so as root the child gives up its privileges (after its imports:
    # the interpreter lives under /root) and runs the command as the user nobody, for whom the folder is as
    # read-only as for any ordinary user. The output folder is checked before any input is read.
    base = Path(tempfile.mkdtemp())  # /tmp/...: reachable by nobody, unlike pytest's 0700 tmp_path
    try:
        base.chmod(0o755)
        folder = base / "out"
        folder.mkdir()
        folder.chmod(0o555)
        (base / "data.jsonl").write_text("{}")
        flags = ["--model_name_or_path", str(base / "no-model"), "--dataset_name", str(base / "data.jsonl")]
        flags += ["--output_dir", str(folder), "--overwrite_output_dir"]
        become_nobody = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else ""
        # rich imports its emoji and cell-width tables when it first prints: printed once to nowhere before the
        # privileges go, since nobody cannot read a venv in a 0700 folder (as CI's is).
        warm = "import io; from rich.console import Console; Console(file=io.StringIO()).print('[bold red]x:[/] x')"
        code = f"import os, sys; from minisft.machinery.cli import run; from minisft.train import main; {warm}; "
        code += f"{become_nobody}; run(main, sys.argv[1:])"
        child = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=120)
        err = child.stderr.strip().splitlines()
        assert child.returncode == 2, child.stderr
        assert err[-1] == f"error: --output_dir {folder} is not writable: Permission denied ({folder / LOCK_FILE})."
        assert os.listdir(folder) == []
    finally:
        shutil.rmtree(base)


# ----------------------------------------------------------------------------- one run per folder


HOLD = "import sys, time; from pathlib import Path; from minisft.machinery.outputs import take_lock\n"
HOLD += "lock = take_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"


def test_a_second_run_into_a_held_folder_is_refused_until_the_holder_dies(tiny_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as refused:
            quick_run(tiny_dir, tmp_path)
        message = str(refused.value)
        assert message.startswith(
            f"--output_dir {tmp_path} is in use by another run: process {holder.pid} on {socket.gethostname()}, since "
        )
        assert "\n" not in message and os.listdir(tmp_path) == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the lock, the file stays
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()
    printed = quick_run(tiny_dir, tmp_path)
    assert f"took over {tmp_path / LOCK_FILE} from process {holder.pid}" in printed
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_one_per_folder_within_a_process_too(tmp_path):
    with take_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"process {os.getpid()} on "):
            take_lock(tmp_path)
    with take_lock(tmp_path) as lock:  # released: taken again, with no note of a dead holder
        assert lock.note is None


def test_a_file_system_without_locks_is_said_and_the_run_goes_on(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(minisft.machinery.outputs.fcntl, "flock", no_locks)
    with take_lock(tmp_path) as lock:
        assert lock.note.startswith(f"note: {tmp_path} is on a file system without file locks")
        assert lock.note.endswith("a second run into it would not be refused")
    assert not (tmp_path / LOCK_FILE).exists()
