"""`python -m minisft.inspect`: look at exactly what training will consume.

It runs the data side of a training run (load → format → mask → truncate → drop → pack) with
the same flags as `python -m minisft.train`, and shows the result:

- by default, the first examples as tokens, trained tokens highlighted, masked ones dim,
  and the figures of the whole split: examples, tokens, trained tokens, truncated, dropped;
- with --json, one {"input_ids": [...], "labels": [...]} object per line on stdout: the
  very rows the loop is fed (figures go to stderr, so the output pipes cleanly).

With --packing it shows packed rows instead: each row drawn as a bar of its examples, and the
packing efficiency (tokens / row slots) beside what was truncated (bfd, as unpacked) or split
over rows (bfd_split, wrapped); with --json one {"input_ids", "labels", "position_ids",
"seq_lengths"} object per row.

With --audit it sums up the whole split instead, in one table (minisft/machinery/audit.py counts it):
length quantiles, the examples that train a stop token, mostly masked examples, duplicates, trained
tokens by role, what was cut and dropped, and a warning per trap found. With --json, the same as one
JSON object on stdout. A training run prints the warnings alone, before step 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .machinery.audit import Audit, audit_split, trained_tokens_cut
from .machinery.cli import demo_dataset_path, parse_flags, run, stderr_console
from .machinery.config import ConfigError, DataConfig, ModelConfig, PackingConfig, TrainingConfig
from .machinery.data_files import folder_line
from .machinery.models import load_tokenizer
from .machinery.pack_plans import pack_prepared
from .machinery.prepare import PreparedDataset, PrepareStats, load_and_prepare
from .sft.batches import positions_of, setup_pad_token
from .sft.labels import IGNORE_INDEX
from .sft.packing import PackedDataset


@dataclass
class InspectConfig:
    num_examples: int | None = field(
        default=None, metadata={"help": "How many examples to show. Default: 3, or all of them with --json."}
    )
    json: bool = field(
        default=False,
        metadata={"help": "Print one JSON object per example: input_ids and labels (with --audit: the audit)."},
    )
    audit: bool = field(
        default=False,
        metadata={"help": "Sum up the whole split in one table (stop tokens, masks, duplicates, roles, cuts)."},
    )
    split: str = field(
        default="train", metadata={"help": "Which split to inspect: train or eval.", "choices": ["train", "eval"]}
    )
    seed: int = field(  # training's --seed, which also picks the held-out rows: inspect holds out the same ones
        default=TrainingConfig.seed,
        metadata={"help": "As for training: the seed that picks the --eval_split_size rows."},
    )


def main(argv: list[str] | None = None) -> None:
    model_config, data_config, packing_config, inspect_config = parse_flags(
        (ModelConfig, DataConfig, PackingConfig, InspectConfig),
        argv,
        "minisft.inspect",
        description=__doc__.splitlines()[0],
    )
    if data_config.datasets is not None:  # else the demo data would be shown in the mixture's place
        raise ConfigError(
            "inspect shows one dataset, not a --config file's datasets: mixture: give one of its sources as "
            "--dataset_name (each source is prepared on its own, as inspect prepares it)."
        )
    tokenizer = load_tokenizer(model_config.model_name_or_path, trust_remote_code=model_config.trust_remote_code)
    source = data_config.dataset_name or demo_dataset_path()
    files = folder_line(
        source, data_config.dataset_train_split, data_config.dataset_test_split, data_config.eval_split_size
    )
    if files:
        stderr_console.print(files, markup=False, highlight=False, soft_wrap=True)
    splits = load_and_prepare(source, tokenizer, data_config, packing_config, inspect_config.seed)
    stderr_console.print(splits.cache_note, highlight=False, soft_wrap=True)
    pad_note = setup_pad_token(tokenizer, data_config.pad_token)  # as training pads: checked, and said
    if pad_note:
        stderr_console.print(pad_note)
    prepared = splits.train if inspect_config.split == "train" else splits.eval
    if prepared is None:
        stderr_console.print("This dataset has no eval split; ask for one with --eval_split_size 0.1.")
        return
    if inspect_config.audit:
        cut = trained_tokens_cut(prepared, inspect_config.split, source, tokenizer, data_config, packing_config,
                                 inspect_config.seed)  # fmt: skip
        audit = audit_split(prepared, tokenizer, roles=True, truncated_trained_tokens=cut)
        if inspect_config.json:
            sys.stdout.write(json.dumps(asdict(audit)) + "\n")
        else:
            show_audit(audit, f"{source} [{inspect_config.split}]")
        return
    if packing_config.packs(inspect_config.split):
        packed = pack_prepared(prepared.examples, data_config.max_length, packing_config.packing_strategy)
        if not packing_config.neat_packing:  # as the run's opening line says it
            stderr_console.print("packing without attention boundaries (examples see each other): positions run on")
        show_packed_rows(packed, prepared.stats, inspect_config, packing_config.neat_packing)
        return
    if inspect_config.json:
        limit = inspect_config.num_examples
        for example in prepared.examples[:limit]:
            sys.stdout.write(json.dumps(example) + "\n")
        stderr_console.print(figures_table(prepared, splits, str(source), inspect_config.split))
        return
    console = Console()
    if splits.added_tokens:
        console.print(
            f"The tokenizer had no chat template: using ChatML, with new special tokens {splits.added_tokens}."
        )
    shown = 3 if inspect_config.num_examples is None else inspect_config.num_examples
    for input_ids, labels, origin in zip(
        (example["input_ids"] for example in prepared.examples[:shown]),
        (example["labels"] for example in prepared.examples[:shown]),
        prepared.origins,
    ):
        trained = sum(label != IGNORE_INDEX for label in labels)
        console.print(Text(f"── {origin}: {len(input_ids)} tokens, {trained} trained", style="bold"), soft_wrap=True)
        console.print(render_tokens(tokenizer, input_ids, labels))
    console.print(
        Text.assemble(
            "legend: ",
            ("trained", "bold green"),
            " / ",
            ("masked (-100)", "grey50"),
            " — shading changes at each token boundary",
        )
    )
    console.print(figures_table(prepared, splits, str(source), inspect_config.split))


def show_packed_rows(
    packed: PackedDataset, stats: PrepareStats, inspect_config: InspectConfig, boundaries: bool
) -> None:
    if inspect_config.json:
        for row in packed.rows[: inspect_config.num_examples]:
            # the positions the loop's collator derives from seq_lengths (rows do not store them): without boundaries
            # the row is one sequence
            lengths = row["seq_lengths"] if boundaries else [sum(row["seq_lengths"])]
            positions = positions_of(torch.tensor(lengths)).tolist()
            sys.stdout.write(json.dumps({**row, "position_ids": positions}) + "\n")
        stderr_console.print(packing_table(packed, stats))
        return
    console = Console()
    shown = 3 if inspect_config.num_examples is None else inspect_config.num_examples
    capacity = packed.stats.slots // max(packed.stats.rows, 1)
    for number, row in enumerate(packed.rows[:shown]):
        console.print(Text.assemble((f"row {number:>4} ", "bold"), row_bar(row["seq_lengths"], capacity)))
    console.print(
        Text.assemble(
            "legend: each example a run of █ or ▒, ",
            ("·", "grey50"),
            f" an empty slot; each cell ≈ {_cell_tokens(capacity)} tokens",
        )
    )
    console.print(packing_table(packed, stats))


_BAR_WIDTH = 40


def _cell_tokens(capacity: int) -> int:
    return max(1, -(-capacity // _BAR_WIDTH))


def row_bar(seq_lengths: list[int], capacity: int) -> Text:
    """A row as a bar: each example a run of cells in its own shade, then the empty slots."""
    per_cell = _cell_tokens(capacity)
    bar = Text()
    for number, length in enumerate(seq_lengths):
        # Alternate both colour and glyph, so boundaries show without colour too.
        glyph, shade = (("█", "green"), ("▒", "cyan"))[number % 2]
        bar.append(glyph * max(1, round(length / per_cell)), style=shade)
    used = sum(seq_lengths)
    bar.append("·" * max(0, -(-capacity // per_cell) - len(bar)), style="grey50")
    bar.append(f"  {used}/{capacity} tokens, examples {seq_lengths}")
    return bar


def packing_table(packed: PackedDataset, prepared: PrepareStats) -> Table:
    """The rows' figures, and what preparation cut and dropped before packing (bfd_split and wrapped split instead)."""
    stats = packed.stats
    table = Table(title="packing", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("rows", f"{stats.rows:,}")
    table.add_row("tokens / row slots", f"{stats.tokens:,} / {stats.slots:,}")
    table.add_row("packing efficiency", f"{stats.efficiency:.1%}")
    if stats.split_examples:
        table.add_row("split across sequences", f"{stats.split_examples:,} examples")
    add_cut_rows(table, prepared)
    return table


def add_cut_rows(table: Table, stats: PrepareStats) -> None:
    """What preparation truncated to max_length (as prepare.cut_lengths decides) and what it dropped."""
    table.add_row("truncated to max_length", f"{stats.truncated:,} examples, {stats.truncated_tokens:,} tokens cut")
    dropped = ", ".join(f"{count} {reason}" for reason, count in stats.drop_reasons.items())
    table.add_row("dropped (nothing to train)", f"{stats.dropped:,}" + (f" ({dropped})" if dropped else ""))


def show_audit(audit: Audit, title: str) -> None:
    """The audit in one screen: the figures, then a line per warning."""
    console = Console()
    console.print(audit_table(audit, title))
    for warning in audit.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), warning), soft_wrap=True)
    if not audit.warnings:
        console.print(Text("no warnings", style="green"))


def audit_table(audit: Audit, title: str) -> Table:
    table = Table(title=f"audit of {title}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    share = lambda count, total: f"{count:,} of {total:,} ({count / total if total else 0:.1%})"  # noqa: E731
    quantiles = lambda values: " / ".join(f"{value:,}" for value in values.values())  # noqa: E731
    table.add_row("examples", f"{audit.examples:,}")
    table.add_row("tokens", f"{audit.tokens:,}")
    table.add_row("trained tokens", share(audit.trained_tokens, audit.tokens))
    table.add_row("per example: tokens p50/p90/p99/max", quantiles(audit.length_quantiles))
    table.add_row("per example: trained p50/p90/p99/max", quantiles(audit.trained_quantiles))
    table.add_row(f"stop token trained ({' or '.join(audit.stop_tokens)})", share(audit.stop_trained, audit.examples))
    table.add_row("more than 95% masked", share(audit.mostly_masked, audit.examples))
    table.add_row("exact duplicates", share(audit.duplicates, audit.examples))
    for role, count in (audit.trained_by_role or {}).items():
        # approximate: a turn counts from its header to the next (machinery/audit.py)
        table.add_row(f"trained in {role} turns (≈)", share(count, audit.trained_tokens))
    table.add_row("response template not found", f"{audit.template_missing:,}")
    dropped = ", ".join(f"{count:,} {reason}" for reason, count in audit.drop_reasons.items())
    table.add_row("dropped (nothing to train)", f"{audit.dropped:,}" + (f" ({dropped})" if dropped else ""))
    trained_cut = "" if audit.truncated_trained_tokens is None else f", {audit.truncated_trained_tokens:,} trained"
    table.add_row(
        "truncated to max_length", f"{audit.truncated:,} examples, {audit.truncated_tokens:,} tokens cut{trained_cut}"
    )
    return table


def render_tokens(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """The tokens as text, trained ones bright and masked ones dim, shading alternating per token."""
    text = Text()
    pieces = token_pieces(tokenizer, input_ids)
    for number, (start, end, piece) in enumerate(pieces):
        trained = labels[end - 1] != IGNORE_INDEX
        shade = "on grey15" if number % 2 == 0 else "on grey27"
        style = f"bold green {shade}" if trained else f"grey50 {shade}"
        text.append(piece.replace("\n", "↵\n"), style=style)
    return text


def token_pieces(tokenizer, input_ids: list[int]) -> list[tuple[int, int, str]]:
    """(start, end, text) per token. A character split across byte-level tokens (common in
    Chinese) is shown once, on the group of tokens that completes it."""
    pieces, start = [], 0
    for end in range(1, len(input_ids) + 1):
        piece = tokenizer.decode(input_ids[start:end])
        if not piece.endswith("\ufffd") or end == len(input_ids):
            pieces.append((start, end, piece))
            start = end
    return pieces


def figures_table(prepared: PreparedDataset, splits, source: str, split: str) -> Table:
    stats = prepared.stats
    table = Table(title=f"{source} [{split}]", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("examples", f"{stats.examples:,}")
    table.add_row("tokens", f"{stats.tokens:,}")
    share = stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    table.add_row("trained tokens", f"{stats.trained_tokens:,} ({share:.1%})")
    if stats.examples:
        lengths = prepared.examples.lengths
        table.add_row("length mean / max", f"{lengths.mean():.0f} / {lengths.max()}")
    add_cut_rows(table, stats)
    if stats.response_template_missing:
        table.add_row("response template not found", f"{stats.response_template_missing:,}")
    if stats.completion_mask_unused:
        # TRL's default for pre-tokenized rows: every token trained unless --completion_only_loss says otherwise.
        table.add_row(
            "completion_mask not applied", f"{stats.completion_mask_unused:,} (--completion_only_loss applies it)"
        )
    if splits.skipped_blank_lines:
        table.add_row("blank lines skipped", f"{splits.skipped_blank_lines:,}")
    if split == "train" and splits.eval is not None:
        table.add_row("eval examples", f"{splits.eval.stats.examples:,}")
    return table


if __name__ == "__main__":
    run(main)
