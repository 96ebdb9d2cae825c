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
    position_ids  0 1 2 3 4 5 0 1 2 0       restart at each example: the model's positions
    seq_lengths   [6, 3, 1]                  the examples' lengths, in order
    labels        - a a a a a - b b -       the first token of each example is never a target:
                                             it would be predicted from the previous example

Strategies, with the names and meanings of TRL's `packing_strategy`:
- bfd        best-fit decreasing: longest examples first, each into the row whose free space
             fits it most tightly. An example longer than max_length is truncated (counted).
- bfd_split  the same, but an overlong example is split into max_length chunks, which are
             packed as separate sequences (each chunk loses the context of the one before).
- wrapped    concatenate everything and cut every max_length tokens: no slot wasted, but
             examples are cut across rows. Boundaries are kept inside each row.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .masking import IGNORE_INDEX

STRATEGIES = ("bfd", "bfd_split", "wrapped")


class PackingError(UserError, ValueError):
    """A packing option that cannot work; the message says why."""


@dataclass
class PackStats:
    rows: int = 0
    tokens: int = 0
    slots: int = 0  # rows × max_length: what the model computes over when every row is full-length
    truncated_examples: int = 0  # bfd: examples longer than max_length
    truncated_tokens: int = 0  # bfd: tokens cut off
    split_examples: int = 0  # bfd_split and wrapped: examples spread over several sequences or rows

    @property
    def efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0


@dataclass
class PackedDataset:
    rows: list[dict]  # {"input_ids", "labels", "position_ids", "seq_lengths"}
    stats: PackStats = field(default_factory=PackStats)


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


def pack(examples: list[dict], max_length: int | None, strategy: str = "bfd") -> PackedDataset:
    """Pack tokenized examples ({"input_ids", "labels"}) into rows of at most max_length tokens."""
    max_length = check_max_length(max_length)
    if strategy not in STRATEGIES:
        raise PackingError(f"Unknown --packing_strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    empty = next((index for index, example in enumerate(examples) if not example["input_ids"]), None)
    if empty is not None:
        raise PackingError(f"Example {empty} has no tokens; there is nothing to pack.")
    stats = PackStats()
    if strategy == "wrapped":
        rows = _wrap(examples, max_length, stats)
    else:
        sequences = _fit_to_length(examples, max_length, split=strategy == "bfd_split", stats=stats)
        bins = best_fit_decreasing([len(sequence[0]) for sequence in sequences], max_length)
        rows = [make_row([sequences[index] for index in members]) for members in bins]
    stats.rows = len(rows)
    stats.tokens = sum(len(row["input_ids"]) for row in rows)
    stats.slots = stats.rows * max_length
    return PackedDataset(rows, stats)


def _fit_to_length(examples: list[dict], max_length: int, split: bool, stats: PackStats) -> list[tuple[list, list]]:
    """(input_ids, labels) sequences no longer than max_length: overlong ones truncated or split."""
    sequences = []
    for example in examples:
        input_ids, labels = example["input_ids"], example["labels"]
        if len(input_ids) <= max_length:
            sequences.append((input_ids, labels))
        elif split:
            stats.split_examples += 1
            sequences.extend(
                (input_ids[start : start + max_length], labels[start : start + max_length])
                for start in range(0, len(input_ids), max_length)
            )
        else:
            stats.truncated_examples += 1
            stats.truncated_tokens += len(input_ids) - max_length
            sequences.append((input_ids[:max_length], labels[:max_length]))
    return sequences


def _wrap(examples: list[dict], max_length: int, stats: PackStats) -> list[dict]:
    rows, current, used = [], [], 0
    for example in examples:
        input_ids, labels = example["input_ids"], example["labels"]
        start = 0
        if len(input_ids) > max_length - used:
            stats.split_examples += 1
        while start < len(input_ids):
            take = min(len(input_ids) - start, max_length - used)
            current.append((input_ids[start : start + take], labels[start : start + take]))
            used += take
            start += take
            if used == max_length:
                rows.append(make_row(current))
                current, used = [], 0
    if current:
        rows.append(make_row(current))
    return rows


def make_row(sequences: list[tuple[list, list]]) -> dict:
    """One row from (input_ids, labels) sequences: positions restart and the boundary label is masked."""
    row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for input_ids, labels in sequences:
        row["input_ids"].extend(input_ids)
        # The first token of a sequence has no context of its own to be predicted from.
        row["labels"].append(IGNORE_INDEX)
        row["labels"].extend(labels[1:])
        row["position_ids"].extend(range(len(input_ids)))
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
        starts = torch.cumsum(lengths, 0) - lengths
        batch["position_ids"][index] = torch.arange(width) - torch.repeat_interleave(starts, lengths)
    batch["seq_lengths"] = [row["seq_lengths"] for row in rows]
    return batch
