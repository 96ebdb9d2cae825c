"""Packing: parity with TRL's pack_dataset + collator, invariants under random lengths, efficiency, collators.

Expected values come from TRL itself (the parity tests) or from simple independent reasoning inside the
test (a brute-force best-fit, slicing the original examples), never from numbers copied from minisft.

Every synthetic example gets token ids that name it: example i, token j has id i * STRIDE + j + 1, so any
sequence cut out of a packed row says which example it came from and where in that example it starts.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisft.sft.batches import collate_padded, collate_rows, padding_free_row
from minisft.sft.packing import (
    STRATEGIES,
    PackingError,
    PackStats,
    best_fit_decreasing,
    check_max_length,
    make_row,
    pack,
)

IGNORE = -100
STRIDE = 10_000  # > any example length used here, so ids of different examples never collide


# ----------------------------------------------------------------------------- helpers


def make_examples(lengths: list[int], seed: int = 0) -> list[dict]:
    """Examples with self-describing ids; labels mask a random prompt prefix plus a few random tokens."""
    rng = random.Random(seed)
    examples = []
    for index, length in enumerate(lengths):
        input_ids = [index * STRIDE + offset + 1 for offset in range(length)]
        prompt = rng.randint(0, length)
        labels = [IGNORE if offset < prompt or rng.random() < 0.1 else token for offset, token in enumerate(input_ids)]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def origin(token: int) -> tuple[int, int]:
    """(example index, offset in the example) of a synthetic token id."""
    return (token - 1) // STRIDE, (token - 1) % STRIDE


def cut(input_ids, labels, position_ids, seq_lengths) -> list[tuple[tuple, tuple, tuple]]:
    """The sequences of one packed row, as (input_ids, labels, position_ids) tuples."""
    assert sum(seq_lengths) == len(input_ids)
    sequences, start = [], 0
    for length in seq_lengths:
        end = start + length
        sequences.append((tuple(input_ids[start:end]), tuple(labels[start:end]), tuple(position_ids[start:end])))
        start = end
    return sequences


def positions(row: dict) -> list[int]:
    """A row's position_ids as the loop gets them: rows carry seq_lengths only, and collate_rows derives positions."""
    return collate_rows([row], pad_token_id=0)["position_ids"][0].tolist()


def minisft_sequences(rows: list[dict]) -> list[tuple]:
    return [
        sequence
        for row in rows
        for sequence in cut(row["input_ids"], row["labels"], positions(row), row["seq_lengths"])
    ]


def expected_sequence(example: dict, start: int, stop: int) -> tuple[tuple, tuple, tuple]:
    """What a sequence cut from example[start:stop] must look like once packed: positions from 0, first label masked."""
    input_ids = example["input_ids"][start:stop]
    labels = [IGNORE] + example["labels"][start + 1 : stop]
    return tuple(input_ids), tuple(labels), tuple(range(len(input_ids)))


def check_row(row: dict, max_length: int) -> None:
    """Invariants every packed row must satisfy, whatever the strategy."""
    n = len(row["input_ids"])
    assert 0 < n <= max_length
    position_ids = positions(row)
    assert len(row["labels"]) == n and len(position_ids) == n
    assert all(length > 0 for length in row["seq_lengths"])
    assert sum(row["seq_lengths"]) == n
    starts = set(np.cumsum([0] + row["seq_lengths"][:-1]).tolist())
    # positions are 0 exactly at sequence starts, and count up by one inside a sequence
    assert {index for index, position in enumerate(position_ids) if position == 0} == starts
    for index in range(1, n):
        if index not in starts:
            assert position_ids[index] == position_ids[index - 1] + 1
    # the first token of every sequence is never a target
    assert all(row["labels"][start] == IGNORE for start in starts)


def reference_bfd_loads(lengths: list[int], capacity: int) -> list[int]:
    """Brute-force best-fit decreasing: the sorted bin loads. Bins with equal free space are interchangeable for
    every later decision, so the multiset of loads does not depend on tie-breaking."""
    loads: list[int] = []
    for length in sorted(lengths, reverse=True):
        fitting = [index for index, load in enumerate(loads) if load + length <= capacity]
        if fitting:
            loads[max(fitting, key=lambda index: loads[index])] += length
        else:
            loads.append(length)
    return sorted(loads)


# ----------------------------------------------------------------------------- parity with TRL


MAX_LENGTH = 64
TRL_MAP_BATCH = 1000  # datasets.map's default batch size: TRL packs each batch of 1000 examples on its own


@pytest.fixture(scope="module")
def parity_examples() -> list[dict]:
    rng = random.Random(1234)
    lengths = [rng.randint(1, 150) for _ in range(1500)]  # about 57% longer than MAX_LENGTH
    assert any(length > MAX_LENGTH for length in lengths) and any(length <= MAX_LENGTH for length in lengths)
    return make_examples(lengths, seed=99)


def trl_packed_rows(examples: list[dict], max_length: int, strategy: str) -> list[dict]:
    """TRL's pack_dataset rows, with the labels and positions TRL's padding-free collator gives them.

    SFTTrainer turns padding-free on for bfd and bfd_split: the collator then concatenates the rows of a
    batch into one sequence, derives position_ids from seq_lengths and sets labels to -100 where a position
    is 0. All rows go through it as one batch (fast, and the same per-row result), then are cut apart again.
    For wrapped, padding-free is off and the collator leaves labels as they are: the raw rows are TRL's.
    """
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    dataset = datasets.Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    )
    rows = trl.pack_dataset(dataset, max_length, strategy).to_list()
    if strategy != "wrapped":
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
        assert batch["input_ids"].shape[0] == 1  # padding-free: one flat sequence
        start = 0
        for row in rows:
            end = start + len(row["input_ids"])
            assert batch["input_ids"][0, start:end].tolist() == row["input_ids"]
            row["labels"] = batch["labels"][0, start:end].tolist()
            row["position_ids"] = batch["position_ids"][0, start:end].tolist()
            start = end
    return rows


@pytest.fixture(scope="module")
def trl_reference(parity_examples):
    """strategy -> TRL's rows for parity_examples, computed once per strategy."""
    return functools.cache(lambda strategy: trl_packed_rows(parity_examples, MAX_LENGTH, strategy))


def trl_sequences(rows: list[dict]) -> list[tuple]:
    return [
        sequence
        for row in rows
        for sequence in cut(row["input_ids"], row["labels"], row["position_ids"], row["seq_lengths"])
    ]


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_bfd_sequences_match_trl(parity_examples, trl_reference, strategy):
    """Same sequences (ids, boundary-masked labels, positions), truncated or split exactly as TRL does."""
    trl_rows = trl_reference(strategy)
    packed = pack(parity_examples, MAX_LENGTH, strategy)

    assert sorted(minisft_sequences(packed.rows)) == sorted(trl_sequences(trl_rows))
    # positions are compared per sequence above (TRL's come from its collator); here, every row's own invariants
    assert all(len(row["input_ids"]) <= MAX_LENGTH for row in trl_rows)
    for row in packed.rows:
        check_row(row, MAX_LENGTH)
    # global packing never needs more rows than TRL's batches of 1000
    assert len(packed.rows) <= len(trl_rows)
    assert packed.stats.rows == len(packed.rows)
    assert packed.stats.tokens == sum(len(row["input_ids"]) for row in trl_rows)


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_bfd_row_lengths_match_trl_batch_by_batch(parity_examples, trl_reference, strategy):
    """Packed the way TRL packs (each map batch of 1000 on its own), the same algorithm gives the same rows count
    and the same multiset of row lengths (tie-breaking between equal free spaces cannot change them)."""
    trl_rows = trl_reference(strategy)
    minisft_rows = []
    for start in range(0, len(parity_examples), TRL_MAP_BATCH):
        minisft_rows += pack(parity_examples[start : start + TRL_MAP_BATCH], MAX_LENGTH, strategy).rows
    assert len(minisft_rows) == len(trl_rows)
    assert sorted(len(row["input_ids"]) for row in minisft_rows) == sorted(len(row["input_ids"]) for row in trl_rows)


def test_trl_collator_positions_agree_with_get_position_ids(parity_examples):
    """The static helper TRL's collator uses gives the positions minisft's collator derives for its rows."""
    pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = pack(parity_examples[:300], MAX_LENGTH, "bfd").rows
    trl_positions = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(
        [row["seq_lengths"] for row in rows]
    )
    assert [p.tolist() for p in trl_positions] == [positions(row) for row in rows]


def test_wrapped_rows_match_trl(parity_examples, trl_reference):
    """wrapped: the same token stream, cut every max_length within each TRL map batch. Labels differ only by
    design: minisft keeps example boundaries inside a row (masking each example's first token), TRL does not."""
    trl_rows = trl_reference("wrapped")
    minisft_rows = []
    for start in range(0, len(parity_examples), TRL_MAP_BATCH):
        minisft_rows += pack(parity_examples[start : start + TRL_MAP_BATCH], MAX_LENGTH, "wrapped").rows
    assert [row["input_ids"] for row in minisft_rows] == [row["input_ids"] for row in trl_rows]
    for ours, theirs in zip(minisft_rows, trl_rows):
        check_row(ours, MAX_LENGTH)
        starts = {index for index, position in enumerate(positions(ours)) if position == 0}
        differ = {index for index, (a, b) in enumerate(zip(ours["labels"], theirs["labels"])) if a != b}
        assert differ <= starts
    # and packed globally, the stream is the same one
    assert [t for row in pack(parity_examples, MAX_LENGTH, "wrapped").rows for t in row["input_ids"]] == [
        t for row in trl_rows for t in row["input_ids"]
    ]


def test_padding_free_row_matches_trl_collator():
    """Padding-free batching of unpacked examples: TRL's collator and padding_free_row agree on everything."""
    pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = make_examples([5, 1, 9, 3], seed=3)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    row = padding_free_row(examples)
    assert batch["input_ids"][0].tolist() == row["input_ids"]
    assert batch["labels"][0].tolist() == row["labels"]
    assert batch["position_ids"][0].tolist() == positions(row)
    assert batch["cu_seq_lens_q"].diff().tolist() == row["seq_lengths"]


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_collate_padded_matches_trl_collator(pad_to_multiple_of):
    pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = make_examples([5, 1, 9, 3], seed=4)
    theirs = DataCollatorForLanguageModeling(pad_token_id=7, pad_to_multiple_of=pad_to_multiple_of)(examples)
    ours = collate_padded(examples, pad_token_id=7, pad_to_multiple_of=pad_to_multiple_of)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


# ----------------------------------------------------------------------------- properties (hypothesis)


lengths_strategy = st.lists(st.integers(1, 300), max_size=200)


def sequences_by_example(rows: list[dict]) -> dict[int, list[tuple[int, tuple]]]:
    """example index -> [(offset in the example, sequence)] for every sequence in the rows, in row order."""
    found = defaultdict(list)
    for sequence in minisft_sequences(rows):
        index, offset = origin(sequence[0][0])
        # a sequence never straddles two examples, and is a contiguous slice of one
        assert [origin(t) for t in sequence[0]] == [(index, offset + k) for k in range(len(sequence[0]))]
        found[index].append((offset, sequence))
    return found


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy, max_length=st.integers(1, 256), seed=st.integers(0, 2**16))
def test_bfd_properties(lengths, max_length, seed):
    examples = make_examples(lengths, seed)
    packed = pack(examples, max_length, "bfd")
    for row in packed.rows:
        check_row(row, max_length)
    found = sequences_by_example(packed.rows)
    assert sorted(found) == list(range(len(examples)))  # every example, once
    for index, example in enumerate(examples):
        assert found[index] == [(0, expected_sequence(example, 0, max_length))]  # whole, or its truncated prefix
    overlong = [length for length in lengths if length > max_length]
    assert packed.stats.truncated_examples == len(overlong)
    assert packed.stats.truncated_tokens == sum(length - max_length for length in overlong)
    total = sum(min(length, max_length) for length in lengths)
    assert packed.stats.tokens == total
    assert packed.stats.slots == len(packed.rows) * max_length == packed.stats.rows * max_length

    row_lengths = sorted(len(row["input_ids"]) for row in packed.rows)
    assert len(row_lengths) >= math.ceil(total / max_length)
    # best fit never opens a row while an earlier one could take the item, so no two rows could be merged
    # (which also means at most one row is half full or less)
    if len(row_lengths) >= 2:
        assert row_lengths[0] + row_lengths[1] > max_length
    assert row_lengths == reference_bfd_loads([min(length, max_length) for length in lengths], max_length)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy, max_length=st.integers(1, 256), seed=st.integers(0, 2**16))
def test_bfd_split_properties(lengths, max_length, seed):
    examples = make_examples(lengths, seed)
    packed = pack(examples, max_length, "bfd_split")
    for row in packed.rows:
        check_row(row, max_length)
    found = sequences_by_example(packed.rows)
    assert sorted(found) == list(range(len(examples)))
    for index, example in enumerate(examples):
        chunks = sorted(found[index])
        starts = list(range(0, lengths[index], max_length))
        assert [offset for offset, _ in chunks] == starts  # every chunk once: nothing lost, nothing duplicated
        assert [sequence for _, sequence in chunks] == [
            expected_sequence(example, start, start + max_length) for start in starts
        ]
    assert packed.stats.tokens == sum(lengths)
    assert packed.stats.truncated_tokens == 0
    assert packed.stats.split_examples == sum(length > max_length for length in lengths)
    row_lengths = sorted(len(row["input_ids"]) for row in packed.rows)
    assert len(row_lengths) >= math.ceil(sum(lengths) / max_length)
    if len(row_lengths) >= 2:
        assert row_lengths[0] + row_lengths[1] > max_length


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy, max_length=st.integers(1, 256), seed=st.integers(0, 2**16))
def test_wrapped_properties(lengths, max_length, seed):
    examples = make_examples(lengths, seed)
    packed = pack(examples, max_length, "wrapped")
    for row in packed.rows:
        check_row(row, max_length)
    # the rows, in order, are the concatenation of the examples, cut every max_length tokens
    stream = [token for example in examples for token in example["input_ids"]]
    assert [row["input_ids"] for row in packed.rows] == [
        stream[start : start + max_length] for start in range(0, len(stream), max_length)
    ]
    found = sequences_by_example(packed.rows)
    assert sorted(found) == list(range(len(examples)))
    for index, example in enumerate(examples):
        chunks = found[index]  # in row order, which must be the example's order
        offsets = [offset for offset, _ in chunks]
        assert offsets == sorted(offsets) and offsets[0] == 0
        assert [t for _, sequence in chunks for t in sequence[0]] == example["input_ids"]
        ends = offsets[1:] + [lengths[index]]
        assert [sequence for _, sequence in chunks] == [
            expected_sequence(example, start, end) for start, end in zip(offsets, ends)
        ]
    # an example is cut only at a row boundary: a row's first sequence may continue the previous row's last
    assert packed.stats.split_examples == sum(len(found[index]) > 1 for index in range(len(examples)))
    assert packed.stats.tokens == sum(lengths)


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(1, 256),
    data=st.data(),
)
def test_best_fit_decreasing_partition(capacity, data):
    lengths = data.draw(st.lists(st.integers(1, capacity), max_size=200))
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(index for members in bins for index in members) == list(range(len(lengths)))
    assert all(members for members in bins)
    loads = sorted(sum(lengths[index] for index in members) for members in bins)
    assert all(load <= capacity for load in loads)
    assert loads == reference_bfd_loads(lengths, capacity)
    if len(loads) >= 2:
        assert loads[0] + loads[1] > capacity
    assert sum(load * 2 <= capacity for load in loads) <= 1


def test_best_fit_decreasing_picks_the_tightest_bin():
    # 6 and 5 open two bins (free 4 and 5); 4 fits both and must go to the one with 4 free
    bins = best_fit_decreasing([6, 5, 4], 10)
    assert sorted(sorted(members) for members in bins) == [[0, 2], [1]]


# ----------------------------------------------------------------------------- efficiency


def test_bfd_efficiency_on_skewed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=math.log(180), sigma=0.9, size=4000), 1, 2000).astype(int)
    # the distribution we claim: median near 180, a long tail up to 2000
    assert 165 <= np.median(lengths) <= 195
    assert lengths.max() >= 1900
    assert np.mean(lengths > 1024) > 0.005
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in lengths.tolist()]
    max_length = 1024

    packed = pack(examples, max_length, "bfd")
    assert isinstance(packed.stats, PackStats)
    assert packed.stats.efficiency == packed.stats.tokens / (len(packed.rows) * max_length)
    assert packed.stats.efficiency >= 0.99

    # contrast: padding random batches of 8 (examples truncated to max_length, as without packing)
    truncated = [{"input_ids": e["input_ids"][:max_length], "labels": e["labels"][:max_length]} for e in examples]
    random.Random(0).shuffle(truncated)
    real = slots = 0
    for start in range(0, len(truncated), 8):
        mask = collate_padded(truncated[start : start + 8], pad_token_id=0)["attention_mask"]
        real += int(mask.sum())
        slots += mask.numel()
    assert real == packed.stats.tokens  # the same tokens, only laid out differently
    padded_efficiency = real / slots
    assert padded_efficiency < 0.6 < packed.stats.efficiency


# ----------------------------------------------------------------------------- collators and rows


@pytest.mark.parametrize("pad_to_multiple_of, width", [(None, 9), (1, 9), (4, 12), (9, 9), (16, 16)])
def test_collate_padded(pad_to_multiple_of, width):
    examples = make_examples([5, 1, 9, 3], seed=1)
    batch = collate_padded(examples, pad_token_id=7, pad_to_multiple_of=pad_to_multiple_of)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (4, width) and batch[key].dtype == torch.long
    for index, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][index].tolist() == example["input_ids"] + [7] * (width - n)
        assert batch["labels"][index].tolist() == example["labels"] + [IGNORE] * (width - n)
        assert batch["attention_mask"][index].tolist() == [1] * n + [0] * (width - n)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_collate_rows(pad_to_multiple_of):
    examples = make_examples([7, 3, 12, 2, 5, 1, 9, 16], seed=2)
    rows = pack(examples, 16, "bfd").rows
    assert len({len(row["input_ids"]) for row in rows}) > 1  # some rows need padding
    batch = collate_rows(rows, pad_token_id=7, pad_to_multiple_of=pad_to_multiple_of)
    longest = max(len(row["input_ids"]) for row in rows)
    width = longest if pad_to_multiple_of is None else -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    for key in ("input_ids", "labels", "position_ids", "document_ids"):
        assert batch[key].shape == (len(rows), width), key
    assert batch["seq_lengths"] == [row["seq_lengths"] for row in rows]
    for index, row in enumerate(rows):
        pad = width - len(row["input_ids"])
        assert batch["input_ids"][index].tolist() == row["input_ids"] + [7] * pad
        assert batch["labels"][index].tolist() == row["labels"] + [IGNORE] * pad
        # positions: restarting in each sequence, then the padding counting from 0 as a sequence of its own
        expected = [offset for length in row["seq_lengths"] for offset in range(length)]
        assert batch["position_ids"][index].tolist() == expected + list(range(pad))
        documents = [d for d, length in enumerate(row["seq_lengths"]) for _ in range(length)]
        padding_document = [len(row["seq_lengths"])] * pad
        assert batch["document_ids"][index].tolist() == documents + padding_document


def test_collate_rows_full_row_has_no_padding_document():
    rows = [make_row([([1, 2, 3], [1, 2, 3]), ([4], [4])]), make_row([([5, 6], [5, 6])])]
    batch = collate_rows(rows, pad_token_id=0)
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [IGNORE, 6, IGNORE, IGNORE]]


def test_make_row_and_padding_free_row():
    examples = make_examples([4, 1, 3], seed=5)
    examples[0]["labels"] = list(examples[0]["input_ids"])  # a trained first token, which the row must mask
    row = padding_free_row(examples)
    assert row == make_row([(e["input_ids"], e["labels"]) for e in examples])
    assert row["input_ids"] == [t for e in examples for t in e["input_ids"]]
    assert row["seq_lengths"] == [4, 1, 3]
    assert set(row) == {"input_ids", "labels", "seq_lengths"}  # positions are the collator's alone
    assert positions(row) == [0, 1, 2, 3, 0, 0, 1, 2]
    expected_labels = [IGNORE] + examples[0]["labels"][1:] + [IGNORE] + [IGNORE] + examples[2]["labels"][1:]
    assert row["labels"] == expected_labels
    assert examples[0]["labels"][0] != IGNORE  # the inputs are not modified
    check_row(row, max_length=8)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("max_length", [0, -1, -1024, None])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_max_length(max_length, strategy):
    """Refused with a PackingError that names the flag and, when one was given, the value (as a whole number:
    -1 is not found inside -1024)."""
    with pytest.raises(PackingError) as error:
        pack(make_examples([3, 4]), max_length, strategy)
    message = str(error.value)
    assert "--max_length" in message, message
    if max_length is None:
        assert "set --max_length" in message, message
    else:
        assert re.search(rf"(?<![\d-]){max_length}(?!\d)", message), message


def test_check_max_length_passes_good_values_through():
    assert check_max_length(1) == 1
    assert check_max_length(4096) == 4096


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(PackingError) as error:
        pack(make_examples([3]), 16, "first_fit")
    message = str(error.value)
    assert "first_fit" in message
    assert all(strategy in message for strategy in ("bfd", "bfd_split", "wrapped"))


def test_empty_examples_are_refused():
    """TRL's _pack_bfd filters out empty sequences silently; minisft refuses them and names the example
    (prepare_dataset never produces one: it drops examples with no trained token)."""
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [], "labels": []}]
    for strategy in ("bfd", "bfd_split", "wrapped"):
        with pytest.raises(PackingError, match="Example 1 has no tokens"):
            pack(examples, 4, strategy)
