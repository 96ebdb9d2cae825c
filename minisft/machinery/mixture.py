"""Mixtures: several datasets, each drawn in its own proportion, as one training set.

A --config file may hold a `datasets:` list in the shape of TRL's dataset mixture: each entry has a path and
optionally name, split, data_dir, data_files and columns, which mean what they mean to datasets' load_dataset
(data_files and data_dir relative to a local folder path, or to the working folder when path is a builder
name such as json; columns keeps only those columns of each row). How much of each source an epoch holds:

    proportion p (minisft's)   round(p × examples) of the source: 2 repeats it twice, 0.5 takes half of
                               it, a subset drawn with the run's seed (the same examples for the same seed)
    fraction f (TRL's)         shares of the mixture, normalised to sum to 1 and never oversampling: with
                               w = f / Σf, the mixture holds N = min(examples / w) examples, the first
                               round(w × N) of each source; set on every entry or on none

Each source is prepared as a lone dataset would be, and cached on its own (minisft/machinery/prepare.py);
only the prepared examples are mixed, so a new proportion prepares nothing again, and "examples" above
counts a source's prepared examples (after --eval_split_size holds some out, and after any drop). The
mixture is one of the things that decide each step's examples: the run's data order records it
(loop.data_order) with each source's count, and a resume with another mixture is refused as a changed data
order. Each example keeps its origin (file and line).
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
from .data_files import FileSelection, local_files, split_of
from .prepare import PreparedDataset, PreparedSplits, PrepareStats, load_and_prepare
from .storage import TokenStorage

KEYS = ("path", "name", "split", "data_dir", "data_files", "columns", "proportion", "fraction")
BUILDERS = ("json", "csv", "parquet")  # datasets' generic builders that read the files minisft reads


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
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise MixtureError(f"{where}: path must be a file, folder or hub dataset name, got {path!r}.")
    where = f"{where} ({path})"
    if entry.get("proportion") is not None and entry.get("fraction") is not None:
        raise MixtureError(f"{where}: give proportion (minisft's) or fraction (TRL's), not both.")
    for key in ("proportion", "fraction"):
        value = entry.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise MixtureError(f"{where}: {key} must be a number > 0, got {value!r}.")
    for key in ("name", "split", "data_dir"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise MixtureError(f"{where}: {key} must be a string, got {entry[key]!r}.")
    columns = entry.get("columns")
    if columns is not None and (not isinstance(columns, list) or not columns
                                or not all(isinstance(column, str) for column in columns)):  # fmt: skip
        raise MixtureError(f"{where}: columns must be a list of column names, got {columns!r}.")
    files = entry.get("data_files")
    if files is not None and _file_names(files) is None:
        raise MixtureError(f"{where}: data_files must be a file name, a list of them, or a mapping from split names "
                           f"to them, got {files!r}.")  # fmt: skip
    checked = {key: entry.get(key) for key in KEYS} | {"split": entry.get("split") or "train"}
    # proportion 1 unless TRL's fraction is given: so a checked entry checks again the same (the loop re-checks)
    checked["proportion"] = entry.get("proportion") or (1.0 if entry.get("fraction") is None else None)
    return checked


def _file_names(files) -> dict[str, list[str]] | None:
    """data_files as {split: names}, as datasets reads it (a name or a list: the train split); None: not that shape."""

    def names(value):
        value = [value] if isinstance(value, str) else value
        return value if isinstance(value, list) and value and all(isinstance(name, str) for name in value) else None

    if isinstance(files, dict):
        by_split = {split: names(value) for split, value in files.items()}
        return (
            by_split
            if by_split and all(isinstance(split, str) and value for split, value in by_split.items())
            else None
        )
    return {"train": names(files)} if names(files) else None


def source_of(entry: dict):
    """What load_and_prepare reads for an entry: its path as given, or a FileSelection of the files it names."""
    path, folder = entry["path"], Path(entry["path"])
    if path in BUILDERS and entry["data_files"] is None and entry["data_dir"] is None:
        raise MixtureError(f"datasets: path {path!r} is a builder: name its files with data_files or data_dir.")
    if entry["data_files"] is None and entry["data_dir"] is None and entry["columns"] is None:
        return folder if folder.exists() else path
    if not folder.is_dir() and path not in BUILDERS:
        raise MixtureError(f"datasets: {path}: data_files, data_dir and columns need a local folder or one of the "
                           f"builders {', '.join(BUILDERS)} as the path.")  # fmt: skip
    base = folder if folder.is_dir() else Path(".")
    base = base / entry["data_dir"] if entry["data_dir"] else base
    if entry["data_files"] is None:
        files = local_files(base)
        splits: dict[str, list[Path]] = {}
        for file in files:
            splits.setdefault(split_of(file.relative_to(base)) if base.is_dir() else "train", []).append(file)
    else:
        splits = {split: _matched(base, names, path) for split, names in _file_names(entry["data_files"]).items()}
    columns = tuple(entry["columns"]) if entry["columns"] else None
    return FileSelection(f"{path} ({', '.join(str(file) for files in splits.values() for file in files)})",
                         splits, columns)  # fmt: skip


def read_from(entry: dict) -> str | Path:
    """The folder (or file, or hub name) an entry reads from: what its run's --output_dir must stay out of."""
    base = Path(".") if entry["path"] in BUILDERS else Path(entry["path"])
    return base / entry["data_dir"] if entry["data_dir"] else (entry["path"] if base == Path(".") else base)


def _matched(base: Path, names: list[str], path: str) -> list[Path]:
    """The files of data_files' names under `base`, glob patterns expanded as datasets does, each one checked."""
    files = []
    for name in names:
        found = sorted(base.glob(name)) if any(char in name for char in "*?[") else [base / name]
        if not found or not all(file.is_file() for file in found):
            raise MixtureError(f"datasets: {path}: data_files {name!r}: no such file under {base}.")
        files += [file for file in found if file not in files]
    return files


def drawn(count: int, proportion: float, seed: int, index: int) -> np.ndarray:
    """The indices of a source's examples in one epoch: whole copies, then a seeded subset for the fraction left."""
    wanted = round(proportion * count)
    copies, rest = divmod(wanted, count) if count else (0, 0)
    subset = np.random.default_rng([seed, index]).choice(count, size=rest, replace=False) if rest else []
    return np.concatenate([np.tile(np.arange(count), copies), np.sort(subset)]).astype(np.int64)


def picks_of(entries: list[dict], counts: list[int], seed: int) -> list[np.ndarray]:
    """Which examples of each source an epoch holds, by proportion or by TRL's fraction (module docstring)."""
    fractions = [entry["fraction"] for entry in entries]
    if all(fraction is None for fraction in fractions):
        return [drawn(count, entry["proportion"], seed, index)
                for index, (entry, count) in enumerate(zip(entries, counts))]  # fmt: skip
    if any(fraction is None for fraction in fractions):
        raise MixtureError("datasets: fraction must be set on every entry or on none (as TRL's mixtures require).")
    shares = [fraction / sum(fractions) for fraction in fractions]
    total = min(count / share for count, share in zip(counts, shares))
    return [np.arange(round(share * total), dtype=np.int64) for share in shares]


def prepare_mixture(
    entries: list[dict], tokenizer, config: DataConfig, packing: PackingConfig | None, seed: int
) -> tuple[PreparedSplits, str, list[dict]]:
    """Each source prepared (and cached) alone, then mixed: the splits, the line of counts per source, and each
    checked entry with its counts (examples, drawn an epoch): the checkpoint's record of the mixture."""
    entries = check_entries(entries, "datasets")  # the loop has checked them; a Python caller may not have
    sources = [_prepared(entry, tokenizer, config, packing, seed) for entry in entries]
    picks = picks_of(entries, [len(source.train.examples) for source in sources], seed)
    train = _mixed([source.train for source in sources], picks)
    evals = [source.eval for source in sources if source.eval is not None]
    eval_split = _mixed(evals, [np.arange(len(split.examples)) for split in evals]) if evals else None
    counted = [
        entry | {"examples": len(source.train.examples), "drawn": len(pick)}
        for entry, source, pick in zip(entries, sources, picks)
    ]
    line = "data mixture: " + ", ".join(
        f"{entry['path']} {entry['examples']:,} × {entry['proportion']:g} = {entry['drawn']:,}"
        if entry["fraction"] is None
        else f"{entry['path']} first {entry['drawn']:,} of {entry['examples']:,} (fraction {entry['fraction']:g})"
        for entry in counted
    )
    line += f" ({len(train.examples):,} examples an epoch)"
    first = sources[0]
    notes = "; ".join(dict.fromkeys(source.cache_note for source in sources))
    added = list(dict.fromkeys(token for source in sources for token in source.added_tokens))
    blank = sum(source.skipped_blank_lines for source in sources)
    splits = dataclasses.replace(first, train=train, eval=eval_split, added_tokens=added, skipped_blank_lines=blank,
                                 cache_note=notes)  # fmt: skip
    return splits, line, counted


def _prepared(entry: dict, tokenizer, config: DataConfig, packing, seed: int) -> PreparedSplits:
    source = dataclasses.replace(
        config, datasets=None, dataset_name=entry["path"], dataset_config=entry["name"],
        dataset_train_split=entry["split"],
    )  # fmt: skip
    try:
        return load_and_prepare(source_of(entry), tokenizer, source, packing, seed)
    except UserError as error:  # a source the flags cannot apply to (text under assistant masks): named
        if entry["path"] in str(error):
            raise
        raise MixtureError(f"datasets: {entry['path']}: {error}") from None


def _mixed(splits: list[PreparedDataset], picks: list[np.ndarray]) -> PreparedDataset:
    """The picked examples of each split, one after another, in memory as the cache stores them (ids in their
    narrow dtype, a trained mask unless a source has labels of its own): the preparation's counts summed, the
    kept examples' counted again over the mixture."""
    ids, masks, lengths, origins, weights = [], [], [], [], []
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
        weights.append(np.ones(len(pick)) if storage.weights is None else storage.weights[pick])  # the rows' `weight`
        origins.extend(split.origins[int(index)] for index in pick)
    sizes = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mixed = np.concatenate(masks)
    stats.examples, stats.tokens = len(sizes), int(offsets[-1])
    stats.trained_tokens = int((mixed != IGNORE_INDEX).sum() if own_labels else mixed.sum())
    kept = {"labels": mixed} if own_labels else {"trained": mixed}
    mixed_weights = np.concatenate(weights).astype(np.float64)
    kept["weights"] = None if (mixed_weights == 1).all() else mixed_weights  # all 1: the unweighted loss, bit for bit
    examples = TokenStorage(np.concatenate(ids), offsets, **kept)
    return PreparedDataset(examples, stats, origins)
