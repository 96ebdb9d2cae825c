"""Pre-tokenized rows: minisft trains them as TRL 1.16 does, checked on the same rows against a real SFTTrainer.

TRL takes a dataset with an `input_ids` column as already tokenized and skips formatting. Its labels are the
row's own `labels` when it has them; otherwise `assistant_masks` always applies and `completion_mask` only
with completion_only_loss=True (its default, None, means "prompt/completion data", which these rows are
not). Then it truncates to max_length and drops rows left with nothing to train on. Nothing here is copied
from TRL's output by hand: every expected row is TRL's own.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="the parity tests compare against TRL: pip install 'minisft[test]'")

from minisft.machinery.config import DataConfig  # noqa: E402
from minisft.machinery.data_files import load_splits  # noqa: E402
from minisft.machinery.prepare import prepare_dataset  # noqa: E402
from minisft.sft.labels import IGNORE_INDEX  # noqa: E402
from tests.trl_reference import assert_same_examples, trl_prepared_rows  # noqa: E402

TRUNCATE_AT = 13
PAIRS = [
    ("Q: What is 2+2?\nA:", " 4"),
    ("Translate to Chinese: I learned it.\n", "我学会了"),
    ("Name a colour.\n", " Blue, like the sky."),
    # A prompt longer than TRUNCATE_AT: truncation leaves nothing of the completion.
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen\n", " fifteen"),
]


@pytest.fixture(scope="module")
def encoded(tokenizer):
    """(prompt ids, completion ids) per pair, tokenized apart so that the boundary is exact."""
    return [(tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]) for prompt, completion in PAIRS]


def rows_with(encoded, *columns):
    """Pre-tokenized rows holding input_ids and the named columns, built from the prompt/completion split."""
    rows = []
    for index, (prompt, completion) in enumerate(encoded):
        row = {"input_ids": prompt + completion}
        if "labels" in columns:
            row["labels"] = [IGNORE_INDEX] * len(prompt) + completion
        if "completion_mask" in columns:
            row["completion_mask"] = [0] * len(prompt) + [1] * len(completion)
        if "assistant_masks" in columns:
            # Something other than the completion mask, so that combining the two shows: every other token.
            row["assistant_masks"] = [(position + index) % 2 for position in range(len(prompt + completion))]
        rows.append(row)
    return rows


def compare(rows, tokenizer, **config):
    config.setdefault("max_length", 1024)
    theirs = trl_prepared_rows(rows, tokenizer, **config)
    prepared = prepare_dataset(load_splits(rows).train, tokenizer, DataConfig(**config))
    assert_same_examples(tokenizer, prepared, theirs)
    return prepared, theirs


def test_input_ids_alone_train_every_token(tokenizer, encoded):
    prepared, theirs = compare(rows_with(encoded), tokenizer)
    assert all(row["labels"] == row["input_ids"] for row in theirs)
    assert len(theirs) == len(PAIRS)


def test_labels_are_trained_as_they_are(tokenizer, encoded):
    rows = rows_with(encoded, "labels", "completion_mask")  # labels win over any mask the row also holds
    rows.append(
        {
            "input_ids": rows[0]["input_ids"],
            "labels": [IGNORE_INDEX] * len(rows[0]["input_ids"]),
            "completion_mask": rows[0]["completion_mask"],
        }
    )  # nothing to train on: dropped by both
    prepared, theirs = compare(rows, tokenizer)
    assert len(theirs) == len(PAIRS) and prepared.stats.dropped == 1
    assert [row["labels"] for row in theirs] == [row["labels"] for row in rows[: len(PAIRS)]]


@pytest.mark.parametrize("completion_only_loss", [None, True, False])
def test_completion_mask_applies_only_with_completion_only_loss(tokenizer, encoded, completion_only_loss):
    prepared, theirs = compare(
        rows_with(encoded, "completion_mask"), tokenizer, completion_only_loss=completion_only_loss
    )
    masked = any(IGNORE_INDEX in row["labels"] for row in theirs)
    assert masked == (completion_only_loss is True)
    # Left out, it is counted: inspect shows it.
    assert prepared.stats.completion_mask_unused == (0 if completion_only_loss else len(PAIRS))


@pytest.mark.parametrize("completion_only_loss", [None, True])
def test_assistant_masks_always_apply_and_combine_with_the_completion_mask(tokenizer, encoded, completion_only_loss):
    rows = rows_with(encoded, "completion_mask", "assistant_masks")
    prepared, theirs = compare(rows, tokenizer, completion_only_loss=completion_only_loss)
    assert all(IGNORE_INDEX in row["labels"] for row in theirs)


def test_truncation_and_dropping(tokenizer, encoded):
    rows = rows_with(encoded, "completion_mask")
    # Built so that two rows are cut with some completion left, and the last one loses all of it.
    assert sum(len(row["input_ids"]) > TRUNCATE_AT for row in rows[:-1]) == 2
    assert len(encoded[-1][0]) >= TRUNCATE_AT
    prepared, theirs = compare(rows, tokenizer, completion_only_loss=True, max_length=TRUNCATE_AT)
    assert len(theirs) == len(PAIRS) - 1
    assert prepared.stats.dropped == 1 and prepared.stats.truncated == 3
    assert all(len(row["input_ids"]) <= TRUNCATE_AT for row in theirs)
