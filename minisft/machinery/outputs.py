"""The output folder: what a run may write into, what --overwrite_output_dir removes, and one run at a time.

What a run reads never shares its folder with what it writes. An --output_dir that is the current
folder, the home folder, the root, or the folder of the dataset or of the base model (or a parent of
them) is refused before anything starts: a run writes and, with --overwrite_output_dir, removes files
there, and a user's files must never be within its reach by accident. So is a folder inside a folder
dataset: the next run would read the outputs' .jsonl files as data.

Overwrite means overwrite minisft's own files. A run keeps a record of what it created in the folder,

    out/.minisft-run.json    {"found": [names there before the run began writing],
                              "created": [names that appeared since: checkpoint-2, metrics.jsonl, runs, ...]}

updated at each point where the run writes (the metrics log opened, each checkpoint, the final model).
--overwrite_output_dir then removes only what is BOTH in that record AND named like something minisft
writes (checkpoint-N, metrics.jsonl, the model's, adapter's and tokenizer's files, merged/, runs/): a
notes.txt the user put there, or a file of the same name as minisft's that the record does not list,
stays. A folder with no record was not written by minisft and loses nothing; overwrite then only lets
the run write beside what is there. The removal happens once every input has been opened (loop.py:
after the data is prepared and the model loaded), so a typo in --dataset_name leaves the old run whole.

One run per folder. Two runs writing into one folder would interleave their checkpoints and metrics,
and one's overwrite or resume would delete the other's files as it writes them. A run holds an
advisory lock, flock on out/.minisft.lock, from the moment it opens the folder until train() returns
or raises; the file names the holder (pid, host, since when) for the refusal message. The kernel
drops a flock when its process dies, however it dies, so a lock left by a killed run is simply taken
over. The file is deleted on release while still locked, so a clean end leaves no trace; a process
that locks a file and then finds another at its path (the holder deleted it meanwhile) tries again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from .checkpoint import PREFIX, TRASH
from .config import ConfigError

LOCK_FILE = ".minisft.lock"
MANIFEST = ".minisft-run.json"
BOOKKEEPING = {LOCK_FILE, MANIFEST, MANIFEST + ".tmp"}  # never counted as the folder's contents

# Every top-level name a run writes (checked by a full run and a --use_peft --merge_lora run).
OWN_NAMES = re.compile(
    r"""checkpoint-\d+ | \.checkpoint-\d+\.(partial|trash)             # checkpoint.py
    | metrics\.jsonl(\.tmp)? | runs | wandb                              # reporting.py and its trackers
    | probes\.jsonl(\.tmp)?                                              # probes.py (--probe_prompts)
    | merged                                                             # --merge_lora
    | config\.json | generation_config\.json                             # model.save_pretrained
    | model(-\d+-of-\d+)?\.safetensors | model\.safetensors\.index\.json
    | (configuration|modeling)_\w+\.py                                   # a trust_remote_code model's own code
    | adapter_model\.safetensors | adapter_config\.json                 # minisft.machinery.peft_files.save_adapter
    | tokenizer\.json | tokenizer_config\.json | special_tokens_map\.json | added_tokens\.json
    | chat_template\.(jinja|json) | additional_chat_templates | tokenizer\.model | spiece\.model
    | vocab\.(json|txt) | merges\.txt | tokenization_\w+\.py             # tokenizer.save_pretrained""",
    re.VERBOSE,
)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # file systems mounted without flock (some Lustre, say)


# ----------------------------------------------------------------------------- where a run may write


def refuse_unsafe_folder(output_dir: Path, datasets: list, model_folder) -> None:
    """One line, before anything starts, for an --output_dir the run must not write into. `datasets` (a mixture
    has several) and `model_folder`: what the run reads, checked only where they are local paths (not hub names)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file, not a folder; give the run a folder of its own.")
    folder = output_dir.resolve()  # symlinks followed: the folder a write would really land in
    places = {
        Path.cwd().resolve(): "the current folder",
        Path(os.path.expanduser("~")).resolve(): "the home folder",
        Path(folder.anchor): "the root of the file system",
    }
    if folder in places:
        raise ConfigError(
            f"--output_dir {output_dir} is {places[folder]}: a run writes (and with --overwrite_output_dir removes) "
            f"files in it; give it a folder of its own, such as {output_dir / 'out'}."
        )
    for flag, source in [
        *(("--dataset_name", dataset) for dataset in datasets),
        ("--model_name_or_path", model_folder),
    ]:
        if isinstance(source, (str, os.PathLike)) and Path(source).exists():
            path = Path(source).resolve()
            held = path if path.is_dir() else path.parent
            if held == folder or folder in held.parents:
                raise ConfigError(
                    f"--output_dir {output_dir} holds {flag} {source}: the run would write among its own inputs; "
                    "give it a folder of its own."
                )
            if path.is_dir() and path in folder.parents and flag == "--dataset_name":
                raise ConfigError(
                    f"--output_dir {output_dir} is inside {flag} {source}: a folder dataset reads every data file "
                    "under it, so the run's metrics.jsonl would be read as data; give it a folder of its own."
                )


def make_folder(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot create the folder: {reason(error)}.") from None


def reason(error: OSError) -> str:
    return f"{error.strerror or error} ({error.filename})" if error.filename else str(error.strerror or error)


def contents(folder: Path) -> set[str]:
    """The folder's entries, minisft's bookkeeping left out: a folder holding only those counts as empty."""
    return set(os.listdir(folder)) - BOOKKEEPING if folder.is_dir() else set()


# ----------------------------------------------------------------------------- one run at a time


class OutputLock:
    """The flock on folder/.minisft.lock; `with` it: released (and its file deleted) however the run ends."""

    def __init__(self, path: Path, descriptor: int | None, note: str | None = None):
        self.path, self.descriptor, self.note = path, descriptor, note

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exception) -> None:
        self.release()

    def release(self) -> None:
        if self.descriptor is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: whoever opened it meanwhile retries (open_locked)
        except OSError:
            pass  # a folder gone read-only: the file stays, unlocked, and the next run takes it over
        os.close(self.descriptor)  # the lock goes with the last descriptor
        self.descriptor = None


def take_lock(folder: Path) -> OutputLock:
    """The folder's lock, or one line naming the run that holds it. A lock whose holder died is taken over."""
    path = folder / LOCK_FILE
    try:
        descriptor, locked = open_locked(path)
    except OSError as error:
        raise ConfigError(f"--output_dir {folder} is not writable: {reason(error)}.") from None
    if not locked:
        note = f"note: {folder} is on a file system without file locks: a second run into it would not be refused"
        return OutputLock(path, descriptor, note)
    try:
        previous = os.pread(descriptor, 4096, 0)  # left by a holder that ended without releasing it (killed)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
    except OSError as error:
        OutputLock(path, descriptor).release()
        raise ConfigError(f"--output_dir {folder} is not writable: {reason(error)} ({path}).") from None
    note = f"note: took over {path} from {describe(previous)}, which ended without releasing it" if previous else None
    return OutputLock(path, descriptor, note)


def open_locked(path: Path) -> tuple[int, bool]:
    """The file at `path`, opened (made if need be) and flocked: (descriptor, True), or (descriptor, False) on a
    file system without locks. Held by another process: one line naming it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0)
            os.close(descriptor)
            raise ConfigError(
                f"--output_dir {path.parent} is in use by another run: {describe(holder)} ({path}). Wait for it to "
                "end, or give this run another --output_dir."
            ) from None
        except OSError as error:
            if error.errno in NO_LOCKS:
                return descriptor, False
            os.close(descriptor)
            raise
        try:
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                return descriptor, True
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the holder deleted the file as it released it: lock the one now at the path


def describe(holder: bytes) -> str:
    try:
        found = json.loads(holder)
        return f"process {found['pid']} on {found['host']}, since {found['since']}"
    except (ValueError, TypeError, KeyError):
        return "a run that is starting"  # locked, its line not written yet


# ----------------------------------------------------------------------------- what a run wrote


def read_manifest(folder: Path) -> dict | None:
    """{"found": set, "created": set}, or None: no record (not a minisft run's folder), or an unreadable one."""
    try:
        record = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return {"found": set(map(str, record["found"])), "created": set(map(str, record["created"]))}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_manifest(folder: Path, found: set[str], created: set[str]) -> None:
    record = {"written_by": "minisft", "found": sorted(found), "created": sorted(created)}
    fresh = folder / (MANIFEST + ".tmp")  # written aside and renamed over: a kill leaves the last record whole
    fresh.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    fresh.replace(folder / MANIFEST)


def start_writing(folder: Path, overwrite: bool) -> str | None:
    """Called once every input is open, before the run's first write: with `overwrite`, remove what the
    previous run wrote (clear_previous_run); then start this run's record. Returns the line to print, if any."""
    previous = read_manifest(folder)
    note = clear_previous_run(folder, previous) if overwrite else None
    listing = contents(folder)
    carried = previous["created"] & listing if previous else set()  # a resumed run's files stay its own
    try:
        write_manifest(folder, found=listing - carried, created=carried)
    except OSError as error:
        raise ConfigError(f"--output_dir {folder} is not writable: {reason(error)}.") from None
    return note


def record_outputs(folder: Path) -> None:
    """Add to the record what appeared in the folder since the run began writing, and drop what is gone."""
    try:
        record = read_manifest(folder)
        if record is None:
            return
        listing = contents(folder)
        created = (record["created"] | (listing - record["found"])) & listing
        if created != record["created"]:
            write_manifest(folder, record["found"], created)
    except OSError:
        pass  # the last record stays: a later overwrite then keeps these files, it never removes more


def clear_previous_run(folder: Path, previous: dict | None) -> str | None:
    """--overwrite_output_dir: remove what the previous run's record lists AND minisft writes; keep the rest."""
    listing = contents(folder)
    if previous is None:
        if not listing:
            return None
        return (
            f"--overwrite_output_dir: {folder} holds no record of a minisft run ({MANIFEST}), so nothing in it "
            f"was removed; the run writes beside its {len(listing)} entries"
        )
    doomed = sorted(name for name in previous["created"] & listing if OWN_NAMES.fullmatch(name))
    for name in doomed:
        remove(folder / name)
    kept = sorted(listing - set(doomed))
    shown = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
    return f"--overwrite_output_dir: removed the previous run's {len(doomed)} files from {folder}; " + (
        f"kept {len(kept)} it did not write: {shown}" if kept else "nothing else was there"
    )


def remove(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a link itself, never what it points to
            return
        if re.fullmatch(rf"{PREFIX}\d+", path.name):
            # Renamed first, as checkpoint.py deletes: a kill halfway never leaves a checkpoint-N that looks whole.
            trash = path.with_name(f".{path.name}{TRASH}")
            shutil.rmtree(trash, ignore_errors=True)
            path = path.rename(trash)
        shutil.rmtree(path)
    except OSError as error:
        raise ConfigError(f"--overwrite_output_dir: could not remove {path}: {reason(error)}.") from None
