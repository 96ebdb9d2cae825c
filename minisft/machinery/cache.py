"""The preparation cache: a prepared dataset is kept under a fingerprint of everything it depends on.

Preparing a large dataset (tokenizing every conversation) takes minutes; a run, a resume and
an `inspect` of the same data with the same flags would each redo it. Instead the storage
(minisft/machinery/storage.py) is kept in `--cache_dir` (default $MINISFT_CACHE/prepared), in a folder
named by a sha256 of:

- each data file: its resolved path, size and modification time, and for a file up to 64 MiB
  its content too (a file rewritten within one tick of the file system's clock keeps its
  mtime; reading 64 MiB takes a tenth of a second, a warm run's budget allows it);
- the tokenizer: its whole vocabulary and merges (the fast tokenizer's JSON), its added and
  special tokens, and the chat template it will render with;
- every flag that changes the prepared tokens: the DataConfig fields whose metadata says
  "prepared" (config.py says why the others do not), the seed when it picks the held-out rows,
  and the length each split is truncated to (prepare.cut_lengths: --max_length, or nothing for
  a split that bfd_split or wrapped will split over rows);
- PREPARATION_FORMAT, raised whenever preparation's output changes for the same inputs.

A second run with the same inputs finds the folder and maps it; any change gives another
fingerprint, hence another folder, prepared afresh. Packing plans are kept inside the folder,
one per strategy and max_length (pack_plans.py).

A folder is written under a temporary name and renamed when complete. A rename is atomic, so
the fingerprint's folder is either absent or whole; a preparation interrupted half-way leaves
only a `.partial-*` folder, which is never read (and is removed by the next preparation, once
the process that wrote it is gone; a folder written from another machine sharing the cache is
left to that machine).

Whole is not the same as intact: a disk, a copy or a hand can damage a file afterwards, and a
mask of zeros or a cut offsets file would be trained on without a word. So before the rename a
manifest.json records every file's size and sha256, and a run that finds the folder checks
them (sizes first, then the hashes: ~0.6 s per GB, 0.4 s for the 650 MB of a million
conversations, 200M tokens) before it maps anything. A folder that fails is removed and
prepared again, with one line naming the damaged file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from .config import DataConfig
from .models import cache_root
from .storage import DamagedFile, WriteFailed, file_checksums, sha256_of, writing

# 2: bfd-packed splits are truncated by preparation (format 1 left them whole for the packer to cut).
# 3: manifest.json records every file's size and sha256; partial folders name the machine that writes them.
# 4: every split keeps each example's weight (weights.bin), and a training example of weight 0 is dropped.
PREPARATION_FORMAT = 4
MANIFEST = "manifest.json"
HOST = socket.gethostname()
CONTENT_HASHED_BELOW = 64 << 20  # bytes
OFF = ("none", "")


def cache_folder(cache_dir: str | None) -> Path | None:
    """Where prepared datasets are kept: --cache_dir, else $MINISFT_CACHE/prepared; None when it is off."""
    if cache_dir is None:
        return cache_root() / "prepared"
    return None if cache_dir.strip().lower() in OFF else Path(cache_dir)


def file_identity(path: Path) -> dict:
    status = path.stat()
    identity = {"path": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    if status.st_size <= CONTENT_HASHED_BELOW:
        identity["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return identity


def tokenizer_identity(tokenizer) -> str:
    """A hash of what decides the tokenizer's ids: its vocabulary, merges, added tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    described = {
        "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest(),
        "special_tokens": tokenizer.special_tokens_map,
        "size": len(tokenizer),
        "chat_template": tokenizer.chat_template,
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(
    files: list[Path], tokenizer, config: DataConfig, seed: int, cut_to: dict[str, int | None], columns=None
) -> str:
    """The cache key of preparing `files`; `cut_to`: the length each split is truncated to (prepare.cut_lengths);
    `columns`: the columns kept of each row, when a mixture's entry selects some."""
    settings = {flag.name: getattr(config, flag.name) for flag in fields(config) if flag.metadata["prepared"]}
    if config.eval_split_size:  # the seed picks the held-out rows; otherwise it only shuffles training
        settings["seed"] = seed
    described = {
        "format": PREPARATION_FORMAT,
        "files": [file_identity(file) for file in files],
        "tokenizer": tokenizer_identity(tokenizer),
        "settings": settings,
        "cut_to": cut_to,
    } | ({"columns": list(columns)} if columns else {})
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def complete(root: Path, key: str) -> Path | None:
    """The folder of a finished preparation with this fingerprint, if there is one."""
    folder = root / key
    return folder if folder.is_dir() else None


@contextmanager
def building(root: Path, key: str):
    """A scratch folder to write a preparation into; sealed (its manifest written) and renamed to its fingerprint's
    name once the block ends well, removed if it does not. WriteFailed when the cache cannot be written."""
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
        _clear_abandoned(root)
        partial = root / f".partial-{key}-{HOST}-{os.getpid()}"
        partial.mkdir()
    try:
        yield partial
        seal(partial)
        try:
            os.rename(partial, root / key)
        except OSError as error:
            if not (root / key).is_dir():
                raise WriteFailed(root, error) from error
            shutil.rmtree(partial, ignore_errors=True)  # another process finished the same preparation first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _clear_abandoned(root: Path) -> None:
    """Remove the partial folders (of any fingerprint) whose writer on this machine is gone: killed, or crashed."""
    for folder in root.glob(".partial-*"):
        # .partial-<key>-<host>-<pid>; a folder named before hosts were (format 2) has no host, and is ours
        host, _, pid = folder.name.split("-", 2)[-1].rpartition("-")
        if pid.isdigit() and host in ("", HOST) and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process with this id exists (another preparation may be under way)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def seal(folder: Path) -> None:
    """Write folder's manifest.json: the size and sha256 of every file in it, as they are now."""
    records = file_checksums(folder)
    with writing(folder):
        (folder / MANIFEST).write_text(json.dumps(records, indent=1), encoding="utf-8")


def verify(folder: Path) -> None:
    """DamagedFile naming the first file of the manifest that is missing, or has another size or sha256."""
    try:
        records = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        expected = {name: (int(record["bytes"]), str(record["sha256"])) for name, record in records.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise DamagedFile(f"{MANIFEST}: unreadable ({error})") from None
    for name, (size, _) in expected.items():  # every size before any hash: a cut file is found at once
        path = folder / name
        if not path.is_file():
            raise DamagedFile(f"{name}: missing")
        if path.stat().st_size != size:
            raise DamagedFile(f"{name}: {path.stat().st_size:,} bytes where {size:,} were written")
    for name, (_, sha256) in expected.items():
        if sha256_of(folder / name) != sha256:
            raise DamagedFile(f"{name}: checksum mismatch")


def discard(folder: Path) -> None:
    """Remove a damaged preparation. Renamed first, so that no run opens it half-removed; a removal cut short
    leaves a partial folder, cleared as any other is."""
    doomed = folder.parent / f".partial-{folder.name}-{HOST}-{os.getpid()}"
    try:
        os.rename(folder, doomed)
    except OSError:  # another run removed it first, or the cache is read-only: preparing again will tell
        return
    shutil.rmtree(doomed, ignore_errors=True)
