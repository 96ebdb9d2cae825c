"""Progress during training, shown in whatever the run's output goes to.

    a terminal          rich's live bar: step M/N, the last figures, the time left
    a pipe, a file, CI  one plain line per logged record (a logging step, an evaluation, or both):
                            step 3/30 · loss 2.1034 · eval 2.0811 · lr 1.00e-03 · 412 tok/s
    Jupyter             an HTML table of the logged records, one row each, redrawn in place

A live bar needs a terminal that can move its cursor back: written to a pipe it would show nothing until the
run ends, so a log file gets lines instead. In a notebook rich draws its bar with ipywidgets, which shows
nothing where they are not installed and leaves one stale frame in the saved notebook. So there the table is
plain HTML, shown once with a display handle (IPython.display's display_id) and updated through it: the
notebook's output is the handle's last state, the whole table, as TRL's notebook callback leaves it.

Under torchrun only rank 0 shows anything: the other ranks' consoles are quiet.
"""

from __future__ import annotations

import sys
import time
from html import escape

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

NOTEBOOK_REDRAW_SECONDS = 1.0  # the table's step counter is redrawn at most this often between logged records


def progress_display(console: Console, total_steps: int, completed: int):
    """The display for where `console` writes: a notebook's table, a terminal's bar, or plain lines."""
    if not console.quiet and in_notebook():
        return NotebookTable(total_steps, completed)
    if console.is_terminal and not console.is_dumb_terminal:
        return TerminalBar(console, total_steps, completed)
    return PlainLines(console, total_steps)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, VS Code's, Colab's): an IPython shell with a kernel.

    A kernel has imported IPython already, so asking sys.modules costs no import where there is none."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


class TerminalBar:
    """rich's live bar, with the last logged figures (the last eval stays shown until the next one)."""

    def __init__(self, console: Console, total_steps: int, completed: int):
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("training", total=total_steps, completed=completed, figures="")
        self.latest: dict = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exception):
        return self.progress.__exit__(*exception)

    def show(self, record: dict) -> None:
        self.latest.update(record)
        self.progress.update(self.task, figures=figures(self.latest))

    def advance(self, completed: int) -> None:
        self.progress.update(self.task, completed=completed)


class PlainLines:
    """One line per logged record, with that record's own figures: a log file reads as the run went."""

    def __init__(self, console: Console, total_steps: int):
        self.console, self.total_steps = console, total_steps

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        return None

    def show(self, record: dict) -> None:
        line = " · ".join([f"step {record['step']}/{self.total_steps}", figures(record)])
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def advance(self, completed: int) -> None:
        pass  # only logged records are written: a line per step would drown the figures


class NotebookTable:
    """The logged records as an HTML table, one row each, under a step counter: one display handle, updated."""

    def __init__(self, total_steps: int, completed: int):
        from IPython.display import HTML, display  # a notebook's kernel has IPython; nothing else needs it

        self.html, self.display = HTML, display
        self.total_steps, self.completed = total_steps, completed
        self.records: list[dict] = []
        self.columns: list[str] = []  # every figure logged so far, in the order first logged
        self.rows: list[str] = []  # each record's <tr>, rendered once: a long run's redraw only joins them
        self.started = self.drawn = time.monotonic()
        self.handle = None

    def __enter__(self):
        self.handle = self.display(self.html(self.render()), display_id=True)
        return self

    def __exit__(self, *exception):
        self.draw()  # the saved notebook keeps this last state: every row, and the step the run ended at
        return None

    def show(self, record: dict) -> None:
        self.records.append(dict(record))
        new = [name for name in record if name not in self.columns]
        if new:  # a figure not logged before (the first evaluation's, say): every row gets its column
            self.columns += new
            self.rows = [self.row(logged) for logged in self.records]
        else:
            self.rows.append(self.row(record))
        self.draw()

    def advance(self, completed: int) -> None:
        self.completed = completed
        if time.monotonic() - self.drawn >= NOTEBOOK_REDRAW_SECONDS:
            self.draw()

    def draw(self) -> None:
        self.handle.update(self.html(self.render()))
        self.drawn = time.monotonic()

    def row(self, record: dict) -> str:
        return "<tr>" + "".join(f"<td>{cell(name, record.get(name))}</td>" for name in self.columns) + "</tr>"

    def render(self) -> str:
        header = "".join(f"<th>{escape(name)}</th>" for name in self.columns)
        rows = "".join(self.rows)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.started))
        counter = (
            f"<progress value='{self.completed}' max='{self.total_steps}' style='width:20em'></progress> "
            f"step {self.completed}/{self.total_steps}, {elapsed}"
        )
        return f"<div>{counter}<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></div>"


def figures(metrics: dict) -> str:
    """The figures worth a glance, in one line: loss, eval loss, learning rate, trained tokens per second."""
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "eval_loss" in metrics:
        parts.append(f"eval {metrics['eval_loss']:.4f}")
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.2e}")
    if "tokens_per_second" in metrics:
        parts.append(f"{readable_rate(metrics['tokens_per_second'])} tok/s")
    return " · ".join(parts)


def readable_rate(value: float) -> str:
    """A rate with the digits it needs: whole numbers from 100 up (12,345), else 3 significant digits (0.412),
    so that a slow run's rate never reads 0."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def cell(name: str, value) -> str:
    """One figure of the notebook's table."""
    if value is None:  # a record without this figure: an evaluation has no train loss
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float):
        return escape(str(value))
    if name == "learning_rate":
        return f"{value:.2e}"
    if name.endswith("per_second"):
        return readable_rate(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
