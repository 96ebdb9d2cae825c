"""The preparation cache, the token storage, and worker processes (minisft/machinery/cache.py, storage.py, prepare.py).

Each test would fail with its feature off: a hit is shown by preparation never running, an
invalidation by preparation running again, workers by comparing with one process exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minisft.machinery import cache, pack_plans, prepare
from minisft.machinery.config import DataConfig, PackingConfig
from minisft.machinery.prepare import load_and_prepare, prepare_dataset
from minisft.machinery.storage import from_examples, id_dtype
from minisft.sft import packing
from minisft.sft.examples import DataError


def write_conversations(path, count: int, bad_line: int | None = None) -> None:
    lines = []
    for index in range(count):
        answer = " ".join(["word"] * (index % 40)) or "ok"
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Question {index}?"},
            {"role": "assistant", "content": f"Answer {index}: {answer}"},
        ]}))  # fmt: skip
    if bad_line is not None:
        lines[bad_line - 1] = '{"messages": [{"role": "robot", "content": "hi"}]}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    write_conversations(path, 30)
    return path


def prepared(data, tokenizer, cache_dir, packing_config=None, seed=42, **flags):
    config = DataConfig(cache_dir=str(cache_dir), **flags)
    return load_and_prepare(str(data), tokenizer, config, packing_config or PackingConfig(), seed)


def count_preparations(monkeypatch) -> list:
    calls = []
    real = prepare._write_splits
    monkeypatch.setattr(prepare, "_write_splits", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def test_second_run_reuses_the_preparation(data, fresh_tokenizer, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = prepared(data, fresh_tokenizer, cache_dir, assistant_only_loss=True, eval_split_size=0.2)
    calls = count_preparations(monkeypatch)
    second = prepared(data, fresh_tokenizer, cache_dir, assistant_only_loss=True, eval_split_size=0.2)
    assert not calls and "reused" in second.cache_note and "prepared and cached" in first.cache_note
    assert second.train.examples == first.train.examples and second.eval.examples == first.eval.examples
    assert list(second.train.origins) == list(first.train.origins)
    assert second.train.stats == first.train.stats
    # and what the cache returns is what preparing the examples in memory gives
    uncached = prepared(data, fresh_tokenizer, "none", assistant_only_loss=True, eval_split_size=0.2)
    assert "not cached" in uncached.cache_note and uncached.train.examples == second.train.examples


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 16},
        {"assistant_only_loss": False},
        {"eos_token": "<|endoftext|>"},
        {"eval_split_size": 0.3},
        {"seed": 7},  # the seed picks the held-out rows
        {"response_template": "<|im_start|>assistant\n", "assistant_only_loss": False},
        {"packing_strategy": "bfd_split"},  # bfd_split splits overlong examples: preparation keeps them whole
        {"file": "appended"},
        {"chat_template": "changed"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_change_prepares_afresh(data, fresh_tokenizer, tmp_path, monkeypatch, change):
    cache_dir, flags = tmp_path / "cache", {"assistant_only_loss": True, "eval_split_size": 0.2}
    before = prepared(data, fresh_tokenizer, cache_dir, **flags)
    calls = count_preparations(monkeypatch)
    change = dict(change)
    strategy = change.pop("packing_strategy", None)
    packing_config = PackingConfig(packing=True, packing_strategy=strategy) if strategy else PackingConfig()
    if change.pop("file", None):
        data.write_text(data.read_text(encoding="utf-8") * 2, encoding="utf-8")
    if change.pop("chat_template", None):
        fresh_tokenizer.chat_template = fresh_tokenizer.chat_template.replace("Hugging Face", "HF")
    after = prepared(data, fresh_tokenizer, cache_dir, packing_config, **{**flags, **change})
    assert calls and "prepared and cached" in after.cache_note
    assert after.train.examples.folder != before.train.examples.folder


def test_a_same_size_rewrite_is_seen(data, fresh_tokenizer, tmp_path, monkeypatch):
    """A file rewritten with the same size in the same clock tick keeps its mtime: its content is hashed too."""
    cache_dir = tmp_path / "cache"
    before = prepared(data, fresh_tokenizer, cache_dir)
    text = data.read_text(encoding="utf-8")
    stat = data.stat()
    data.write_text(text.replace("Question 3?", "Question 9?"), encoding="utf-8")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    calls = count_preparations(monkeypatch)
    after = prepared(data, fresh_tokenizer, cache_dir)
    assert calls and after.train.examples != before.train.examples


def test_the_training_seed_alone_does_not_invalidate(data, fresh_tokenizer, tmp_path, monkeypatch):
    prepared(data, fresh_tokenizer, tmp_path / "cache", seed=1)
    calls = count_preparations(monkeypatch)
    assert "reused" in prepared(data, fresh_tokenizer, tmp_path / "cache", seed=2, dataset_num_proc=2).cache_note
    assert not calls


def test_bfd_packing_reuses_the_unpacked_preparation(data, fresh_tokenizer, tmp_path, monkeypatch):
    """Preparation alone truncates: bfd packs the examples unpacked batches take, so one preparation serves both.
    bfd_split keeps overlong examples whole, so its preparation does not depend on --max_length."""
    cache_dir, bfd_split = tmp_path / "cache", PackingConfig(packing=True, packing_strategy="bfd_split")
    unpacked = prepared(data, fresh_tokenizer, cache_dir, max_length=16)
    whole = prepared(data, fresh_tokenizer, cache_dir, bfd_split, max_length=16)
    calls = count_preparations(monkeypatch)
    bfd = prepared(data, fresh_tokenizer, cache_dir, PackingConfig(packing=True), max_length=16)
    longer_rows = prepared(data, fresh_tokenizer, cache_dir, bfd_split, max_length=32)
    assert not calls
    assert bfd.train.examples.folder == unpacked.train.examples.folder and bfd.train.stats.truncated
    assert longer_rows.train.examples.folder == whole.train.examples.folder and not whole.train.stats.truncated


def test_an_interrupted_preparation_is_never_trusted(data, fresh_tokenizer, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real_append = prepare.StorageWriter.append

    def interrupted(self, *args):
        real_append(self, *args)  # half the files written, then the run is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.StorageWriter, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepared(data, fresh_tokenizer, cache_dir)
    monkeypatch.undo()
    assert not [folder for folder in cache_dir.iterdir()]  # nothing left that a later run could read
    # a preparation killed outright (kill -9) leaves its partial folder: it is never read, and is cleared
    killed = cache_dir / f".partial-{'0' * 24}-{cache.HOST}-999999999"
    killed.mkdir()
    (killed / "train").mkdir()
    calls = count_preparations(monkeypatch)
    again = prepared(data, fresh_tokenizer, cache_dir)
    assert calls and "prepared and cached" in again.cache_note and len(again.train.examples) == 30
    assert not killed.exists()
    assert again.train.examples == prepared(data, fresh_tokenizer, "none").train.examples


def test_workers_give_exactly_what_one_process_gives(tmp_path, fresh_tokenizer, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 16)  # several batches per worker from a small file
    data = tmp_path / "train.jsonl"
    write_conversations(data, 150)
    flags = {"assistant_only_loss": True, "max_length": 20, "eval_split_size": 0.1, "cache_dir": "none"}
    one = load_and_prepare(str(data), fresh_tokenizer, DataConfig(dataset_num_proc=1, **flags))
    two = load_and_prepare(str(data), fresh_tokenizer, DataConfig(dataset_num_proc=2, **flags))
    assert one.train.stats.truncated and one.train.stats.dropped  # the counts below are not all zero
    for split in ("train", "eval"):
        ours, theirs = getattr(one, split), getattr(two, split)
        assert ours.examples == theirs.examples and list(ours.origins) == list(theirs.origins)
        assert ours.stats == theirs.stats
    total = one.train.stats.examples + one.train.stats.dropped + one.eval.stats.examples + one.eval.stats.dropped
    assert total == 150


def test_an_error_in_a_worker_names_file_and_line(tmp_path, fresh_tokenizer, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 8)
    data = tmp_path / "train.jsonl"
    write_conversations(data, 80, bad_line=61)
    with pytest.raises(DataError, match=f"{data} line 61: .*unknown role 'robot'"):
        load_and_prepare(str(data), fresh_tokenizer, DataConfig(dataset_num_proc=2, cache_dir="none"))


def test_storage_holds_ids_in_the_smallest_type_and_own_labels_exactly(tokenizer):
    assert id_dtype(len(tokenizer) - 1) == np.uint16 and id_dtype(70_000) == np.uint32
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 9, 7]}, {"input_ids": [8], "labels": [8]}]
    assert from_examples(rows) == rows  # labels that are not the ids are kept as they are
    prepared_rows = prepare_dataset(rows, tokenizer)
    assert prepared_rows.examples == rows and prepared_rows.examples.labels is not None
    masked = prepare_dataset([{"prompt": "Hi", "completion": " there"}], tokenizer).examples
    # a 1-byte mask beside 2-byte ids
    assert masked.labels is None and masked.trained.dtype == np.uint8 and masked.input_ids.dtype == np.uint16


def test_fingerprint_is_the_content(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    same = prepare_dataset(rows, tokenizer).examples
    assert same.fingerprint() == from_examples(rows).fingerprint()
    moved = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}]
    assert from_examples(moved).fingerprint() != same.fingerprint()  # the same tokens, cut elsewhere


def test_a_packing_plan_is_kept_beside_cached_examples(data, fresh_tokenizer, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    examples = prepared(data, fresh_tokenizer, cache_dir, PackingConfig(packing=True)).train.examples
    first = pack_plans.pack_prepared(examples, 64, "bfd_split")
    assert list(packing.pack(list(examples), 64, "bfd_split").rows) == list(first.rows)  # as from plain lists
    monkeypatch.setattr(packing, "best_fit_decreasing", lambda *args: pytest.fail("the plan was made again"))
    again = pack_plans.pack_prepared(
        prepared(data, fresh_tokenizer, cache_dir, PackingConfig(packing=True)).train.examples, 64, "bfd_split"
    )
    assert list(again.rows) == list(first.rows) and again.stats == first.stats
