"""The end-of-run summary: the loss curves, the final figures, and the warning signs in them.

A run's metrics.jsonl holds one line per logging step. Read as curves, they say whether the
run went well. Three shapes are worth a warning (the second seed's list, detected here):

    eval loss rising while train loss falls    overfitting: the model learns the train examples, not the task
    train loss barely improving                 under-fitting: try a higher learning rate (or more steps);
    (and the eval loss, where there is one)     an eval loss that fell well says the model learnt anyway
    train loss extremely low                    memorisation: check the model on new, similar prompts

A run with --load_best_model_at_end says which step was best, by which metric, and why it stopped (the last line
of its metrics.jsonl, machinery/best_checkpoint.py).

A run with --probe_prompts ends with the probes' first and last answers side by side, and how many of each kind
contained the expected answer (machinery/probes.py). `python -m minisft.summary OUTPUT_DIR` prints it again for any
run, finished or not; the last line of an interrupted run's metrics.jsonl (or probes.jsonl), cut short, is left out
with a note (minisft/machinery/reporting.py).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .machinery.cli import run
from .machinery.probes import KINDS, PROBES_FILE
from .machinery.progress import readable_rate
from .machinery.reporting import MetricsError, read_records

# The thresholds of the warning signs. Loss values depend on the data, so these are rules of
# thumb: a run below them is worth a look, not necessarily broken.
OVERFIT_RISE = 0.10  # eval loss ended 10% above its best while train loss kept falling
UNDERFIT_GAIN = 0.10  # train loss fell by less than 10% of where it started
MEMORISATION_LOSS = 0.05  # nats per token: the model is near-certain of every trained token

CHART_WIDTH, CHART_HEIGHT = 60, 10


def read_metrics(output_dir: str | Path, console: Console) -> list[dict]:
    """The records of output_dir/metrics.jsonl; a torn last line (an interrupted run's) is dropped with a note."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{path}: no such file. Pass the --output_dir of a minisft run.")
    records, note = read_records(path)
    if note:
        console.print(f"note: {note}", markup=False, highlight=False)
    if not records:
        raise MetricsError(f"{path} is empty: the run logged nothing.")
    return records


def curve(records: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, at the steps that logged it."""
    return [(record["step"], record[name]) for record in records if name in record]


def warning_signs(records: list[dict]) -> list[str]:
    """The second seed's warning signs, as sentences; empty when the curves look healthy."""
    train, evals = curve(records, "loss"), curve(records, "eval_loss")
    signs = []
    if len(evals) >= 2 and len(train) >= 2:
        best_step, best = min(evals, key=lambda point: point[1])
        last_step, last = evals[-1]
        train_at_best = min((value for step, value in train if step <= best_step), default=train[0][1])
        if last > best * (1 + OVERFIT_RISE) and train[-1][1] < train_at_best:
            signs.append(
                f"Overfitting: eval loss rose from {best:.4g} (step {best_step}) to {last:.4g} (step {last_step}) "
                f"while train loss kept falling. {overfitting_advice(run_end(records))}"
            )
    if barely_fell(train) and (len(evals) < 2 or barely_fell(evals)):
        on_eval = f", eval loss from {evals[0][1]:.4g} to {evals[-1][1]:.4g}" if len(evals) >= 2 else ""
        signs.append(
            f"Under-fitting: train loss went from {train[0][1]:.4g} to only {train[-1][1]:.4g}{on_eval}. "
            "Try a higher --learning_rate, or train for more steps."
        )
    if train and train[-1][1] < MEMORISATION_LOSS:
        signs.append(
            f"Memorisation: the final train loss {train[-1][1]:.4g} is extremely low; the model is near-certain of "
            "every trained token. Check its answers to new, similar prompts (the eval split), not only trained ones."
        )
    return signs


def run_end(records: list[dict]) -> dict | None:
    """The line a run with --load_best_model_at_end ends metrics.jsonl with (machinery/best_checkpoint.py): its best
    step and metric, and why it stopped. None where the last record is another (a run without it, or one cut short)."""
    return records[-1] if "stop_reason" in records[-1] else None


def best_rows(end: dict | None) -> list[tuple[str, str]]:
    """The summary's rows for the best checkpoint and why the run stopped."""
    if end is None:
        return []
    if end["best_global_step"] is None:
        return [("best checkpoint", "none: no evaluation to compare"), ("stopped", end["stop_reason"])]
    best = f"step {end['best_global_step']}, {end['metric_for_best_model']} {end['best_metric']:.4g}"
    return [("best checkpoint", f"{best} ({best_place(end)})"), ("stopped", end["stop_reason"])]


def best_place(end: dict) -> str:
    """Where the best checkpoint's weights are: a run stopped by a signal wrote no model, so its best is a checkpoint;
    otherwise the saved model is the best."""
    return end["best_model_checkpoint"] if end["stop_reason"].startswith("stopped by") else "the saved model"


def overfitting_advice(end: dict | None) -> str:
    """What to do about over-fitting: where the best weights are already, when the run kept them."""
    if end is not None and end["best_global_step"] is not None:
        return (
            f"The best evaluation's weights were kept: step {end['best_global_step']}'s, by "
            f"{end['metric_for_best_model']}, are {best_place(end)}."
        )
    return (
        "Train for fewer steps, or use more (and more varied) data; --load_best_model_at_end saves the best "
        "evaluation's weights, and --early_stopping_patience stops the run after it."
    )


def barely_fell(points: list[tuple[int, float]]) -> bool:
    """Whether a loss curve of two points or more ended less than UNDERFIT_GAIN below where it started."""
    return len(points) >= 2 and points[-1][1] > points[0][1] * (1 - UNDERFIT_GAIN)


def chart(
    series: dict[str, list[tuple[int, float]]], width: int = CHART_WIDTH, height: int = CHART_HEIGHT
) -> list[str]:
    """Curves drawn in text: one marker per series, steps along x, values along y (rich markup)."""
    points = [point for values in series.values() for point in values]
    if not points:
        return []
    first_step, last_step = min(step for step, _ in points), max(step for step, _ in points)
    low, high = min(value for _, value in points), max(value for _, value in points)
    if math.isclose(low, high):
        high = low + 1.0  # a flat curve: draw it on the bottom row
    grid = [[" "] * width for _ in range(height)]
    for marker, values in zip(("[cyan]•[/]", "[magenta]◆[/]"), series.values()):
        for step, value in values:
            column = round((step - first_step) / max(last_step - first_step, 1) * (width - 1))
            row = round((high - value) / (high - low) * (height - 1))
            grid[row][column] = marker
    label_width = max(len(f"{high:.3g}"), len(f"{low:.3g}"))
    lines = []
    for row, cells in enumerate(grid):
        label = f"{high:.3g}" if row == 0 else f"{low:.3g}" if row == height - 1 else ""
        lines.append(f"{label:>{label_width}} ┤{''.join(cells)}")
    lines.append(f"{'':>{label_width}} └{'─' * width}")
    ends = f"step {first_step}", f"step {last_step}"
    lines.append(f"{'':>{label_width}}  {ends[0]}{ends[1]:>{width - len(ends[0])}}")
    return lines


def print_summary(output_dir: str | Path, console: Console) -> list[str]:
    """Curves, final figures and warning signs of the run in output_dir. Returns the warning signs."""
    records = read_metrics(output_dir, console)
    train, evals = curve(records, "loss"), curve(records, "eval_loss")
    console.rule("[bold]run summary")
    legend = "[cyan]•[/] train loss" + ("   [magenta]◆[/] eval loss" if evals else "")
    console.print(legend)
    for line in chart({"loss": train, "eval_loss": evals}):
        console.print(line, highlight=False)

    last = records[-1]
    figures = Table(show_header=False, box=None, padding=(0, 2))
    figures.add_row("steps", f"{last['step']} ({last['epoch']:.3g} epochs)")
    if train:
        figures.add_row("train loss", f"{train[0][1]:.4g} → {train[-1][1]:.4g}")
    if evals:
        best_step, best = min(evals, key=lambda point: point[1])
        figures.add_row("eval loss", f"{evals[0][1]:.4g} → {evals[-1][1]:.4g} (best {best:.4g} at step {best_step})")
    trained = [record for record in records if "num_tokens" in record]
    if trained:
        accuracy = f"{trained[-1]['mean_token_accuracy']:.1%} (last logging interval)"
        evaluated = [record for record in records if "eval_mean_token_accuracy" in record]
        if evaluated:
            accuracy += f", eval {evaluated[-1]['eval_mean_token_accuracy']:.1%} (last evaluation)"
        figures.add_row("mean token accuracy", accuracy)
        figures.add_row("trained tokens", f"{trained[-1]['num_tokens']:,}")
        rate = sum(record["tokens_per_second"] for record in trained) / len(trained)
        memory = trained[-1]["peak_memory_mb"]
        figures.add_row("speed", f"{readable_rate(rate)} trained tokens/s, peak memory {memory:,.0f} MB")
    for row in best_rows(run_end(records)):
        figures.add_row(*row)
    console.print(figures)

    signs = warning_signs(records)
    for sign in signs:
        console.print(f"[bold yellow]warning:[/] {sign}")
    if not signs:
        console.print("[green]No warning signs in the loss curves.[/]")
    probes = probe_table(output_dir, console)
    if probes is not None:
        console.print(probes)
    # Quoted for the shell, and printed as it is (no markup, no wrapping): a folder named "x; rm -rf ~" or
    # "[red]x" must paste back as that folder.
    console.print(
        f"Plot it: python -m minisft.plot {shlex.quote(str(output_dir))}", markup=False, highlight=False, soft_wrap=True
    )
    return signs


def probe_table(output_dir: str | Path, console: Console) -> Table | None:
    """The --probe_prompts' first and last answers side by side (machinery/probes.py wrote them to probes.jsonl),
    each kind's matches first → last in the caption; None for a run without probes."""
    path = Path(output_dir) / PROBES_FILE
    if not path.is_file():
        return None
    records, note = read_records(path)
    if note:
        console.print(f"note: {note}", markup=False, highlight=False)
    if not records:
        return None
    first, last = records[0]["step"], records[-1]["step"]
    before: dict[tuple, dict] = {}
    for record in records:  # the first asking of the first step (a resume may ask a step again)
        if record["step"] == first and first != last:
            before.setdefault((record["kind"], record["prompt"]), record)
    after = {(record["kind"], record["prompt"]): record for record in records if record["step"] == last}
    judged = [kind for kind in KINDS if matched(after.values(), kind)]
    when = f"before (step {first}) and after (step {last}) training" if before else f"at step {last}"
    table = Table(title=f"The probe prompts, {when} (greedy)")
    for column in ("", "prompt", *(["expected"] if judged else []), *(["before", "after"] if before else ["answer"])):
        table.add_column(column, overflow="fold")
    for key, record in after.items():
        expected = [escape(record["expected"] or "")] if judged else []
        earlier = [shown_answer(before.get(key))] if before else []
        table.add_row(record["kind"].replace("_", " "), escape(record["prompt"]), *expected, *earlier,
                      f"[bold]{shown_answer(record)}[/]")  # fmt: skip
    if judged:
        changes = [f"{matched(before.values(), kind)} → " if before else "" for kind in judged]
        table.caption = "✓ contains the expected answer; matched: " + ", ".join(
            f"{kind.replace('_', ' ')} {change}{matched(after.values(), kind)}" for kind, change in zip(judged, changes)
        )
    return table


def shown_answer(record: dict | None) -> str:
    """An answer as a table cell, marked ✓ or ✗ where its probe has an expected answer."""
    if record is None:  # a probe added on a resume: not asked at the first step
        return ""
    return {True: "✓ ", False: "✗ ", None: ""}[record["match"]] + escape(record["answer"])


def matched(records, kind: str) -> str:
    """'2/3': how many of the probes of `kind` with an expected answer matched it; '' where none has one."""
    judged = [record["match"] for record in records if record["kind"] == kind and record["match"] is not None]
    return f"{sum(judged)}/{len(judged)}" if judged else ""


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m minisft.summary", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="The --output_dir of a minisft run (it holds metrics.jsonl).")
    print_summary(parser.parse_args(argv).output_dir, Console())


if __name__ == "__main__":
    run(main)
