"""Mixtures: several datasets, each drawn in its own proportion, as one training set.

A --config file may hold a `datasets:` list in the shape of TRL's dataset mixture (path, name, split), each
entry with an optional `proportion`: the fraction of the source an epoch holds. An epoch holds
round(proportion × examples) of a source: 2 repeats it twice, 0.5 takes half of it, a subset drawn with
the run's seed (the same examples for the same seed, others for another).

Each source is prepared as a lone dataset would be, and cached on its own (minisft/machinery/prepare.py);
only the prepared examples are mixed, so a new proportion prepares nothing again. The mixture is one
of the things that decide each step's examples: the run's data order records it (loop.data_order), and a
resume with another mixture is refused as a changed data order. Each example keeps its origin (file and line).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np

from minisft.errors import UserError
from minisft.sft.labels import IGNORE_INDEX

from .config import DataConfig, PackingConfig
from .prepare import PreparedDataset, PreparedSplits, PrepareStats, load_and_prepare
from .storage import TokenStorage

KEYS = ("path", "name", "split", "proportion")  # TRL's data_dir, data_files and columns are not read yet


class MixtureError(UserError):
    """A `datasets:` list that cannot be mixed: the entry and what is wrong with it."""


def check_entries(entries, where: str) -> list[dict]:
    """The `datasets:` list as {path, name, split, proportion} entries, or one line naming the entry at fault."""
    if not isinstance(entries, list) or not entries:
        raise MixtureError(f"{where}: datasets must be a list of sources, each with a path, got {entries!r}.")
    return [_checked(entry, f"{where}: datasets[{index}]") for index, entry in enumerate(entries)]


def _checked(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise MixtureError(f"{where} must be a mapping with a path, got {entry!r}.")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise MixtureError(f"{where}: unknown keys {unknown}; an entry takes {', '.join(KEYS)}.")
    path, proportion = entry.get("path"), entry.get("proportion", 1.0)
    if not isinstance(path, str) or not path:
        raise MixtureError(f"{where}: path must be a file, folder or hub dataset name, got {path!r}.")
    number = isinstance(proportion, (int, float)) and not isinstance(proportion, bool)
    if not number or not math.isfinite(proportion) or proportion <= 0:
        raise MixtureError(f"{where} ({path}): proportion must be a number > 0, got {proportion!r}.")
    for key in ("name", "split"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise MixtureError(f"{where} ({path}): {key} must be a string, got {entry[key]!r}.")
    return {"path": path, "name": entry.get("name"), "split": entry.get("split") or "train", "proportion": proportion}


def drawn(count: int, proportion: float, seed: int, index: int) -> np.ndarray:
    """The indices of a source's examples in one epoch: whole copies, then a seeded subset for the fraction left."""
    wanted = round(proportion * count)
    copies, rest = divmod(wanted, count) if count else (0, 0)
    subset = np.random.default_rng([seed, index]).choice(count, size=rest, replace=False) if rest else []
    return np.concatenate([np.tile(np.arange(count), copies), np.sort(subset)]).astype(np.int64)


def prepare_mixture(
    entries: list[dict], tokenizer, config: DataConfig, packing: PackingConfig | None, seed: int
) -> tuple[PreparedSplits, str]:
    """Each source prepared (and cached) alone, then mixed: the splits, and the line of counts per source."""
    sources = [_prepared(entry, tokenizer, config, packing, seed) for entry in entries]
    picks = [drawn(len(source.train.examples), entry["proportion"], seed, index)
             for index, (entry, source) in enumerate(zip(entries, sources))]  # fmt: skip
    train = _mixed([source.train for source in sources], picks)
    evals = [source.eval for source in sources if source.eval is not None]
    eval_split = _mixed(evals, [np.arange(len(split.examples)) for split in evals]) if evals else None
    line = (
        "data mixture: "
        + ", ".join(
            f"{entry['path']} {len(source.train.examples):,} × {entry['proportion']:g} = {len(pick):,}"
            for entry, source, pick in zip(entries, sources, picks)
        )
        + f" ({len(train.examples):,} examples an epoch)"
    )
    first = sources[0]
    notes = "; ".join(dict.fromkeys(source.cache_note for source in sources))
    added = list(dict.fromkeys(token for source in sources for token in source.added_tokens))
    blank = sum(source.skipped_blank_lines for source in sources)
    return dataclasses.replace(first, train=train, eval=eval_split, added_tokens=added, skipped_blank_lines=blank,
                               cache_note=notes), line  # fmt: skip


def _prepared(entry: dict, tokenizer, config: DataConfig, packing, seed: int) -> PreparedSplits:
    source = dataclasses.replace(
        config, datasets=None, dataset_name=entry["path"], dataset_config=entry["name"],
        dataset_train_split=entry["split"],
    )  # fmt: skip
    path = Path(entry["path"])
    try:
        return load_and_prepare(path if path.exists() else entry["path"], tokenizer, source, packing, seed)
    except UserError as error:  # a source the flags cannot apply to (text under assistant masks): named
        if entry["path"] in str(error):
            raise
        raise MixtureError(f"datasets: {entry['path']}: {error}") from None


def _mixed(splits: list[PreparedDataset], picks: list[np.ndarray]) -> PreparedDataset:
    """The picked examples of each split, one after another, in memory as the cache stores them (ids in their
    narrow dtype, a trained mask unless a source has labels of its own): the preparation's counts summed, the
    kept examples' counted again over the mixture."""
    ids, masks, lengths, origins = [], [], [], []
    stats = PrepareStats(drop_reasons=Counter())
    own_labels = any(split.examples.labels is not None for split in splits)
    for split, pick in zip(splits, picks):
        storage = split.examples
        stats.add(split.stats)
        starts, sizes = storage.offsets[:-1][pick].astype(np.int64), storage.lengths[pick].astype(np.int64)
        ends = np.cumsum(sizes)
        positions = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - sizes, sizes)
        positions += np.repeat(starts, sizes)
        tokens = storage.input_ids[positions]
        if own_labels:
            masks.append(storage.labels_between(0, len(storage.input_ids))[positions])
        else:
            masks.append(storage.trained[positions].astype(bool))
        ids.append(tokens)
        lengths.append(sizes)
        origins.extend(split.origins[int(index)] for index in pick)
    sizes = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mixed = np.concatenate(masks)
    stats.examples, stats.tokens = len(sizes), int(offsets[-1])
    stats.trained_tokens = int((mixed != IGNORE_INDEX).sum() if own_labels else mixed.sum())
    kept = {"labels": mixed} if own_labels else {"trained": mixed}
    examples = TokenStorage(np.concatenate(ids), offsets, **kept)
    return PreparedDataset(examples, stats, origins)
