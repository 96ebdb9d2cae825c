"""Pack plans kept beside a prepared split, so that the next run with the same data packs without planning.

The packer (minisft/sft/packing.py) reads only the examples' lengths and returns a plan: a few
integers per example saying which slice of which example makes each row. Planning a million
examples takes seconds, and the plan depends only on the lengths, the strategy and max_length,
so a plan of cached examples (minisft/machinery/cache.py) is kept in the split's folder as
pack-{strategy}-{max_length}.npz and read back by the next run, `inspect` included.

The plan carries the sha256 of its own arrays and figures: a kept plan whose arrays no longer
match it, or that points outside the examples, is made again (one line says so) rather than
trained on. The plan is one file, written after the cache folder was sealed and perhaps by two
runs at once, so it carries its checksum instead of a shared manifest, and it is written under
another name and renamed, so it is whole or absent. A cache that cannot be written loses only
the plan: the run goes on, and the next one plans again.

The rows read a prepared split's pieces as slices of its memory-mapped arrays (PreparedRows),
and hash like the examples do, so a checkpoint records which rows it was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from minisft.sft.packing import PLAN_KEYS, PackedDataset, PackedRows, PackStats, check_packing, plan_rows

from .storage import TokenStorage, from_examples


class PreparedRows(PackedRows):
    """Packed rows over a TokenStorage: each piece is read as one slice of its flat arrays, not built as a whole
    example and cut."""

    examples: TokenStorage

    def piece(self, example: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        base = int(self.examples.offsets[example])
        start, end = base + start, base + end
        return self.examples.ids_between(start, end), self.examples.labels_between(start, end)

    def fingerprint(self) -> str:
        """The examples' fingerprint and the plan's: equal for the same rows cut from the same examples."""
        digest = hashlib.sha256(self.examples.fingerprint().encode())
        for key in PLAN_KEYS:
            digest.update(self.plan[key].astype(np.int64).tobytes())
        return digest.hexdigest()


def pack_prepared(examples: Sequence[dict], max_length: int | None, strategy: str = "bfd") -> PackedDataset:
    """Pack tokenized examples (a TokenStorage, or a list) into rows of max_length tokens, as sft.packing.pack does.

    A plan for examples kept in the preparation cache is kept beside them, so the next run with the same
    data, strategy and max_length reuses it.
    """
    storage = from_examples(examples)
    lengths = storage.lengths
    max_length = check_packing(lengths, max_length, strategy)
    kept = storage.folder / f"pack-{strategy}-{max_length}.npz" if storage.folder is not None else None
    if kept is not None and kept.exists():
        found = _kept_plan(kept, lengths)
        if found is not None:
            return PackedDataset(PreparedRows(storage, found[0]), found[1])
    plan, stats = plan_rows(lengths, max_length, strategy)
    if kept is not None:
        _keep_plan(kept, plan, stats)
    return PackedDataset(PreparedRows(storage, plan), stats)


def _plan_digest(plan: dict[str, np.ndarray], stats: str) -> str:
    digest = hashlib.sha256(stats.encode())
    for key in PLAN_KEYS:
        digest.update(plan[key].astype(np.int64).tobytes())
    return digest.hexdigest()


def _keep_plan(path: Path, plan: dict[str, np.ndarray], stats: PackStats) -> None:
    """Write the plan beside the examples; written under another name and renamed, so it is whole or absent."""
    partial = path.with_suffix(f".partial-{os.getpid()}")
    described = json.dumps(asdict(stats))
    try:
        with open(partial, "wb") as file:
            np.savez(file, stats=np.array(described), sha256=np.array(_plan_digest(plan, described)), **plan)
        os.replace(partial, path)
    except OSError as error:  # a read-only or full cache: the run goes on, and the next one plans again
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        print(f"packing: the plan is not kept in {path.parent} ({error.strerror or error})", file=sys.stderr)


def _kept_plan(path: Path, lengths: np.ndarray) -> tuple[dict[str, np.ndarray], PackStats] | None:
    """The plan kept at `path` and its figures, checked; None, and one line saying why, when it is damaged."""
    try:
        with np.load(path) as saved:
            plan, described, sha256 = {key: saved[key] for key in PLAN_KEYS}, str(saved["stats"]), str(saved["sha256"])
        stats = PackStats(**json.loads(described))
        problem = "checksum mismatch" if _plan_digest(plan, described) != sha256 else _plan_problem(plan, lengths)
    except Exception as error:  # a damaged zip fails in many ways: BadZipFile, KeyError, ValueError, zlib.error...
        problem = f"unreadable ({type(error).__name__}: {error})"
    if problem is None:
        return plan, stats
    print(f"packing: the kept plan {path} is damaged ({problem}); planned again", file=sys.stderr)
    return None


def _plan_problem(plan: dict[str, np.ndarray], lengths: np.ndarray) -> str | None:
    """What is wrong with a plan over examples of these lengths: pieces outside them, rows that do not tile them."""
    examples, starts, ends, row_offsets = (plan[key].astype(np.int64) for key in PLAN_KEYS)
    if not len(examples) == len(starts) == len(ends) == (row_offsets[-1] if len(row_offsets) else -1):
        return "its arrays disagree on the number of pieces"
    if row_offsets[0] != 0 or (np.diff(row_offsets) < 0).any():
        return "its row offsets do not run from 0 up"
    if len(examples) and (examples.min() < 0 or examples.max() >= len(lengths)):
        return "a piece of an example that is not there"
    if (starts < 0).any() or (ends <= starts).any() or (ends > lengths[examples]).any():
        return "a piece outside its example"
    return None
