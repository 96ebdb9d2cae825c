"""Packing: several short examples share one row of max_length tokens, so no compute is spent on padding.

Padding a batch to its longest example wastes every slot after each shorter one. On chat data,
whose lengths are skewed (many short turns, a long tail), half the slots can be padding:

    padded     [a a a a a a . . . .]      packed  [a a a a a a b b b c]
               [b b b . . . . . . .]              [d d d d d d d d . .]
               [c . . . . . . . . .]
               [d d d d d d d d . .]

A packed row is only correct if no token can see another example's tokens; attention.py (next)
builds those boundaries from what every packed row carries:

    input_ids     a a a a a a b b b c
    seq_lengths   [6, 3, 1]                  the examples' lengths, in order (and weights, theirs, if they have any)
    labels        - a a a a a - b b -       the first token of each example is never a target:
                                             it would be predicted from the previous example

and from what batches.collate_rows derives from seq_lengths, in one place (positions_of):

    position_ids  0 1 2 3 4 5 0 1 2 0       restart at each example: the model's positions

At scale the rows are a plan, not lists: which slice of which example makes each row, a few
integers per example (PackedRows). Packing reads only the examples' lengths (plan_rows), and a
row's tokens are read from the examples when a batch needs it. In a run the examples are a
prepared split, memory-mapped from disk, and the machinery keeps the plan beside it so that the
next run reuses it (minisft/machinery/pack_plans.py).

Strategies, with the names and meanings of TRL's `packing_strategy`:
- bfd        best-fit decreasing: longest examples first, each into the row whose free space
             fits it most tightly. An example longer than max_length is truncated: in a run
             preparation has cut it already (labels.py decides every cut, and it is counted);
             pack() given a longer example cuts it here, as TRL's pack_dataset does (counted).
- bfd_split  the same, but an overlong example is split into max_length chunks, which are
             packed as separate sequences (each chunk loses the context of the one before).
- wrapped    concatenate everything and cut every max_length tokens: no slot wasted, but
             examples are cut across rows. Boundaries are kept inside each row.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from minisft.errors import UserError

from .labels import boundary_labels

STRATEGIES = ("bfd", "bfd_split", "wrapped")


class PackingError(UserError, ValueError):
    """A packing option that cannot work; the message says why."""


@dataclass
class PackStats:
    rows: int = 0
    tokens: int = 0
    slots: int = 0  # rows × max_length: what the model computes over when every row is full-length
    truncated_examples: int = 0  # bfd given examples longer than max_length (in a run preparation cut them first)
    truncated_tokens: int = 0  # bfd: tokens cut off
    split_examples: int = 0  # bfd_split and wrapped: examples spread over several sequences or rows

    @property
    def efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0


@dataclass
class PackedDataset:
    rows: Sequence[dict]  # PackedRows: {"input_ids", "labels", "seq_lengths"}, built on demand
    stats: PackStats = field(default_factory=PackStats)


PLAN_KEYS = ("examples", "starts", "ends", "row_offsets")


class PackedRows(Sequence):
    """Rows as a plan over the examples: row r is the pieces row_offsets[r]:row_offsets[r + 1], and piece p is
    tokens [starts[p], ends[p]) of example examples[p]. A row's dict is built only when it is read, so a million
    examples pack into a few arrays of integers, not lists of every token."""

    def __init__(self, examples: Sequence[dict], plan: dict[str, np.ndarray]):
        self.examples, self.plan = examples, plan

    def __len__(self) -> int:
        return len(self.plan["row_offsets"]) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        plan = self.plan
        pieces = range(plan["row_offsets"][position], plan["row_offsets"][position + 1])
        input_ids, labels, seq_lengths = [], [], []
        for piece in pieces:
            start, end = int(plan["starts"][piece]), int(plan["ends"][piece])
            piece_ids, piece_labels = self.piece(int(plan["examples"][piece]), start, end)
            input_ids.append(piece_ids)
            labels.append(boundary_labels(piece_labels))
            seq_lengths.append(end - start)
        return {
            "input_ids": np.concatenate(input_ids).tolist(),
            "labels": np.concatenate(labels).tolist(),
            "seq_lengths": seq_lengths,
        } | self.weights(plan["examples"][pieces.start : pieces.stop])

    def weights(self, examples: np.ndarray) -> dict:
        """{"weights": [...]} of these examples (1 for one without one), or {} if none has one, for the row's pieces."""
        if hasattr(self.examples, "weights"):  # a prepared split (machinery/storage.py): one array, None if all 1
            return {} if self.examples.weights is None else {"weights": self.examples.weights[examples].tolist()}
        found = [self.examples[int(example)] for example in examples]
        return {"weights": [one.get("weight", 1.0) for one in found]} if any("weight" in one for one in found) else {}

    def piece(self, example: int, start: int, end: int) -> tuple[Sequence[int], Sequence[int]]:
        """Tokens [start, end) of one example: its input_ids and labels. (The machinery reads a prepared split's
        pieces as slices of its arrays instead: machinery/pack_plans.py.)"""
        tokens = self.examples[example]
        return tokens["input_ids"][start:end], tokens["labels"][start:end]


def check_max_length(max_length: int | None) -> int:
    if max_length is None:
        raise PackingError("Packing needs a row length: set --max_length (e.g. 1024).")
    if max_length <= 0:
        raise PackingError(f"--max_length must be a positive number of tokens, got {max_length}.")
    return max_length


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity` (every length ≤ capacity).

    Items go longest first; each goes into the open bin with the least free space that still
    fits it, or into a new bin. `free_spaces` is the sorted list of distinct free-space values
    of open bins, so the tightest fit is one bisect: O(n log n) for the sort, then O(log capacity)
    per item (plus a list insert of at most `capacity` entries, a fast memmove).
    """
    bins: list[list[int]] = []
    bins_by_space: dict[int, list[int]] = defaultdict(list)  # free space -> indices of bins with it
    free_spaces: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        length = lengths[item]
        position = bisect.bisect_left(free_spaces, length)
        if position < len(free_spaces):
            space = free_spaces[position]
            bin_index = bins_by_space[space].pop()
            if not bins_by_space[space]:
                del free_spaces[position]
        else:
            space, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(item)
        remaining = space - length
        if remaining > 0:
            if not bins_by_space[remaining]:
                bisect.insort(free_spaces, remaining)
            bins_by_space[remaining].append(bin_index)
    return bins


def check_packing(lengths: np.ndarray, max_length: int | None, strategy: str) -> int:
    """max_length, once it, the strategy and the examples' lengths can make rows; else a PackingError says why."""
    max_length = check_max_length(max_length)
    if strategy not in STRATEGIES:
        raise PackingError(f"Unknown --packing_strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if len(lengths) and lengths.min() == 0:
        raise PackingError(f"Example {int(np.argmin(lengths))} has no tokens; there is nothing to pack.")
    return max_length


def plan_rows(lengths: np.ndarray, max_length: int | None, strategy: str) -> tuple[dict[str, np.ndarray], PackStats]:
    """The plan of rows over examples of these lengths (see PackedRows), and its figures."""
    max_length = check_packing(lengths, max_length, strategy)
    stats = PackStats()
    if strategy == "wrapped":
        plan = _wrap(lengths, max_length, stats)
    else:
        plan = _bfd_plan(lengths, max_length, split=strategy == "bfd_split", stats=stats)
    stats.rows = len(plan["row_offsets"]) - 1
    stats.tokens = int((plan["ends"] - plan["starts"]).sum())
    stats.slots = stats.rows * max_length
    return plan, stats


def pack(examples: Sequence[dict], max_length: int | None, strategy: str = "bfd") -> PackedDataset:
    """Pack tokenized examples ({"input_ids", "labels"} each) into rows of max_length tokens.

    Only the examples' lengths are read to plan the rows; a row's tokens are read when the row is.
    (A run packs its prepared split with machinery/pack_plans.pack_prepared: the same rows, a kept plan.)
    """
    lengths = np.array([len(example["input_ids"]) for example in examples], dtype=np.int64)
    plan, stats = plan_rows(lengths, max_length, strategy)
    return PackedDataset(PackedRows(examples, plan), stats)


def _bfd_plan(lengths: np.ndarray, max_length: int, split: bool, stats: PackStats) -> dict[str, np.ndarray]:
    """Sequences no longer than max_length (overlong examples truncated, or split into chunks), packed by bfd."""
    overlong = lengths > max_length
    if split:
        stats.split_examples = int(overlong.sum())
        chunks = -(-lengths // max_length)  # ceil: every example is at least one chunk
        examples = np.repeat(np.arange(len(lengths)), chunks)
        first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)
        starts = (np.arange(len(examples)) - first_chunk) * max_length
        ends = np.minimum(starts + max_length, lengths[examples])
    else:
        stats.truncated_examples = int(overlong.sum())
        stats.truncated_tokens = int((lengths[overlong] - max_length).sum())
        examples, starts, ends = (
            np.arange(len(lengths)),
            np.zeros(len(lengths), np.int64),
            np.minimum(lengths, max_length),
        )
    bins = best_fit_decreasing((ends - starts).tolist(), max_length)
    order = np.fromiter((piece for members in bins for piece in members), dtype=np.int64, count=len(examples))
    row_offsets = np.concatenate([[0], np.cumsum([len(members) for members in bins], dtype=np.int64)])
    return {"examples": examples[order], "starts": starts[order], "ends": ends[order], "row_offsets": row_offsets}


def _wrap(lengths: np.ndarray, max_length: int, stats: PackStats) -> dict[str, np.ndarray]:
    """Concatenate every example and cut every max_length tokens: a piece ends at each example end and row end."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    total = int(offsets[-1])
    # An example is split when it runs past the end of the row it starts in.
    stats.split_examples = int(((offsets[:-1] % max_length) + lengths > max_length).sum())
    cuts = np.union1d(offsets, np.arange(0, total, max_length))
    starts, ends = cuts[:-1], cuts[1:]
    examples = np.searchsorted(offsets, starts, side="right") - 1
    rows = starts // max_length
    row_offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=-(-total // max_length)))])
    return {
        "examples": examples,
        "starts": starts - offsets[examples],
        "ends": ends - offsets[examples],
        "row_offsets": row_offsets.astype(np.int64),
    }


def make_row(sequences: list[tuple[list, list]]) -> dict:
    """One row from (input_ids, labels) sequences: the boundary label is masked, and the lengths kept.

    Positions are not stored: batches.collate_rows derives them from seq_lengths, the one place they are made.
    """
    row = {"input_ids": [], "labels": [], "seq_lengths": []}
    for input_ids, labels in sequences:
        row["input_ids"].extend(input_ids)
        row["labels"].extend(boundary_labels(labels))
        row["seq_lengths"].append(len(input_ids))
    return row
