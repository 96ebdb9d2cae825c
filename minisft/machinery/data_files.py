"""Reading a dataset: its files (or hub dataset, or Python rows), its splits, its rows as a stream.

Each row read becomes a canonical example in minisft/sft/examples.py; this module finds the rows
and says where each came from. Every row carries an "origin" such as "train.jsonl line 17" (or
"data.json item 3", "data.parquet row 5", "example 2"). Lines count from 1 like an editor; rows,
items and examples count from 0 like Python indexing.

Sources: a local .jsonl/.json/.parquet/.csv file or a folder of them, a hub dataset name,
a datasets.Dataset or DatasetDict, or a Python list of dicts. Text files are read as UTF-8;
a byte-order mark at the start (Windows editors write one) is skipped. As `datasets` does, a
.jsonl.gz, .json.gz or .csv.gz file is read through gzip, decompressed as it streams. A folder's
files go to splits by a keyword in their path (train, validation, test), as `datasets` assigns
them; its other files are left out, but named: the run's line of files read (folder_line) lists them.

Splits: train is --dataset_train_split; eval is a seeded --eval_split_size fraction held out of
train, or else the dataset's own --dataset_test_split. stream_splits checks a source as far as its
first rows and reads nothing more: preparation (machinery/prepare.py) streams the rows later.
load_splits reads a small dataset whole, for looking at it.

Bad input raises DataError with a message a user can act on (a JSON row nested too deeply for
Python's parser included); blank lines are skipped but counted: nothing is dropped without being counted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# datasets and pyarrow are imported inside the readers that need them (the hub, parquet): imported here they
# would add ~80 MB of memory and ~1 s to every run that reads JSONL, JSON or CSV.
from minisft.sft.examples import DataError, dataset_format, detect_format, normalize_example, normalize_rows

SPLIT_KEYWORDS = {  # as the `datasets` library assigns a folder's files to splits
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}


@dataclass
class Splits:
    train: list[dict]
    eval: list[dict] | None
    skipped_blank_lines: int  # blank lines in the files read; skipped, but counted
    format: str  # dataset_format() of every example, train and eval alike


# ----------------------------------------------------------------------------- reading files
# Each reader yields (origin, raw row) as it reads, and (origin, None) for a blank line: skipped, but counted.


def data_suffix(path: Path) -> str:
    """The suffix that says a file's format, under a .gz that says it is gzip-compressed: data.jsonl.gz -> .jsonl."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes[-1:] == [".gz"] and len(suffixes) >= 2:
        return suffixes[-2] + ".gz"
    return suffixes[-1] if suffixes else ""


def open_bytes(path: Path):
    """A data file's bytes, decompressed as they are read when it is gzip-compressed (.gz)."""
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


# What reading a .gz raises when the file is not gzip, is damaged, or was cut short.
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def not_gzip(path: Path, error: Exception) -> str:
    return f"{path}: not a readable gzip file ({error}); a .gz file must be gzip-compressed and whole"


def text_lines(path: Path, newline: str | None = None) -> Iterator[str]:
    """The lines of a UTF-8 text file. "utf-8-sig" skips a byte-order mark at the start, and reads the rest as UTF-8."""
    with open_bytes(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline=newline) as file:
        try:
            yield from file
        except UnicodeDecodeError:
            raise DataError(not_utf8(path)) from None
        except GZIP_ERRORS as error:
            raise DataError(not_gzip(path, error)) from None


def not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8 (line, byte offset, the byte), worded so that the user can fix it."""
    offset, where = 0, str(path)
    with open_bytes(path) as file:
        start = file.read(2)
        file.seek(0)
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")  # no byte of a multi-byte UTF-8 character is "\n": each line decodes alone
            except UnicodeDecodeError as error:
                where = f"{path} line {number}: byte {offset + error.start} (0x{line[error.start]:02x})"
                break
            offset += len(line)
    utf16 = " It starts like UTF-16 (what Windows calls Unicode)." if start in (b"\xff\xfe", b"\xfe\xff") else ""
    return f"{where} is not UTF-8. minisft reads UTF-8: save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8).{utf16}"


def too_deep(where: str) -> str:
    # json's parser recurses once per level of nesting: [[[[...]]]] a few thousand deep exhausts Python's stack.
    return f"{where}: JSON nested too deeply to read (more than {sys.getrecursionlimit()} levels of lists or objects)"


def read_json_lines(path: Path) -> Iterator[tuple[str, dict | None]]:
    for number, line in enumerate(text_lines(path), start=1):
        origin = f"{path} line {number}"
        if not line.strip():
            yield origin, None
            continue
        try:
            yield origin, json.loads(line.rstrip())
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
            raise DataError(f"{origin}: {problem}; each line must hold one JSON object") from None
        except RecursionError:
            raise DataError(too_deep(origin)) from None


def read_json(path: Path) -> Iterator[tuple[str, dict | None]]:
    """A .json file is either one JSON array of objects (read whole: JSON has no stream) or JSON lines."""
    try:
        with open_bytes(path) as file:  # bytes: a file that is not UTF-8 is reported by text_lines, with its line
            is_array = file.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    except GZIP_ERRORS as error:
        raise DataError(not_gzip(path, error)) from None
    if not is_array:
        yield from read_json_lines(path)
        return
    try:
        items = json.loads("".join(text_lines(path)))
    except json.JSONDecodeError as error:
        problem = f"not valid JSON ({error.msg} at column {error.colno})"
        raise DataError(f"{path} line {error.lineno}: {problem}") from None
    except RecursionError:
        raise DataError(too_deep(str(path))) from None
    yield from ((f"{path} item {index}", item) for index, item in enumerate(items))


def read_parquet(path: Path) -> Iterator[tuple[str, dict | None]]:
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {index}", row
                index += 1
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None


def read_csv(path: Path) -> Iterator[tuple[str, dict | None]]:
    # The csv module keeps every cell a string (a text column of digits stays text) and lets
    # us count blank lines and name lines; a quoted cell may span lines, so track the start.
    reader = csv.reader(text_lines(path, newline=""))  # newline="": the csv module reads the line endings itself
    header = next(reader, [])
    start_line = reader.line_num + 1
    for values in reader:
        origin, start_line = f"{path} line {start_line}", reader.line_num + 1
        if not values:
            yield origin, None
        elif len(values) != len(header):
            raise DataError(f"{origin}: {len(values)} fields, but the header has {len(header)} columns")
        else:
            yield origin, dict(zip(header, values))


READERS = {".jsonl": read_json_lines, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
# The text formats may come gzip-compressed, as `datasets` reads them: decompressed as they are read.
COMPRESSED = (".jsonl.gz", ".json.gz", ".csv.gz")
FILE_TYPES = ", ".join([*READERS, *COMPRESSED])
SHOWN_FILES = 10  # a folder's line names this many files of each kind, then counts the rest


def reader_of(path: Path):
    """The reader of a data file, by its suffix (under .gz for a compressed one); None: not a data file."""
    suffix = data_suffix(path)
    return READERS[suffix.removesuffix(".gz")] if suffix in READERS or suffix in COMPRESSED else None


def split_of(relative_path: Path) -> str:
    """The split a folder's file belongs to: a split keyword as a whole word of its path, else train."""
    words = re.split(r"[^a-z]+", str(relative_path.with_suffix("")).lower())
    return next((split for split, keywords in SPLIT_KEYWORDS.items() if set(keywords) & set(words)), "train")


def folder_files(path: Path) -> tuple[list[Path], list[Path]]:
    """A folder's data files, and its other files (left out, and said so); hidden files and folders are skipped."""
    visible = sorted(
        file
        for file in path.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    return [file for file in visible if reader_of(file)], [file for file in visible if not reader_of(file)]


def local_files(path: Path) -> list[Path]:
    """The data files of a file or folder source."""
    if not path.is_dir():
        if reader_of(path) is None:
            raise DataError(f"{path}: unsupported file type {data_suffix(path)!r}; use one of {FILE_TYPES}")
        return [path]
    files, others = folder_files(path)
    if not files:
        holds = f"; it holds {names(path, others)}" if others else ""
        raise DataError(f"{path}: no {', '.join(READERS)} files in this folder (nor their .gz{holds})")
    return files


def read_local(path: Path, train_split: str) -> dict[str, list]:
    splits: dict[str, list] = {}
    for file in local_files(path):
        split = split_of(file.relative_to(path)) if path.is_dir() else train_split
        splits.setdefault(split, []).append(FilePart(file))
    return splits


def names(folder: Path, files: list[Path]) -> str:
    """The files' paths inside `folder`, the first SHOWN_FILES of them."""
    shown = ", ".join(str(file.relative_to(folder)) for file in files[:SHOWN_FILES])
    return shown + (f" and {len(files) - SHOWN_FILES:,} more" if len(files) > SHOWN_FILES else "")


def folder_line(source, train_split: str = "train", test_split: str = "test", eval_split_size: float = 0.0):
    """For a folder source, one line: the files read (and the split each goes to), and those left out and why.
    None for any other source. Only the folder is listed: no file is opened."""
    if not isinstance(source, (str, Path)) or not Path(source).is_dir():
        return None
    folder = Path(source)
    files, others = folder_files(folder)
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(split_of(file.relative_to(folder)), []).append(file)
    evaluated = test_split if eval_split_size == 0 else None  # the dataset's own eval split, as stream_splits takes it
    read = [(split, by_split[split]) for split in (train_split, evaluated) if split in by_split]
    unread = [(split, files) for split, files in by_split.items() if split not in (train_split, evaluated)]
    held_out = f", {eval_split_size:.0%} held out for eval" if eval_split_size else ""
    line = f"data: read {sum(len(files) for _, files in read)} files from {folder}: " + "; ".join(
        f"{names(folder, files)} ({'eval' if split == evaluated else 'train' + held_out})" for split, files in read
    )
    left_out = [
        f"{names(folder, files)} (the {split!r} split; --dataset_test_split {split} reads it)"
        for split, files in unread
    ]
    left_out += [f"{names(folder, others)} (not {FILE_TYPES})"] if others else []
    return line + (f"; left out: {'; '.join(left_out)}" if left_out else "")


# ----------------------------------------------------------------------------- sources and splits


@dataclass
class FilePart:
    """A data file, read as a stream each time its rows are asked for; with `columns`, only those of each row."""

    path: Path
    columns: tuple[str, ...] | None = None

    def rows(self) -> Iterator[tuple[str, dict | None]]:
        rows = reader_of(self.path)(self.path)
        return rows if self.columns is None else (selected(origin, row, self.columns) for origin, row in rows)

    def count(self) -> int:
        # JSON lines: one row per non-blank line, counted without parsing JSON
        if data_suffix(self.path) in (".jsonl", ".jsonl.gz"):
            return sum(1 for line in text_lines(self.path) if line.strip())
        return sum(row is not None for _, row in self.rows())


@dataclass
class MemoryPart:
    """Rows already in memory (a list of dicts, a datasets.Dataset), numbered under `prefix`."""

    prefix: str
    items: Iterable[dict]

    def rows(self) -> Iterator[tuple[str, dict | None]]:
        return iter(numbered(self.prefix, self.items))

    def count(self) -> int:
        return len(self.items)


def selected(origin: str, row: dict | None, columns: tuple[str, ...]) -> tuple[str, dict | None]:
    """The row cut to `columns` (datasets' select_columns), refused naming the row if one is missing."""
    missing = [column for column in columns if row is not None and column not in row]
    if missing:
        raise DataError(
            f"{origin}: no column {missing[0]!r} (columns: selects {list(columns)}; the row has {sorted(row)})"
        )
    return origin, None if row is None else {column: row[column] for column in columns}


@dataclass
class FileSelection:
    """Files chosen by name for each split (a mixture entry's data_files or data_dir); `columns`: those kept."""

    name: str
    splits: dict[str, list[Path]]
    columns: tuple[str, ...] | None = None

    def files(self) -> list[Path]:
        return [file for files in self.splits.values() for file in files]


def numbered(prefix: str, rows: Iterable[dict]) -> Iterable[tuple[str, dict]]:
    return ((f"{prefix} {index}", row) for index, row in enumerate(rows))


def looks_like_hub_name(source: str) -> bool:
    # "name" or "org/name"; a trailing letters-only extension means a file the user meant.
    return bool(re.fullmatch(r"\w[\w.-]*(/[\w.-]+)?", source)) and not re.search(r"\.[A-Za-z]+$", source)


def read_splits(source, dataset_config: str | None, train_split: str) -> dict[str, list]:
    """Any source -> {split name: its parts (FilePart, MemoryPart)}; nothing is read until a part's rows are."""
    if isinstance(source, dict):  # a datasets.DatasetDict: split name → rows
        return {split: [MemoryPart(f"{split} example", rows)] for split, rows in source.items()}
    if isinstance(source, FileSelection):
        return {split: [FilePart(file, source.columns) for file in files] for split, files in source.splits.items()}
    if not isinstance(source, (str, Path)):  # a list of dicts or a datasets.Dataset
        return {train_split: [MemoryPart("example", source)]}
    path = Path(source)
    if path.exists():
        return read_local(path, train_split)
    if isinstance(source, Path) or not looks_like_hub_name(source):
        raise DataError(f"{source}: no such file or folder")
    import datasets

    try:
        dataset_dict = datasets.load_dataset(source, dataset_config)
    except Exception as error:  # offline, not found, bad config: load_dataset raises many types
        raise DataError(
            f"{source}: could not load this hub dataset ({error}). The Hugging Face hub may be unreachable "
            "from here; pass a local .jsonl, .json, .parquet or .csv file (or a folder of them) instead"
        ) from error
    return {split: [MemoryPart(f"{source}[{split}] example", rows)] for split, rows in dataset_dict.items()}


def held_out_rows(row_count: int, eval_split_size: float, seed: int, name: str) -> frozenset[int]:
    """Which of the train split's rows (by position) a seeded random `eval_split_size` fraction moves to eval."""
    eval_count = math.ceil(row_count * eval_split_size)  # rounds up, as datasets' train_test_split does
    if eval_count >= row_count:
        raise DataError(f"{name}: eval_split_size={eval_split_size} of {row_count} examples leaves none to train on")
    return frozenset(random.Random(seed).sample(range(row_count), eval_count))


@dataclass
class SplitStreams:
    """The splits of a source, not yet read: what preparation streams through, and what it needs to know first."""

    name: str  # the source, as the user named it
    train: list  # parts (FilePart, MemoryPart) of the train split
    eval: list | None  # parts of the dataset's own eval split, when it is used
    held_out: frozenset[int]  # positions of the train rows that go to eval instead (--eval_split_size)
    first: tuple[str, str]  # (raw format, origin) of the first train row: every row must share it
    format: str  # dataset_format() of every example, train and eval alike
    files: list[Path]  # the local files read, for the preparation cache's fingerprint


def rows_of(parts: list, blank_lines: list[int]) -> Iterator[tuple[str, dict]]:
    """The non-blank rows of `parts`, in order; blank lines are added to blank_lines[0]."""
    for part in parts:
        for origin, row in part.rows():
            if row is None:
                blank_lines[0] += 1
            else:
                yield origin, row


def first_row(parts: list, name: str, split: str, text_field: str) -> tuple[str, dict, str]:
    """(origin, canonical example, raw format) of a split's first row; a split without rows is an error."""
    blank_lines = [0]
    for origin, row in rows_of(parts, blank_lines):
        return origin, normalize_example(row, origin, text_field), detect_format(row, origin, text_field)
    skipped = f" ({blank_lines[0]} blank lines skipped)" if blank_lines[0] else ""
    raise DataError(f"{name}: the {split!r} split has no examples{skipped}")


def stream_splits(
    source,
    *,
    dataset_config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    eval_split_size: float = 0.0,
    seed: int = 42,
    text_field: str = "text",
) -> SplitStreams:
    """The splits of `source`, checked as far as their first rows; the rows themselves are read later, as a stream.

    Eval is a seeded `eval_split_size` fraction held out of train when that is > 0,
    otherwise the dataset's own `test_split` if it has one.
    """
    if not 0 <= eval_split_size < 1:
        raise DataError(f"eval_split_size must be a fraction in [0, 1), got {eval_split_size}")
    named = isinstance(source, (str, Path, FileSelection))
    name = (
        (source.name if isinstance(source, FileSelection) else str(source))
        if named
        else f"the given {type(source).__name__}"
    )
    parts = read_splits(source, dataset_config, train_split)
    if train_split not in parts:
        raise DataError(
            f"{name} has no split {train_split!r}; its splits are {sorted(parts)}. "
            "Choose one with --dataset_train_split"
        )
    origin, example, raw_format = first_row(parts[train_split], name, train_split, text_field)
    evaluation, held_out = None, frozenset()
    if eval_split_size > 0:
        held_out = held_out_rows(sum(part.count() for part in parts[train_split]), eval_split_size, seed, name)
    elif test_split in parts:
        evaluation = parts[test_split]
        eval_origin, eval_example, _ = first_row(evaluation, name, test_split, text_field)
        if dataset_format(eval_example) != dataset_format(example):
            raise DataError(
                f"{eval_origin}: the {test_split!r} split is {dataset_format(eval_example)} but the "
                f"{train_split!r} split is {dataset_format(example)}; both must share one format"
            )
    read = [*parts[train_split], *(evaluation or [])]
    return SplitStreams(
        name=name,
        train=parts[train_split],
        eval=evaluation,
        held_out=held_out,
        first=(raw_format, origin),
        format=dataset_format(example),
        files=[part.path for part in read if isinstance(part, FilePart)],
    )


def load_splits(source, **options) -> Splits:
    """Load `source` whole, as canonical train and eval examples (or None): stream_splits, read into lists.

    Preparation streams the rows instead (prepare.py); this is for looking at small datasets.
    """
    streams = stream_splits(source, **options)
    text_field, blank_lines = options.get("text_field", "text"), [0]
    train, held_out = [], []
    rows = normalize_rows(rows_of(streams.train, blank_lines), text_field, streams.first)
    for position, example in enumerate(rows):
        (held_out if position in streams.held_out else train).append(example)
    if streams.eval is not None:
        held_out = normalize_rows(rows_of(streams.eval, blank_lines), text_field, streams.first)
    return Splits(
        train=train,
        eval=held_out if streams.held_out or streams.eval is not None else None,
        skipped_blank_lines=blank_lines[0],
        format=streams.format,
    )
