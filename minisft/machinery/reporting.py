"""Where a run's figures go: metrics.jsonl always, and each tracker that --report_to names.

Every logging step makes one record,

    {"step": 10, "epoch": 0.5, "loss": 1.93, "learning_rate": 2e-05, "grad_norm": 0.8, ...}

which is appended to output_dir/metrics.jsonl (the run's own history: the summary, the plot and
a resume read it) and handed to every tracker, under the names transformers' integrations use
(train/loss, eval/loss for eval_loss, at the step):

    tensorboard   torch's SummaryWriter, writing to output_dir/runs/<run_name>
    wandb         wandb.init(project=$WANDB_PROJECT or "minisft", name=run_name); WANDB_MODE=offline
                  keeps it on this machine (`wandb sync` uploads later)
    trackio       trackio.init(project=$TRACKIO_PROJECT or "minisft", name=run_name): a local dashboard
    mlflow        mlflow.start_run(run_name=run_name); MLFLOW_TRACKING_URI says where, ./mlruns by default

The probes' answers (--probe_prompts, machinery/probes.py) go to tensorboard as a markdown table in its Text
tab, to wandb as a wandb.Table and to mlflow as a table artifact per occasion, each at the step; trackio gets their
match rates only (its Table takes another shape). Several trackers at once are fine (--report_to tensorboard wandb);
"all" means every one that is installed, "none" only metrics.jsonl. Only the first process of a torchrun run reports.

A run killed while it appends a line leaves that line cut short, without its newline. Whoever reads the
file (the summary, the plot, a resume) drops such a last line with a note; a bad line anywhere else was
not left by an interrupted write, and is an error naming its line.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from minisft.errors import UserError

from .extras import import_optional

TRACKERS = {  # name: (module, pip package)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


def chosen_trackers(report_to: list[str]) -> list[str]:
    """--report_to's values as tracker names: "all" is every installed tracker, "none" none."""
    if "all" in report_to:
        return [name for name, (module, _) in TRACKERS.items() if _installed(module)]
    return [name for name in report_to if name != "none"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (torch.utils) that is missing
        return False


def import_tracker(name: str):
    module, package = TRACKERS[name]
    return import_optional(module, f"--report_to {name}", package, f"pip install {package}")


def tracker_name(name: str) -> str:
    """train/loss, eval/loss (for eval_loss): the names transformers' integrations give the same figures."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


class TensorBoard:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        self.writer = import_tracker("tensorboard").SummaryWriter(str(output_dir / "runs" / run_name))

    def log(self, figures: dict, step: int) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(tracker_name(name), value, step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """TensorBoard's Text tab renders markdown: the table as one, under eval/<name>."""
        cells = [["" if value is None else str(value).replace("|", "\\|").replace("\n", " ") for value in row]
                 for row in [columns, *rows]]  # fmt: skip
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        self.writer.add_text(f"eval/{name}", "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]]), step)

    def close(self) -> None:
        self.writer.close()


class WandbStyle:
    """wandb, and trackio, which copies its API: init(project, name, config), log(figures, step), finish()."""

    def __init__(self, package: str, output_dir: Path, run_name: str, config: dict):
        self.name, self.package = package, import_tracker(package)
        project = os.environ.get(f"{package.upper()}_PROJECT", "minisft")  # WANDB_PROJECT, TRACKIO_PROJECT
        extra = {"dir": str(output_dir)} if package == "wandb" else {}  # wandb's files beside the run's
        self.package.init(project=project, name=run_name, config=config, **extra)

    def log(self, figures: dict, step: int) -> None:
        self.package.log({tracker_name(name): value for name, value in figures.items()}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.name == "wandb":  # trackio's Table takes rows of another shape: it gets the figures only
            self.package.log({f"eval/{name}": self.package.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.package.finish()


class MLflow:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        self.mlflow = import_tracker("mlflow")
        self.mlflow.start_run(run_name=run_name)
        self.mlflow.log_params({key: str(value)[:250] for key, value in config.items()})  # MLflow's length limit

    def log(self, figures: dict, step: int) -> None:
        self.mlflow.log_metrics({tracker_name(name): value for name, value in figures.items()}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        data = {column: [row[index] for row in rows] for index, column in enumerate(columns)}
        self.mlflow.log_table(data, artifact_file=f"{name}/step-{step}.json")  # an artifact per occasion

    def close(self) -> None:
        self.mlflow.end_run()


TRACKER_CLASSES = {
    "tensorboard": TensorBoard,
    "wandb": functools.partial(WandbStyle, "wandb"),
    "trackio": functools.partial(WandbStyle, "trackio"),
    "mlflow": MLflow,
}


class MetricsError(UserError, ValueError):
    """metrics.jsonl is missing, empty or damaged; the message names the file (and the line)."""


def read_records(path: Path) -> tuple[list[dict], str | None]:
    """The records of a metrics.jsonl, and a note if its last line was torn by an interrupted write (dropped)."""
    lines = path.read_bytes().split(b"\n")
    unfinished = lines.pop()  # what follows the last newline: nothing, unless a write was cut short
    records = [_record(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not unfinished.strip():
        return records, None
    try:  # a record written whole but for its newline is kept
        return [*records, _record(path, len(lines) + 1, unfinished)], None
    except MetricsError:
        note = (
            f"{path} line {len(lines) + 1}: dropped, {len(unfinished):,} bytes without a newline that are not a "
            "whole record (a write the run did not finish)"
        )
        return records, note


def begin_records(path: Path, resumed_at: int) -> str | None:
    """Begin a file of step records (metrics.jsonl, probes.jsonl) afresh or, on a resume, keep its records up to the
    checkpoint's step: later ones belong to steps that will now be run again. Returns the note of a torn last line
    dropped, or None."""
    kept, note = [], None
    if resumed_at and path.is_file():
        records, note = read_records(path)
        kept = [record for record in records if record["step"] <= resumed_at]
    # Written aside and renamed over: a kill at this moment must not leave the run's history empty.
    fresh = path.with_name(path.name + ".tmp")
    fresh.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept), encoding="utf-8")
    fresh.replace(path)
    return note


def _record(path: Path, number: int, line: bytes) -> dict:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise MetricsError(f"{path} line {number}: not UTF-8 text; each line holds one JSON record") from None
    except json.JSONDecodeError as error:
        raise MetricsError(
            f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); each line holds one record"
        ) from None
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise MetricsError(f"{path} line {number}: not a record of a logging step (a JSON object with a whole step)")
    return record


class MetricsLog:
    """metrics.jsonl (one object per log line), and the trackers of --report_to. `note`: what a resume dropped
    from the file besides the steps it runs again (a torn last line), or None."""

    def __init__(self, output_dir: Path, resumed_at: int, report_to: list[str], run_name: str, config: dict):
        self.path = output_dir / "metrics.jsonl"
        self.note = begin_records(self.path, resumed_at)
        self.trackers = [TRACKER_CLASSES[name](output_dir, run_name, config) for name in chosen_trackers(report_to)]

    def write(self, record: dict, trackers: bool = True) -> None:
        """A record to metrics.jsonl and, unless trackers is False (text, not figures), to each tracker."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if not trackers:
            return
        figures = {name: value for name, value in record.items() if name not in ("step", "epoch")}
        for tracker in self.trackers:
            tracker.log(figures, record["step"])

    def write_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table of text (the probes' answers, machinery/probes.py) to each tracker, as its own kind of table."""
        for tracker in self.trackers:
            tracker.log_table(name, columns, rows, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []  # finished: what is written later (an evaluation after the run) reaches the files only
