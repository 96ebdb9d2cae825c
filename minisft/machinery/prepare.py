"""Preparation: canonical examples become what training consumes, `input_ids` and `labels`.

    raw row ──examples──▶ canonical example ──chat_template──▶ token ids ──labels──▶ labels ──▶ cut, drop

Each step is decided by the lesson's file of that name in minisft/sft (examples.py, chat_template.py,
labels.py); this module runs them over a whole dataset.

This is the one stage that cuts examples to --max_length, in every mode (cut_lengths): padded
and padding-free batches and bfd packing take the truncated examples; bfd_split and wrapped,
which split an overlong example over rows instead, get it whole.

Every decision is counted, never silent: examples truncated to --max_length (and the tokens
cut), examples dropped because no token is left to train on (and why), examples where a
response template was never found. A training example whose row gives it weight 0 is dropped
too ("of weight 0"): leaving it out is what weight 0 means (sft/loss.py); each kept example's
weight is stored beside its tokens. The eval split's examples all weigh 1: eval_loss counts
every token once, as transformers' does. `python -m minisft.inspect` prints exactly this output.

At scale: the raw rows are read as a stream and prepared in batches of BATCH_ROWS (one
tokenizer call per batch), by --dataset_num_proc worker processes that return their batches
in order, so the output and every count are those of one process. The kept examples go
straight into flat arrays on disk (minisft/machinery/storage.py), which the cache (minisft/machinery/cache.py)
keeps for the next run with the same files, tokenizer and flags.

Preparation is guarded where it meets the world. A chat template that renders one row for more
than ROW_RENDER_SECONDS stops with that row's file and line (a SIGALRM timer around each
batch's render; a batch past BATCH_RENDER_SECONDS is rendered again a row at a time to find
it). Ctrl-C or SIGTERM unwinds it: the partial cache folder is removed, the workers (which
ignore SIGINT) are stopped without a traceback each. A data file whose size or mtime changed
between the start and the end is refused, and nothing is cached from it. A cache that cannot
be written (a full disk, a read-only folder) gives a preparation that is not kept, with one line
saying why. After PROGRESS_AFTER seconds, a line every PROGRESS_EVERY seconds shows the pace.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minisft.machinery import cache
from minisft.sft.chat_template import Formatted, format_batch, format_example, resolve_eos_token, setup_chat_template
from minisft.sft.examples import DataError, check_same_format, dataset_format, normalize_example
from minisft.sft.labels import (
    IGNORE_INDEX,
    MaskingError,
    MaskPlan,
    check_own_labels,
    cut,
    drop_reason,
    example_labels,
    plan_masks,
)

from .config import DataConfig, PackingConfig, TrainingConfig
from .data_files import FileSelection, local_files, rows_of, stream_splits
from .storage import (
    DamagedFile,
    StorageWriter,
    TokenStorage,
    WriteFailed,
    id_dtype,
    open_storage,
    open_unkept,
    scratch_folder,
    writing,
)

BATCH_ROWS = 256  # rows per tokenizer call and per task sent to a worker
# --dataset_num_proc's default: one process below this much data (starting workers costs more than it saves).
PARALLEL_FROM_BYTES = 8 << 20
MAX_DEFAULT_PROCESSES = 8
# A row renders and tokenizes in 0.1-0.5 ms (SmolLM2's ChatML, 80-440 tokens); a 100,000-token conversation in
# 0.35 s, a 1,000,000-token one in 4.6 s. A row still rendering after 10 s is a template that loops, not a
# long row. A batch of 256 rows takes 30-140 ms (1.5 s at 4,000 tokens a row): one past 60 s is rendered
# again a row at a time to find the row, so a template that never ends is stopped within ~70 s.
ROW_RENDER_SECONDS = 10.0
BATCH_RENDER_SECONDS = 60.0
PROGRESS_AFTER = 5.0  # seconds before the first progress line: a small dataset prepares without one
PROGRESS_EVERY = 10.0


@dataclass
class PrepareStats:
    examples: int = 0  # kept: what training will see
    tokens: int = 0  # in kept examples, after truncation
    trained_tokens: int = 0  # labels != -100
    truncated: int = 0  # examples longer than max_length
    truncated_tokens: int = 0  # tokens cut off by truncation
    dropped: int = 0
    drop_reasons: Counter = field(default_factory=Counter)
    response_template_missing: int = 0
    completion_mask_unused: int = 0  # pre-tokenized rows whose completion_mask --completion_only_loss would apply
    reasoning_dropped: int = 0  # reasoning traces (assistant turns' reasoning_content) that --drop_reasoning left out

    def add(self, other: PrepareStats) -> None:
        """Count `other`'s examples too: workers' figures add up to one process's exactly."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class PreparedDataset:
    examples: Sequence[dict]  # a TokenStorage: {"input_ids": [...], "labels": [...]} per example, read on demand
    stats: PrepareStats
    origins: Sequence[str] = field(default_factory=list)  # where each kept example came from


@dataclass
class _Job:
    """What preparing any batch needs, decided once in the main process and handed to every worker."""

    tokenizer: object
    vocab_size: int  # len(tokenizer), which pre-tokenized rows' own labels are checked against
    plan: MaskPlan
    eos_token: str | None
    cut_to: dict[str, int | None]  # split -> the length its examples are truncated to (cut_lengths)
    text_field: str
    add_special_tokens: bool  # --add_special_tokens: text and prompt/completion encoded with them
    first: tuple[str, str] | None  # (raw format, origin) every raw row must share; None: rows are canonical
    own_labels: bool  # pre-tokenized rows with their own labels: stored as they are, not as a trained mask
    drop_reasoning: bool  # --drop_reasoning: the messages' reasoning_content is removed before rendering


@dataclass
class _Encoded:
    """One batch's kept examples of one split, laid end to end, with their figures."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    origins: list[str]
    weights: np.ndarray
    stats: PrepareStats


def prepare_dataset(
    examples: list[dict], tokenizer, config: DataConfig | None = None, truncate: bool = True
) -> PreparedDataset:
    """Format, mask, truncate to max_length, drop, count. truncate=False keeps overlong examples whole, for a
    packer that splits them (bfd_split, wrapped).

    For canonical examples already in memory (load_splits, the Python API); nothing is cached.
    """
    config = config or DataConfig()
    if not examples:
        return PreparedDataset(TokenStorage(np.zeros(0, np.int64), np.zeros(1, np.int64)), PrepareStats())
    job = _job(examples[0], tokenizer, config, {"train": config.max_length if truncate else None}, first_row=None)
    batches = _batches(((example.get("origin", f"example {index}"), example) for index, example in enumerate(examples)),
                       frozenset(), "train")  # fmt: skip

    def prepare(folder: Path) -> None:
        _check_templates_found(job, examples[0], _write_splits(job, batches, {"train": folder}, num_proc=1)["train"])

    storage, origins, meta = open_unkept(_in_scratch(prepare))
    return PreparedDataset(storage, _stats_from(meta["stats"]), origins)


def _template_not_found_message(plan: MaskPlan, first: dict, tokenizer, eos_token, stats: PrepareStats) -> str:
    sample = format_example(first, tokenizer, eos_token).input_ids[:60]
    shown = " ".join(f"{token}:{tokenizer.decode([token])!r}" for token in sample)
    variants = " or ".join(str(variant) for variant in plan.response_variants)
    return (
        f"The response template {plan.response_template!r} was not found in {stats.response_template_missing} of "
        f"{stats.examples + stats.dropped} examples, so they have nothing to train on.\n"
        f"It tokenizes as {variants}.\n"
        f"The first example ({first.get('origin', 'example 0')}) tokenizes as:\n  {shown}\n"
        "Pick a template whose token ids appear in the examples, or pass the ids as they appear there, "
        "as a JSON list: --response_template '[id, id, ...]'."
    )


def _check_templates_found(job: _Job, first: dict, stats: PrepareStats) -> None:
    """Most examples without the response template means a template that does not match: stop and show why."""
    if job.plan.response_variants and stats.response_template_missing * 2 > stats.examples + stats.dropped:
        raise MaskingError(_template_not_found_message(job.plan, first, job.tokenizer, job.eos_token, stats))


# ----------------------------------------------------------------------------- one batch (in a worker or not)


def _job(first: dict, tokenizer, config: DataConfig, cut_to: dict[str, int | None], first_row) -> _Job:
    """The job for a dataset whose first canonical example is `first`."""
    if dataset_format(first) == "tokenized":
        _check_tokenized_flags(
            set(first), config.completion_only_loss, config.assistant_only_loss, config.response_template
        )
    return _Job(
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        plan=plan_masks(
            dataset_format(first),
            set(first),
            tokenizer,
            completion_only_loss=config.completion_only_loss,
            assistant_only_loss=config.assistant_only_loss,
            response_template=_parse_template(config.response_template),
            instruction_template=_parse_template(config.instruction_template),
            mask_history=config.mask_history,
        ),
        eos_token=resolve_eos_token(tokenizer, config.eos_token),
        cut_to=cut_to,
        text_field=config.dataset_text_field,
        add_special_tokens=config.add_special_tokens,
        first=first_row,
        own_labels=dataset_format(first) == "tokenized" and "labels" in first,
        drop_reasoning=config.drop_reasoning,
    )


def _check_tokenized_flags(
    columns: set, completion_only_loss: bool | None, assistant_only_loss: bool, response_template: str | list | None
) -> None:
    """Masking flags that pre-tokenized rows cannot honour are errors, not silently ignored flags."""
    if assistant_only_loss:
        raise MaskingError(
            "--assistant_only_loss needs conversations; these rows are pre-tokenized. Their 'assistant_masks' "
            "column, if they have one, is applied without the flag."
        )
    if "labels" in columns:
        flags = {"--completion_only_loss": completion_only_loss, "--response_template": response_template}
        given = [flag for flag, value in flags.items() if value]
        if given:
            raise MaskingError(
                "These pre-tokenized rows carry their own labels, which are trained as they are; "
                f"drop {' and '.join(given)}."
            )
    elif completion_only_loss and "completion_mask" not in columns:
        raise MaskingError(
            "--completion_only_loss on pre-tokenized rows needs their 'completion_mask' column (1 on completion "
            "tokens); these rows have none."
        )


def _parse_template(template: str | list[int] | None) -> str | list[int] | None:
    """--response_template / --instruction_template as labels.plan_masks takes them: a JSON list of token ids, or
    else the string itself."""
    if isinstance(template, str) and template.lstrip().startswith("["):
        try:
            ids = json.loads(template)
        except json.JSONDecodeError:
            return template
        if isinstance(ids, list) and ids and all(isinstance(token, int) for token in ids):
            return ids
    return template


def _prepare_batch(job: _Job, batch: list[tuple[str, dict, str]]) -> dict[str, _Encoded]:
    """(origin, row, split) triples -> each split's kept examples, in order. Raw rows are normalised first."""
    if job.first is not None:
        for origin, row, _ in batch:
            check_same_format(row, origin, job.text_field, job.first)
        examples = [normalize_example(row, origin, job.text_field) for origin, row, _ in batch]
    else:
        examples = [row for _, row, _ in batch]
    traces = [0] * len(examples)
    if job.drop_reasoning:  # before rendering, so no template sees them; counted, as all that is left out
        examples, traces = map(list, zip(*map(_without_reasoning, examples)))
    formatted = _formatted(job, examples, [origin for origin, _, _ in batch])
    kept: dict[str, tuple[list, list, list, list]] = {}
    stats: dict[str, PrepareStats] = {}
    for (origin, _, split), one, example_traces, canonical in zip(batch, formatted, traces, examples):
        split_stats = stats.setdefault(split, PrepareStats())
        split_stats.reasoning_dropped += example_traces
        example = _finish_example(job, one, canonical, origin, split, split_stats)
        if example is not None:
            ids, labels, origins, weights = kept.setdefault(split, ([], [], [], []))
            ids.append(example[0])
            labels.append(example[1])
            origins.append(origin)
            weights.append(example[2])
    return {split: _encoded(*kept.get(split, ([], [], [], [])), stats[split]) for split in stats}


def _without_reasoning(example: dict) -> tuple[dict, int]:
    """The example without its messages' reasoning_content (a copy: the caller's example is theirs), and how many
    traces that left out."""
    stripped, traces = dict(example), 0
    for key in ("messages", "prompt", "completion"):
        if isinstance(example.get(key), list):
            traces += sum(bool(message.get("reasoning_content")) for message in example[key])
            stripped[key] = [{k: v for k, v in message.items() if k != "reasoning_content"} for message in example[key]]
    return stripped, traces


class _Overtime(BaseException):
    """A render ran out of time. Not an Exception: no `except Exception` of a template library may swallow it."""


@contextmanager
def _time_limit(seconds: float):
    """Raise _Overtime inside the block once `seconds` have passed. A SIGALRM timer interrupts pure Python, which a
    looping Jinja template is. Only a process's main thread gets signals (each worker is a process of its own);
    elsewhere the block runs unbounded. A timer set before (pytest-timeout's, say) is set again after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Overtime

    previous, started = signal.signal(signal.SIGALRM, expire), time.monotonic()
    earlier, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if earlier:
            signal.setitimer(signal.ITIMER_REAL, max(earlier - (time.monotonic() - started), 1e-3))


def _formatted(job: _Job, examples: list[dict], origins: list[str]) -> list[Formatted]:
    """format_batch under BATCH_RENDER_SECONDS; past that, the rows one at a time, each under ROW_RENDER_SECONDS,
    so that a row whose template never ends is named."""
    render = lambda rows: format_batch(  # noqa: E731
        rows, job.tokenizer, job.eos_token, assistant_mask=job.plan.generation_tags,
        add_special_tokens=job.add_special_tokens,
    )  # fmt: skip
    try:
        with _time_limit(BATCH_RENDER_SECONDS):
            return render(examples)
    except _Overtime:
        pass
    formatted = []
    for origin, example in zip(origins, examples):
        try:
            with _time_limit(ROW_RENDER_SECONDS):
                formatted += render([example])
        except _Overtime:
            took = f"took more than {ROW_RENDER_SECONDS:g} s"
            if "conversational" in dataset_format(example):
                problem = f"the chat template {took} to render one row; it may loop forever"
            else:  # no template: only the tokenizer ran, on a row too long to be meant
                problem = f"tokenizing this row {took}"
            raise DataError(f"{origin}: {problem}") from None
    return formatted


def _finish_example(job: _Job, formatted: Formatted, example: dict, origin: str, split: str, stats: PrepareStats):
    """Labels, truncation, and the drop decision for one example (labels.py makes them; they are counted here):
    (input_ids, labels, weight), or None when dropped. `example` is the canonical one, whose messages may switch
    turns and whose "weight" counts in training (evaluation weighs every example 1)."""
    if formatted.labels is not None:
        check_own_labels(formatted.labels, job.vocab_size, origin)
    switches = _message_switches(example, origin, job.plan.locates_turns)
    uncut_labels, template_missing, completion_mask_unused = example_labels(formatted, job.plan, switches, origin)
    stats.response_template_missing += template_missing
    stats.completion_mask_unused += completion_mask_unused
    input_ids, labels = cut(formatted.input_ids, uncut_labels, job.cut_to[split])
    if len(input_ids) < len(formatted.input_ids):
        stats.truncated += 1
        stats.truncated_tokens += len(formatted.input_ids) - len(input_ids)
    trained = len(labels) - labels.count(IGNORE_INDEX)
    weight = example.get("weight", 1.0) if split == "train" else 1.0
    reason = drop_reason(trained, uncut_labels, job.plan, template_missing) or ("of weight 0" if not weight else None)
    if reason is not None:
        stats.dropped += 1
        stats.drop_reasons[reason] += 1
        return None
    stats.examples += 1
    stats.tokens += len(input_ids)
    stats.trained_tokens += trained
    return input_ids, labels, weight


def _message_switches(example: dict, origin: str, located: bool) -> list[bool | None]:
    """Each assistant message's own say on whether its turn is trained, as axolotl reads it (`weight` 0 or 1,
    `train` false or true), for labels.example_labels; None where it says nothing. Another role may say only
    0/false, which the assistant masks do already: only assistant turns are located."""
    parts = [example.get(key) for key in ("messages", "prompt", "completion")]  # a prompt's turns come first
    switches = []
    for index, message in enumerate(message for part in parts if isinstance(part, list) for message in part):
        says = {key: message[key] for key in ("weight", "train") if key in message}
        at = f"{origin}: message {index} ({message['role']})"
        if len({bool(value) for value in says.values()}) > 1 or not all(
            value in (0, 1) and (type(value) is bool) == (key == "train") for key, value in says.items()
        ):
            raise MaskingError(f"{at} has {says}: a weight is 0 or 1, a train false or true (and the two agree)")
        if says and not located:
            raise MaskingError(
                f"{at} has {' and '.join(says)}, which needs each assistant turn located: add --assistant_only_loss, "
                "or --response_template with --instruction_template"
            )
        switch = bool(next(iter(says.values()))) if says else None
        if message["role"] == "assistant":
            switches.append(switch)
        elif switch:
            raise MaskingError(f"{at} is marked to be trained ({' and '.join(says)}); only assistant turns can be")
    return switches


def _encoded(
    ids: list[list[int]], labels: list[list[int]], origins: list[str], weights: list[float], stats: PrepareStats
) -> _Encoded:
    flat = lambda lists: np.fromiter(itertools.chain.from_iterable(lists), np.int64, stats.tokens)  # noqa: E731
    lengths = np.array([len(i) for i in ids], np.int64)
    return _Encoded(flat(ids), flat(labels), lengths, origins, np.array(weights, np.float64), stats)


# ----------------------------------------------------------------------------- a whole dataset, in batches


def _batches(rows: Iterator[tuple[str, dict]], held_out: frozenset[int], split: str):
    """Rows in lists of BATCH_ROWS (origin, row, split) triples; the rows at positions in held_out go to eval."""
    batch = []
    for position, (origin, row) in enumerate(rows):
        batch.append((origin, row, "eval" if position in held_out else split))
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


_worker_job: _Job | None = None  # a worker process's job, set once when it starts


def _start_worker(job: _Job) -> None:
    global _worker_job
    # Ctrl-C reaches every process of the terminal's group: only the parent unwinds, and stops the workers with
    # SIGTERM, which must end a worker at once (not run the handler of the parent it was forked from).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_job = job


def _run_in_worker(batch: list) -> dict[str, _Encoded]:
    return _prepare_batch(_worker_job, batch)


def _results(job: _Job, batches, num_proc: int) -> Iterator[dict[str, _Encoded]]:
    """Each batch's result, in the batches' order, from num_proc worker processes (or this one). Closing the
    generator (an error or Ctrl-C in its consumer) terminates the workers."""
    if num_proc <= 1:
        yield from (_prepare_batch(job, batch) for batch in batches)
        return
    # fork: the workers start with the tokenizer already loaded (spawn would import transformers again in each).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, initializer=_start_worker, initargs=(job,)) as pool:
        pending: deque = deque()
        for batch in batches:  # at most 2 batches per worker in flight: the rows are read as they are needed
            pending.append((batch, pool.apply_async(_run_in_worker, (batch,))))
            if len(pending) >= 2 * num_proc:
                yield _result_of(*pending.popleft())
        while pending:
            yield _result_of(*pending.popleft())


def _result_of(batch: list, result) -> dict[str, _Encoded]:
    try:
        return result.get()
    except RecursionError:  # pickle recurses once per level of nesting, as json's parser does, but from deeper
        raise DataError(
            f"{batch[0][0]} to {batch[-1][0]}: a row nested too deeply (hundreds of levels of lists or objects) to "
            "send to a worker process; prepare it with --dataset_num_proc 1, or flatten it"
        ) from None


class _Progress:
    """A plain line on stderr every PROGRESS_EVERY seconds once preparation has run PROGRESS_AFTER: a slow step
    shows, in a terminal and in a log file alike. Under torchrun only rank 0 speaks (RANK, as torchrun sets it)."""

    def __init__(self, data_bytes: int):
        self.start, self.rows, self.data_bytes = time.monotonic(), 0, data_bytes
        self.next_line = self.start + PROGRESS_AFTER if os.environ.get("RANK", "0") == "0" else float("inf")

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now >= self.next_line:
            self.next_line = now + PROGRESS_EVERY
            size = f" (the data files hold {self.data_bytes / 1e6:,.0f} MB)" if self.data_bytes else ""
            print(f"data: {self.rows:,} rows prepared in {now - self.start:.0f} s{size}", file=sys.stderr, flush=True)


def _write_splits(
    job: _Job, batches, folders: dict[str, Path], num_proc: int, data_bytes: int = 0
) -> dict[str, PrepareStats]:
    """Prepare every batch and append its examples to its split's storage in `folders`; the splits' figures."""
    dtype = id_dtype(len(job.tokenizer) - 1)
    writers = {split: StorageWriter(folder, dtype, job.own_labels) for split, folder in folders.items()}
    stats = {split: PrepareStats() for split in folders}
    progress = _Progress(data_bytes)
    with closing(_results(job, batches, num_proc)) as results:
        for result in results:
            for split, encoded in result.items():
                writers[split].append(
                    encoded.input_ids, encoded.labels, encoded.lengths, encoded.origins, encoded.weights
                )
                stats[split].add(encoded.stats)
            progress.add(sum(encoded.stats.examples + encoded.stats.dropped for encoded in result.values()))
    for split, writer in writers.items():
        writer.finish({"stats": {**vars(stats[split]), "drop_reasons": dict(stats[split].drop_reasons)}})
    return stats


@dataclass
class PreparedSplits:
    train: PreparedDataset
    eval: PreparedDataset | None
    added_tokens: list[str]  # special tokens the ChatML fallback added: the model's embeddings must grow
    skipped_blank_lines: int
    # one line for the run's opening: whether the preparation was reused, prepared, or not kept (and what
    # --drop_reasoning left out)
    cache_note: str = ""


def cut_lengths(max_length: int | None, packing: PackingConfig) -> dict[str, int | None]:
    """What each split's examples are truncated to: the one decision of what is cut, for every mode.

    max_length, but nothing for a split that bfd_split or wrapped packs: they split an overlong example over
    rows, keeping every token, as TRL's do. bfd packs the truncated examples that unpacked batches would take
    (TRL's bfd truncates in its packer; the rows are the same).
    """
    splits_overlong = packing.packing_strategy in ("bfd_split", "wrapped")
    return {split: None if splits_overlong and packing.packs(split) else max_length for split in ("train", "eval")}


def load_and_prepare(
    source, tokenizer, config: DataConfig, packing: PackingConfig | None = None, seed: int = TrainingConfig.seed
) -> PreparedSplits:
    """From a dataset source to prepared train and eval splits: the whole data side of a run.

    Each split is truncated as cut_lengths decides for `packing`; `seed` (training's --seed) picks the rows
    --eval_split_size holds out. A preparation of local files is kept in the cache (minisft/machinery/cache.py) and
    reused while its inputs stay the same and its files intact.
    """
    cut_to = cut_lengths(config.max_length, packing or PackingConfig())
    before = _file_states(source)  # before any row is read, or counted for --eval_split_size
    streams = stream_splits(
        source,
        dataset_config=config.dataset_config,
        train_split=config.dataset_train_split,
        test_split=config.dataset_test_split,
        eval_split_size=config.eval_split_size,
        seed=seed,
        text_field=config.dataset_text_field,
    )
    needs_template = config.chat_template_path is not None or "conversational" in streams.format
    added_tokens = setup_chat_template(tokenizer, config.chat_template_path) if needs_template else []

    def prepare(folder: Path) -> None:
        _prepare_into(folder, streams, tokenizer, config, cut_to)
        _check_unchanged(streams.files, before)

    root = cache.cache_folder(config.cache_dir)
    with _sigterm_unwinds():
        if root is None or not streams.files:
            why = "--cache_dir none" if root is None else "only local files are fingerprinted for the cache"
            return _opened(_in_scratch(prepare), added_tokens, f"data: prepared, not cached ({why})", keep=False)
        columns = source.columns if isinstance(source, FileSelection) else None
        key = cache.fingerprint(streams.files, tokenizer, config, seed, cut_to, columns)
        return _cached(prepare, root, key, added_tokens)


def _cached(prepare: Callable[[Path], None], root: Path, key: str, added_tokens: list[str]) -> PreparedSplits:
    """The preparation cached under `key`: reused when intact; else prepared (again) and cached; or, when the cache
    cannot be written, prepared and not kept. The note says which, and names a damaged file."""
    found, note = cache.complete(root, key), "data: prepared"
    if found is not None:
        try:
            cache.verify(found)
            return _opened(found, added_tokens, f"data: reused the preparation cached in {found}", keep=True)
        except DamagedFile as damage:
            cache.discard(found)
            note = f"data: the cached preparation in {found} is damaged ({damage}); prepared again"
    try:
        with cache.building(root, key) as partial:
            prepare(partial)
    except WriteFailed as error:  # named by the cache, not by a partial folder already removed
        why = f"{root} cannot be written: {error.reason}"
        return _opened(_in_scratch(prepare), added_tokens, f"{note}, not cached ({why})", keep=False)
    return _opened(root / key, added_tokens, note if found else f"{note} and cached in {root / key}", keep=True)


def _in_scratch(prepare: Callable[[Path], None]) -> Path:
    """A scratch folder (a preparation not kept) that `prepare` filled; removed if it fails or is interrupted."""
    folder = scratch_folder()
    try:
        prepare(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


class _Terminated(BaseException):
    """SIGTERM during preparation, raised to unwind it as Ctrl-C's KeyboardInterrupt does."""


@contextmanager
def _sigterm_unwinds():
    """Within the block SIGTERM unwinds (a partial folder is removed, workers are stopped), then ends the process
    as SIGTERM does. Python's default dies at once, leaving both behind. A handler someone else set (or SIG_IGN)
    is theirs: it is left as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def unwind(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before kill() returns: the process ends here
        raise SystemExit(128 + signal.SIGTERM) from None  # should it not, the status SIGTERM gives
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _state(file: Path) -> tuple[int, int] | None:
    try:
        status = file.stat()
    except OSError:  # deleted, or moved away
        return None
    return status.st_size, status.st_mtime_ns


def _file_states(source) -> dict[Path, tuple[int, int] | None]:
    """The size and mtime of every local data file of `source`, as they are before preparation reads them."""
    if isinstance(source, FileSelection):
        return {file: _state(file) for file in source.files()}
    if not isinstance(source, (str, Path)) or not Path(source).exists():
        return {}
    return {file: _state(file) for file in local_files(Path(source))}


def _check_unchanged(files: list[Path], before: dict) -> None:
    """A file written to while it was read gave rows from two versions (and held-out rows drawn from the old
    count): refuse it, before anything is cached from it."""
    for file in files:
        if _state(file) != before.get(file):
            raise DataError(f"{file} changed while it was being prepared; run again once it is complete")


def _prepare_into(folder: Path, streams, tokenizer, config: DataConfig, cut_to: dict[str, int | None]) -> None:
    """Stream every row of `streams` through preparation into folder/train and folder/eval (and its blank lines)."""
    first_origin, first_row = next(rows_of(streams.train, [0]))
    first = normalize_example(first_row, first_origin, config.dataset_text_field)
    job = _job(first, tokenizer, config, cut_to, first_row=streams.first)
    blank_lines = [0]
    batches = _batches(rows_of(streams.train, blank_lines), streams.held_out, "train")
    if streams.eval is not None:
        batches = _chain(batches, _batches(rows_of(streams.eval, blank_lines), frozenset(), "eval"))
    has_eval = streams.eval is not None or bool(streams.held_out)
    folders = {split: folder / split for split in ("train", "eval") if split == "train" or has_eval}
    data_bytes = sum(file.stat().st_size for file in streams.files)
    stats = _write_splits(job, batches, folders, _processes(config.dataset_num_proc, streams), data_bytes)
    _check_templates_found(job, first, stats["train"])
    if has_eval:
        eval_first = first if streams.eval is None else _first_example(streams.eval, config.dataset_text_field)
        _check_templates_found(job, eval_first, stats["eval"])
    with writing(folder):
        (folder / "blank_lines").write_text(str(blank_lines[0]), encoding="utf-8")


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def _first_example(parts: list, text_field: str) -> dict:
    origin, row = next(rows_of(parts, [0]))
    return normalize_example(row, origin, text_field)


def _processes(asked: int | None, streams) -> int:
    """--dataset_num_proc, or by default: one process for small data, else a process per core (at most 8)."""
    if asked is not None:
        return asked
    size = sum(file.stat().st_size for file in streams.files)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_DEFAULT_PROCESSES) if size >= PARALLEL_FROM_BYTES else 1


def _opened(folder: Path, added_tokens: list[str], note: str, keep: bool) -> PreparedSplits:
    """The prepared splits in `folder`, memory-mapped; a folder not kept is deleted once mapped."""
    opener = open_storage if keep else open_unkept
    blank_lines = int((folder / "blank_lines").read_text(encoding="utf-8"))
    splits = {}
    for split in ("train", "eval"):
        if (folder / split).is_dir():
            storage, origins, meta = opener(folder / split)
            splits[split] = PreparedDataset(storage, _stats_from(meta["stats"]), origins)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    traces = sum(prepared.stats.reasoning_dropped for prepared in splits.values())
    if traces:  # what the run leaves out of the data is said, in the line that opens its data
        note += f"; --drop_reasoning left out {traces:,} reasoning traces"
    weights = splits["train"].examples.weights
    if weights is not None:  # and so is what weighs its loss
        note += f"; training examples weighted {weights.min():g} to {weights.max():g} (their rows' weight)"
    return PreparedSplits(splits["train"], splits.get("eval"), added_tokens, blank_lines, note)


def _stats_from(saved: dict) -> PrepareStats:
    return PrepareStats(**{**saved, "drop_reasons": Counter(saved["drop_reasons"])})
