"""Token storage: a prepared split as flat arrays on disk, memory-mapped, read one example at a time.

Python lists cost about 40 bytes per token (a pointer and an int object), twice over for
input_ids and labels. A million conversations (~200M tokens) would need ~16 GB that way. Here
a split is a few flat arrays, and example i is the slice [offsets[i], offsets[i + 1]) of each:

    input_ids.bin       uint16 when the vocabulary fits (SmolLM2: 49,152), else uint32
    trained.bin         uint8, 1 where the token is trained: labels = input_ids there, -100 elsewhere
      or labels.bin     int32, the labels themselves (pre-tokenized rows that bring their own)
    offsets.bin         int64, one more than there are examples
    weights.bin         float64, each example's weight (its row's `weight`, else 1: sft/loss.py)
    origins.bin         UTF-8 "train.jsonl line 17" of every example, one after another,
    origin_offsets.bin  int64, where each origin starts
    meta.json           dtypes, counts, and the preparation's figures (prepare.PrepareStats)

That is 3 bytes per token (6 with labels.bin), and 8 per example. The arrays are numpy memmaps: the file's pages
are mapped into memory, read from disk the first time an example touches them, and shared with
the page cache, so opening a prepared split costs nothing and a process holds only the pages
it reads. numpy is already a dependency, the format is the raw bytes (nanoGPT's train.bin), and
a slice of a memmap is an array without a copy. Arrow (through `datasets`) would do the same
with a schema, but adds ~80 MB and a second library to every run that reads a JSONL file.

`TokenStorage` is a Sequence of {"input_ids": [...], "labels": [...]} dicts, built on demand,
so the loop, the packer, the collators and `inspect` read it as they read a list. A split whose
weights are not all 1 gives each example its "weight" too; one whose weights are all 1 (a dataset
without a weight column) gives none, so its steps take the unweighted loss, bit for bit.

Opening a split checks what costs nothing to check: every file has the size its dtype and the
offsets imply, and the offsets start at 0, never decrease and end at the arrays' lengths. A
split that fails is DamagedFile (the cache prepares it again; minisft/machinery/cache.py also checks every
file's sha256). A file that cannot be written (a full disk, a read-only folder) is WriteFailed,
one line naming the folder, so that the cache can fall back to a preparation it does not keep.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from minisft.errors import UserError
from minisft.sft.labels import IGNORE_INDEX

HASH_CHUNK = 1 << 24  # tokens per step when hashing: bounded memory for any split size


class LazySequence(Sequence):
    """A read-only sequence whose items are built on demand; a slice is a list. Equal to any equal sequence."""

    def item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.item(position) for position in range(*index.indices(len(self)))]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.item(position)

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-looking sequences (lists) are unhashable too


class Origins(LazySequence):
    """Where each example came from, decoded from one UTF-8 blob only when asked for."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def item(self, index: int) -> str:
        return self.blob[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8")


class TokenStorage(LazySequence):
    """A split's examples over flat arrays (see the module docstring); `folder` is None when it is not kept."""

    def __init__(self, input_ids, offsets, trained=None, labels=None, folder: Path | None = None, weights=None):
        self.input_ids, self.offsets, self.trained, self.labels = input_ids, offsets, trained, labels
        self.folder = folder
        self.weights = weights  # float64, one per example; None: every example weighs 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids_between(self, start: int, end: int) -> np.ndarray:
        return self.input_ids[start:end].astype(np.int64)

    def labels_between(self, start: int, end: int) -> np.ndarray:
        if self.labels is not None:
            return self.labels[start:end].astype(np.int64)
        return np.where(self.trained[start:end].astype(bool), self.ids_between(start, end), IGNORE_INDEX)

    def item(self, index: int) -> dict:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        example = {
            "input_ids": self.ids_between(start, end).tolist(),
            "labels": self.labels_between(start, end).tolist(),
        }
        return example if self.weights is None else example | {"weight": float(self.weights[index])}

    def fingerprint(self) -> str:
        """sha256 of the lengths, ids and labels (and weights, if any): equal for equal examples, however they are
        stored."""
        digest = hashlib.sha256(self.lengths.astype(np.int64).tobytes())
        if self.weights is not None:  # without: the fingerprint of before weights, so older checkpoints still resume
            digest.update(np.asarray(self.weights, np.float64).tobytes())
        for start in range(0, len(self.input_ids), HASH_CHUNK):
            end = min(start + HASH_CHUNK, len(self.input_ids))
            digest.update(self.ids_between(start, end).tobytes())
            digest.update(self.labels_between(start, end).tobytes())
        return digest.hexdigest()


class DamagedFile(Exception):
    """A prepared file that is not what was written: "train/offsets.bin: ..." (its path in the preparation)."""


class WriteFailed(UserError):
    """Prepared data could not be written: a full disk, a read-only folder, a file where a folder should be."""

    def __init__(self, folder: Path, error: OSError):
        self.reason = error.strerror or str(error)
        super().__init__(f"{folder} cannot be written: {self.reason}")


@contextmanager
def writing(folder: Path):
    """Within the block, a failure to write is WriteFailed naming `folder`, told apart from a failure to read."""
    try:
        yield
    except OSError as error:
        raise WriteFailed(folder, error) from error


def file_checksums(folder: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file under `folder`, named relative to it ("train/input_ids.bin").
    What the prepared cache's manifest.json and a checkpoint's trainer_state.json record, to check it later."""
    return {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def id_dtype(largest_id: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id up to `largest_id`."""
    return np.min_scalar_type(max(int(largest_id), 0))


def from_examples(examples: Sequence[dict]) -> TokenStorage:
    """Examples held as lists (tests, the Python API) as a TokenStorage in memory; a TokenStorage as it is."""
    if isinstance(examples, TokenStorage):
        return examples
    lengths = np.array([len(example["input_ids"]) for example in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = lambda key: np.fromiter(  # noqa: E731
        (token for example in examples for token in example[key]), dtype=np.int64, count=int(offsets[-1])
    )
    input_ids, labels = flat("input_ids"), flat("labels")
    trained = labels != IGNORE_INDEX
    weights = np.array([example.get("weight", 1.0) for example in examples], np.float64)
    weights = None if (weights == 1).all() else weights
    if np.array_equal(labels[trained], input_ids[trained]):
        return TokenStorage(input_ids, offsets, trained=trained, weights=weights)
    return TokenStorage(input_ids, offsets, labels=labels, weights=weights)


class StorageWriter:
    """Appends encoded batches to the files of one split, in order; `finish` maps them back for reading."""

    def __init__(self, folder: Path, dtype: np.dtype, own_labels: bool):
        self.folder, self.dtype, self.own_labels = folder, np.dtype(dtype), own_labels
        names = ("input_ids", "labels" if own_labels else "trained", "origins", "weights")
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            self.files = {name: open(folder / f"{name}.bin", "wb") for name in names}
        self.lengths: list[np.ndarray] = []
        self.origin_lengths: list[int] = []

    def append(
        self, input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, origins: list[str], weights: np.ndarray
    ) -> None:
        """One batch: its examples' ids and labels laid end to end, each example's length, origin and weight."""
        encoded = [origin.encode("utf-8") for origin in origins]
        with writing(self.folder):
            self.files["input_ids"].write(input_ids.astype(self.dtype).tobytes())
            if self.own_labels:
                self.files["labels"].write(labels.astype(np.int32).tobytes())
            else:
                self.files["trained"].write((labels != IGNORE_INDEX).astype(np.uint8).tobytes())
            self.files["origins"].write(b"".join(encoded))
            self.files["weights"].write(weights.astype(np.float64).tobytes())
        self.origin_lengths.extend(len(origin) for origin in encoded)
        self.lengths.append(lengths.astype(np.int64))

    def finish(self, meta: dict) -> None:
        """Close the files and write the offsets and meta.json (the split's figures go in `meta`)."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets_of = lambda sizes: np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)  # noqa: E731
        layout = {"dtype": self.dtype.name, "own_labels": self.own_labels, "examples": len(lengths)}
        with writing(self.folder):
            for file in self.files.values():
                file.close()
            offsets_of(lengths).tofile(self.folder / "offsets.bin")
            offsets_of(np.array(self.origin_lengths, dtype=np.int64)).tofile(self.folder / "origin_offsets.bin")
            (self.folder / "meta.json").write_text(json.dumps({**meta, **layout}), encoding="utf-8")


def _mapped(path: Path, dtype) -> np.ndarray:
    where = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        raise DamagedFile(f"{where}: missing")
    size, item = path.stat().st_size, np.dtype(dtype).itemsize
    if size % item:
        raise DamagedFile(f"{where}: {size:,} bytes, not a whole number of {np.dtype(dtype).name} values")
    # np.memmap refuses an empty file; an empty split is an empty array.
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_offsets(where: str, offsets: np.ndarray, count: int, end: int) -> None:
    """Offsets of `count` items over an array of `end` values: 0 first, never decreasing, `end` last."""
    if len(offsets) != count + 1:
        raise DamagedFile(f"{where}: {len(offsets) - 1:,} items, meta.json says {count:,}")
    if offsets[0] != 0 or offsets[-1] != end or (count and np.diff(offsets).min() < 0):
        raise DamagedFile(f"{where}: the offsets do not run from 0 up to the data's length, {end:,}")


META_FIELDS = {"dtype", "own_labels", "examples", "stats"}


def _meta(folder: Path) -> dict:
    """The split's meta.json, with the fields opening it needs; DamagedFile when it is missing or unreadable."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not META_FIELDS <= meta.keys():
            raise ValueError(f"not an object with {', '.join(sorted(META_FIELDS))}")
        np.dtype(meta["dtype"])
    except (OSError, ValueError, TypeError) as error:
        raise DamagedFile(f"{folder.name}/meta.json: unreadable ({error})") from None
    return meta


def open_storage(folder: Path) -> tuple[TokenStorage, Origins, dict]:
    """A split written by StorageWriter: its examples, their origins, and its meta.json; DamagedFile if the files
    do not fit together (see the module docstring)."""
    meta = _meta(folder)
    labels_file = ("labels", np.int32) if meta["own_labels"] else ("trained", np.uint8)
    arrays = {
        name: _mapped(folder / f"{name}.bin", dtype)
        for name, dtype in (
            ("input_ids", meta["dtype"]),
            labels_file,
            ("offsets", np.int64),
            ("origins", np.uint8),
            ("origin_offsets", np.int64),
            ("weights", np.float64),
        )
    }
    labels_name = labels_file[0]
    if len(arrays[labels_name]) != len(arrays["input_ids"]):
        raise DamagedFile(f"{folder.name}/{labels_name}.bin: {len(arrays[labels_name]):,} tokens, "
                          f"input_ids.bin has {len(arrays['input_ids']):,}")  # fmt: skip
    _check_offsets(f"{folder.name}/offsets.bin", arrays["offsets"], meta["examples"], len(arrays["input_ids"]))
    _check_offsets(f"{folder.name}/origin_offsets.bin", arrays["origin_offsets"], meta["examples"],
                   len(arrays["origins"]))  # fmt: skip
    if len(arrays["weights"]) != meta["examples"]:
        raise DamagedFile(f"{folder.name}/weights.bin: {len(arrays['weights']):,} weights, meta.json says "
                          f"{meta['examples']:,} examples")  # fmt: skip
    weights = arrays["weights"]
    storage = TokenStorage(
        arrays["input_ids"],
        arrays["offsets"],
        trained=arrays.get("trained"),
        labels=arrays.get("labels"),
        folder=folder,
        weights=None if (weights == 1).all() else weights,  # all 1: the unweighted loss, bit for bit
    )
    return storage, Origins(arrays["origins"], arrays["origin_offsets"]), meta


def open_unkept(folder: Path) -> tuple[TokenStorage, Origins, dict]:
    """Open a split written to a scratch folder, then delete the folder: the mappings keep the data (POSIX keeps
    an unlinked file's pages while a mapping holds them), and nothing is left on disk when the process ends."""
    storage, origins, meta = open_storage(folder)
    storage.folder = None
    shutil.rmtree(folder, ignore_errors=True)
    return storage, origins, meta


def scratch_folder() -> Path:
    with writing(Path(tempfile.gettempdir())):
        return Path(tempfile.mkdtemp(prefix="minisft-prepare-"))
