"""Packing: several short examples share one row of max_length tokens, so no compute is spent on padding.

Padding a batch to its longest example wastes every slot after each shorter one. On chat data,
whose lengths are skewed (many short turns, a long tail), half the slots can be padding:

    padded     [a a a a a a . . . .]      packed  [a a a a a a b b b c]
               [b b b . . . . . . .]              [d d d d d d d d . .]
               [c . . . . . . . . .]
               [d d d d d d d d . .]

A packed row is only correct if no token can see another example's tokens; minisft/attention.py
builds those boundaries from what every packed row carries:

    input_ids     a a a a a a b b b c
    seq_lengths   [6, 3, 1]                  the examples' lengths, in order
    labels        - a a a a a - b b -       the first token of each example is never a target:
                                             it would be predicted from the previous example

and from what collate_rows derives from seq_lengths, in one place (positions_of):

    position_ids  0 1 2 3 4 5 0 1 2 0       restart at each example: the model's positions

At scale the rows are a plan, not lists: which slice of which example makes each row, a few
integers per example (PackedRows). Packing reads only the examples' lengths, and a row's
tokens are read from the memory-mapped storage (minisft/storage.py) when a batch needs it.
A plan of cached examples is kept beside them, with the sha256 of its own arrays: a kept plan
whose arrays no longer match it, or that points outside the examples, is made again (one line
says so) rather than trained on. The plan is one file, written after the cache folder was
sealed and perhaps by two runs at once, so it carries its checksum instead of a shared manifest.

Strategies, with the names and meanings of TRL's `packing_strategy`:
- bfd        best-fit decreasing: longest examples first, each into the row whose free space
             fits it most tightly. An example longer than max_length is truncated: in a run
             preparation has done it (minisft/prepare.py decides every cut, and counts it);
             pack() given a longer example cuts it here, as TRL's pack_dataset does (counted).
- bfd_split  the same, but an overlong example is split into max_length chunks, which are
             packed as separate sequences (each chunk loses the context of the one before).
- wrapped    concatenate everything and cut every max_length tokens: no slot wasted, but
             examples are cut across rows. Boundaries are kept inside each row.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from minisft.errors import UserError
from minisft.machinery.storage import LazySequence, TokenStorage, from_examples

from .labels import IGNORE_INDEX

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


class PackedRows(LazySequence):
    """Rows as a plan over the examples' storage: row r is the pieces row_offsets[r]:row_offsets[r + 1], and piece
    p is tokens [starts[p], ends[p]) of example examples[p]. A row's dict is built only when it is read, so a
    million examples pack into a few arrays of integers, not lists of every token."""

    def __init__(self, storage: TokenStorage, plan: dict[str, np.ndarray]):
        self.storage, self.plan = storage, plan

    def __len__(self) -> int:
        return len(self.plan["row_offsets"]) - 1

    def item(self, index: int) -> dict:
        plan, offsets = self.plan, self.storage.offsets
        pieces = range(plan["row_offsets"][index], plan["row_offsets"][index + 1])
        input_ids, labels, seq_lengths = [], [], []
        for piece in pieces:
            base = int(offsets[plan["examples"][piece]])
            start, end = base + int(plan["starts"][piece]), base + int(plan["ends"][piece])
            input_ids.append(self.storage.ids_between(start, end))
            piece_labels = self.storage.labels_between(start, end)
            # The first token of a sequence has no context of its own to be predicted from.
            piece_labels[0] = IGNORE_INDEX
            labels.append(piece_labels)
            seq_lengths.append(end - start)
        return {
            "input_ids": np.concatenate(input_ids).tolist(),
            "labels": np.concatenate(labels).tolist(),
            "seq_lengths": seq_lengths,
        }

    def fingerprint(self) -> str:
        """The examples' fingerprint and the plan's: equal for the same rows cut from the same examples."""
        digest = hashlib.sha256(self.storage.fingerprint().encode())
        for key in PLAN_KEYS:
            digest.update(self.plan[key].astype(np.int64).tobytes())
        return digest.hexdigest()


PLAN_KEYS = ("examples", "starts", "ends", "row_offsets")


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


def pack(examples: Sequence[dict], max_length: int | None, strategy: str = "bfd") -> PackedDataset:
    """Pack tokenized examples ({"input_ids", "labels"}: a TokenStorage, or a list) into rows of max_length tokens.

    Only the examples' lengths are read to plan the rows. A plan for examples kept in the preparation
    cache is kept beside them, so the next run with the same data, strategy and max_length reuses it.
    """
    max_length = check_max_length(max_length)
    if strategy not in STRATEGIES:
        raise PackingError(f"Unknown --packing_strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    storage = from_examples(examples)
    lengths = storage.lengths
    if len(lengths) and lengths.min() == 0:
        raise PackingError(f"Example {int(np.argmin(lengths))} has no tokens; there is nothing to pack.")
    kept = storage.folder / f"pack-{strategy}-{max_length}.npz" if storage.folder is not None else None
    if kept is not None and kept.exists():
        found = _kept_plan(kept, lengths)
        if found is not None:
            return PackedDataset(PackedRows(storage, found[0]), found[1])
    stats = PackStats()
    if strategy == "wrapped":
        plan = _wrap(lengths, max_length, stats)
    else:
        plan = _bfd_plan(lengths, max_length, split=strategy == "bfd_split", stats=stats)
    stats.rows = len(plan["row_offsets"]) - 1
    stats.tokens = int((plan["ends"] - plan["starts"]).sum())
    stats.slots = stats.rows * max_length
    if kept is not None:
        _keep_plan(kept, plan, stats)
    return PackedDataset(PackedRows(storage, plan), stats)


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

    Positions are not stored: collate_rows derives them from seq_lengths, the one place they are made.
    """
    row = {"input_ids": [], "labels": [], "seq_lengths": []}
    for input_ids, labels in sequences:
        row["input_ids"].extend(input_ids)
        # The first token of a sequence has no context of its own to be predicted from.
        row["labels"].append(IGNORE_INDEX)
        row["labels"].extend(labels[1:])
        row["seq_lengths"].append(len(input_ids))
    return row


def padding_free_row(examples: list[dict]) -> dict:
    """A batch of unpacked examples as one row: packing at batch level, with the same boundaries."""
    return make_row([(example["input_ids"], example["labels"]) for example in examples])


# ----------------------------------------------------------------------------- batches


def setup_pad_token(tokenizer, pad_token: str | None = None) -> str | None:
    """Give the tokenizer the token batches are padded with. Returns a line for the run's log when it had none.

    As TRL chooses it: --pad_token, else the tokenizer's own pad token, else its EOS. Llama 3, Mistral
    and Qwen base tokenizers have no pad token. Which token pads never changes the loss: a padded
    position has label -100, and no real token attends to it (attention_mask 0, or a document of its
    own in a packed row). The tokenizer keeps the choice, so the saved tokenizer pads the same way.
    """
    own = tokenizer.pad_token
    chosen = pad_token or own or tokenizer.eos_token
    if chosen is None:
        raise PackingError(
            "The tokenizer has neither a pad token nor an EOS token to pad batches with; pass --pad_token."
        )
    if chosen not in tokenizer.get_vocab():
        raise PackingError(f"--pad_token {chosen!r} is not a token of this tokenizer's vocabulary.")
    tokenizer.pad_token = chosen
    if chosen == own:
        return None
    if own is None and pad_token is None:
        return f"padding: the tokenizer has no pad token, so batches are padded with its EOS {chosen!r}, as TRL does"
    return f"padding: with {chosen!r} (--pad_token)"


def round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def collate_padded(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Unpacked examples padded to the longest of the batch: input_ids, labels, attention_mask."""
    width = round_up(max(len(example["input_ids"]) for example in examples), pad_to_multiple_of)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for index, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[index, :length] = torch.tensor(example["input_ids"])
        labels[index, :length] = torch.tensor(example["labels"])
        attention_mask[index, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def positions_of(seq_lengths: torch.Tensor) -> torch.Tensor:
    """The position of every token of a row whose sequences have these lengths: 0, 1, ... again in each."""
    starts = torch.cumsum(seq_lengths, 0) - seq_lengths
    return torch.arange(int(seq_lengths.sum())) - torch.repeat_interleave(starts, seq_lengths)


def collate_rows(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Packed rows padded to the longest of the batch, with their boundaries.

    `document_ids` number the sequences of each row (0, 1, ...); the padding at the end of a row
    is one more document of its own, so padded positions attend only to padding and never
    produce an empty (NaN) attention row.
    """
    width = round_up(max(len(row["input_ids"]) for row in rows), pad_to_multiple_of)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "document_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        batch["input_ids"][index, :length] = torch.tensor(row["input_ids"])
        batch["labels"][index, :length] = torch.tensor(row["labels"])
        lengths = torch.tensor(row["seq_lengths"] + [width - length])
        batch["document_ids"][index] = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        batch["position_ids"][index] = positions_of(lengths)
    batch["seq_lengths"] = [row["seq_lengths"] for row in rows]
    return batch
