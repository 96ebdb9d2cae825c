"""The best checkpoint and early stopping: --load_best_model_at_end, --early_stopping_patience (transformers' names).

A run that trains past its best point overfits: the eval loss turns up while the train loss still falls. With
--load_best_model_at_end every evaluation is compared with the best so far by --metric_for_best_model (eval_loss
unless told; "loss" means eval_loss, as in transformers), lower or higher being better as --greater_is_better says
(by default lower for a name ending in "loss", higher otherwise). At the end the best checkpoint's weights (or
adapter) are loaded into the model, bit for bit, and that is what the run saves.

Every evaluation must have a checkpoint to load: the flags are refused unless each evaluation falls on one
(config.check_best_model_flags). The evaluation of the run's last step needs none: the model in memory is it.
--eval_on_start's evaluation checks the metric's name but is not a candidate: before the first step there is no
checkpoint, and the base model is not what a fine-tuning run saves.

Early stopping counts the evaluations in a row that did not beat the best by more than --early_stopping_threshold,
and ends the run when they reach --early_stopping_patience, as transformers' EarlyStoppingCallback does (a smaller
gain still makes a new best; it only does not reset the count). minisft asks for --load_best_model_at_end with it:
without it the run would save the weights of `patience` evaluations past its best.

The best step, its metric and the patience count go into every checkpoint's trainer_state.json (best_metric,
best_global_step and best_model_checkpoint, transformers' names; early_stopping_patience_counter), so a resume
goes on comparing with the same best and counting from where it was. --save_total_limit never deletes the best
checkpoint (checkpoint.prune keeps it beside the newest). The run's last line in metrics.jsonl says which step was
best and why the run stopped; python -m minisft.summary and minisft.plot show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .checkpoint import PREFIX, CheckpointError, load_weights
from .config import ConfigError, TrainingConfig


@dataclass
class Best:
    """The best evaluation so far, and the evaluations since that did not improve on it enough."""

    metric: str  # eval_loss: the name as the evaluation gives it
    greater_is_better: bool
    patience: int | None  # None: no early stopping
    threshold: float
    output_dir: Path  # where this run writes its checkpoints, the new best among them
    value: float | None = None
    step: int | None = None
    folder: Path | None = None  # checkpoint-{step}; in the folder resumed from, for a best found before the resume
    without_improvement: int = 0  # transformers' early_stopping_patience_counter
    stopped_early: bool = False

    def value_of(self, metrics: dict, parallel) -> float:
        """The metric in an evaluation's figures, refused by name if the evaluation gives none such. Under torchrun
        rank 0's value, sent to all: a figure only rank 0 computes (a probe's match rate) decides for every process."""
        mine = [float(self.metric in metrics), float(metrics.get(self.metric, 0.0))]
        present, value = parallel.sum(mine if parallel.processes.is_main else [0.0, 0.0])
        if not present:
            given = ", ".join(name for name in metrics if name.startswith("eval_"))
            raise ConfigError(
                f"--metric_for_best_model {self.metric}: the evaluation gives no such figure; it gives {given}."
            )
        return value

    def better(self, value: float, than: float, by: float = 0.0) -> bool:
        return value - than > by if self.greater_is_better else than - value > by

    def observe(self, step: int, metrics: dict, parallel, console: Console) -> bool:
        """An evaluation after `step`: a new best if it beats the best so far (strictly), and the count of evaluations
        without an improvement above the threshold. True when that count reaches the patience: stop after this step."""
        value = self.value_of(metrics, parallel)
        improved = self.value is None or self.better(value, self.value, self.threshold)
        self.without_improvement = 0 if improved else self.without_improvement + 1
        if self.value is None or self.better(value, self.value):
            self.value, self.step, self.folder = value, step, self.output_dir / f"{PREFIX}{step}"
        self.stopped_early = self.patience is not None and self.without_improvement >= self.patience
        if self.stopped_early:
            console.print(
                f"early stopping: {self.metric} has not improved on {self.value:.4g} (step {self.step}) by more "
                f"than {self.threshold:g} for {self.without_improvement} evaluations; the run ends at step {step}"
            )
        return self.stopped_early

    def state(self) -> dict:
        """The trainer-state fields a checkpoint keeps, for a resume to go on from (restore)."""
        return {
            "best_metric": self.value,
            "best_global_step": self.step,
            "best_model_checkpoint": str(self.folder) if self.folder else None,
            "metric_for_best_model": self.metric,
            "greater_is_better": self.greater_is_better,
            "early_stopping_patience_counter": self.without_improvement,
        }

    def restore(self, state: dict, directory: Path) -> None:
        """Go on from a checkpoint's record of the best: its checkpoint is found beside the one resumed from."""
        if state.get("best_global_step") is None:
            return  # saved before any evaluation, or by a run without --load_best_model_at_end: tracked from here
        then = (state.get("metric_for_best_model"), state.get("greater_is_better"))
        if then != (self.metric, self.greater_is_better):
            now = direction(self.metric, self.greater_is_better)
            raise CheckpointError(
                f"{directory} compared checkpoints by {direction(*then)}; this run asks {now}: resume with "
                f"--metric_for_best_model {then[0]} --greater_is_better {str(then[1]).lower()}, or start a new run."
            )
        self.value, self.step = state["best_metric"], state["best_global_step"]
        self.without_improvement = state.get("early_stopping_patience_counter", 0)
        self.folder = directory.parent / f"{PREFIX}{self.step}"
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{directory} records {self.folder.name} as the best checkpoint ({self.metric} {self.value:.4g}), "
                f"and it is not in {directory.parent}: put it back, or start a new run."
            )


def direction(metric: str, greater_is_better: bool) -> str:
    return f"{metric} ({'higher' if greater_is_better else 'lower'} is better)"


def best_tracker(args: TrainingConfig, state: dict, resume_from: Path | None, output_dir: Path) -> Best | None:
    """The run's Best, gone on from the checkpoint resumed from; None without --load_best_model_at_end."""
    if not args.load_best_model_at_end:
        return None
    metric = args.metric_for_best_model  # config resolved it: "loss" unless told, and greater_is_better
    best = Best(
        metric if metric.startswith("eval_") else f"eval_{metric}", args.greater_is_better,
        args.early_stopping_patience, args.early_stopping_threshold, output_dir,
    )  # fmt: skip
    if resume_from is not None:
        best.restore(state, resume_from)
    return best


def stops_early(run, record: dict, console: Console) -> bool:
    """After a step's record is logged: if it holds an evaluation, compare it with the best (Best.observe); True when
    early stopping ends the run at this step. Every evaluation gives eval_loss (sft/step.py)."""
    return (
        run.best is not None
        and "eval_loss" in record
        and run.best.observe(run.completed, record, run.parallel, console)
    )


def load_best(run, console: Console) -> None:
    """Before the outputs are written: the best checkpoint's weights (or adapter) into the model, unless the model
    is the best already (its last step was the best evaluation, or there was none)."""
    best = run.best
    if best is None or best.step is None or best.step == run.completed:
        return
    load_weights(best.folder, run.model, run.lora_settings)  # every process: each holds the whole model (no FSDP)
    console.print(f"loaded the best checkpoint, {best.folder} ({best.metric} {best.value:.4g}): it is what is saved")


def record_end(run, args: TrainingConfig, metrics_log, signal: str | None = None) -> None:
    """The run's last line in metrics.jsonl: the best step and its metric, and why the run stopped (rank 0).
    Written to the file only: the trackers take figures, and the reason is a sentence."""
    best = run.best
    if best is None or metrics_log is None:  # metrics_log: rank 0's
        return
    if signal:
        reason = f"stopped by {signal}"
    elif best.stopped_early:
        reason = f"early stopping: {best.without_improvement} evaluations without improvement"
        reason += f" (patience {best.patience})"
    elif run.stop_asked:
        reason = "a callback asked to stop (should_training_stop)"
    elif args.max_steps > 0:
        reason = f"max_steps ({args.max_steps})"
    else:
        reason = f"num_train_epochs ({args.num_train_epochs:g})"
    record = {
        "step": run.completed,
        "epoch": round(run.completed / run.steps_per_epoch, 4),
        "best_global_step": best.step,
        "metric_for_best_model": best.metric,
        "best_metric": best.value,
        # None where the best is the last step: no checkpoint holds it, the saved model does (a signal saves one)
        "best_model_checkpoint": str(best.folder) if best.folder and (signal or best.step != run.completed) else None,
        "stop_reason": reason,
    }
    metrics_log.write(record, trackers=False)
    run.history.append(record)
