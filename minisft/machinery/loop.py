"""The training loop, top to bottom: data → model → optimizer → steps → outputs.

One optimizer step (forward, loss and backward over its micro-batches, then clip and step) is the
lesson's minisft/sft/step.py: train_step, and evaluate beside it. The loop calls them and, around
the steps, writes every logging_steps a log line, runs every eval_steps an evaluation, and saves
every save_steps (or epoch) a checkpoint. --probe_prompts are asked before the first step, with each
evaluation and at the end (minisft/machinery/probes.py).

Which examples a step sees is a pure function of (seed, step): each epoch is a seeded
permutation of the training rows. That is what makes resuming exact. Under torchrun each
process takes its share of every step's micro-batches (minisft/machinery/distributed.py's DataParallel),
and the loop reads the same with one process or many.

From Python, train() also takes what the flags would otherwise name (Given): a loaded model, its
tokenizer, the dataset's rows, and a hook told of the run's events (tell). The Python front door,
minisft/trainer.py, is made of these: every training decision stays here, with the flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import resource
import sys
import time
import types
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

from minisft.errors import UserError
from minisft.sft.attention import use_sdpa_by_example
from minisft.sft.batches import collate, count_weighted_tokens, setup_pad_token
from minisft.sft.lora import LoraSettings, inject_lora, lora_layers, merged_model, resolve_targets
from minisft.sft.loss import check_head
from minisft.sft.neftune import add_neftune_noise
from minisft.sft.optim import build_optimizer, build_schedule, warmup_steps
from minisft.sft.step import NonFiniteStep, evaluate, train_step

from .audit import audit_split
from .best_checkpoint import Best, best_tracker, load_best, record_end, stops_early
from .checkpoint import (
    WRITE_ERRORS,
    CheckpointError,
    base_identity,
    batch_for_processes,
    check_base_model,
    check_resume,
    data_fingerprint,
    load_checkpoint,
    prune,
    read_trainer_state,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    write_failure,
)
from .cli import demo_dataset_path
from .config import ConfigError, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig, check_run
from .data_files import folder_line
from .distributed import DataParallel, Processes, barrier, data_parallel, device_of, start, whole_weights
from .extras import check_attention_implementation, import_bitsandbytes
from .mixture import check_entries, prepare_mixture, read_from
from .models import (
    EMBEDDED_MODEL_NAME,
    cache_root,
    compile_decoder_layers,
    fit_embeddings_to_tokenizer,
    four_bit_quantization,
    load_model,
    load_tokenizer,
    slow_bf16_warning,
)
from .outputs import (
    OutputLock,
    contents,
    make_folder,
    record_outputs,
    refuse_unsafe_folder,
    start_writing,
    take_lock,
)
from .pack_plans import pack_prepared
from .peft_files import load_adapter, read_adapter_settings, save_adapter
from .prepare import PreparedDataset, cut_lengths, load_and_prepare
from .probes import Probes, check_probes, open_probes
from .progress import progress_display
from .reporting import MetricsLog, chosen_trackers, import_tracker
from .stopping import stop_requests

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message names the step and what was kept."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: dict  # the last logged figures, and the last eval_loss
    merged_dir: Path | None = None
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)  # every logged record, in order: metrics.jsonl's lines
    model: torch.nn.Module | None = None  # the trained model, in memory, in eval mode: ready to generate
    evaluate: Callable[[], dict] | None = None  # the eval figures of the model as it is now; None without eval data


@dataclass
class Given:
    """What a Python caller (minisft/trainer.py, the front door) hands the run in place of what the flags name: a
    loaded model, its tokenizer, the rows themselves, and a hook told of the run's events (see tell)."""

    model: torch.nn.Module | None = None  # named by --model_name_or_path still: adapters and checkpoints record it
    tokenizer: object = None
    dataset: object = None  # anything data_files.stream_splits reads: rows, a datasets.Dataset, {split: rows}
    on_event: Callable[..., bool | None] | None = None


def train(
    config: RunConfig, console: Console | None = None, *, model=None, tokenizer=None, dataset=None, on_event=None
) -> TrainResult:
    """The run `config` describes. From Python the keywords may hand over a loaded model, a tokenizer, the dataset
    itself (rows, a datasets.Dataset, or {split: rows}) and an event hook (Given); the flags decide all the rest."""
    given = Given(model, tokenizer, dataset, on_event)
    processes = start()  # one process, or this process's place among torchrun's
    console = (console or Console(stderr=True)) if processes.is_main else Console(quiet=True)  # rank 0 speaks
    check_flags(config)
    output_dir, resume_from, lock = open_output_dir(config, processes, console, given.dataset)
    with lock:  # one run per output folder, until this one ends however it ends (minisft/machinery/outputs.py)
        return train_into(output_dir, resume_from, config, processes, console, given)


def train_into(
    output_dir: Path, resume_from: Path | None, config: RunConfig, processes: Processes, console,
    given: Given | None = None,
) -> TrainResult:  # fmt: skip
    """train(), once its output folder is checked and locked."""
    given = given or Given()
    args = config.training
    resumed, args = resume_state(resume_from, args, processes.world_size, console)
    config = dataclasses.replace(config, training=args)  # the per-process batch a resume may have re-derived
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # 1. Data: raw rows → canonical examples → input_ids and labels → packed rows or examples.
    tokenizer = given.tokenizer
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code)
    train_units, eval_units, mixture = prepare_data(config, tokenizer, processes, console, given.dataset)
    # Hashing the data takes seconds on a large dataset: done once, and only for a checkpoint read or written.
    order = functools.cache(functools.partial(data_order, config, train_units, processes.world_size, mixture))
    check_data_order(resume_from, resumed, order, args.ignore_data_order_mismatch, console)

    # 2. Model: load, grow the embeddings if the tokenizer grew, LoRA, memory savers; wrapped under torchrun.
    device = device_of(processes)
    model, lora_settings, base_model = prepare_model(config, tokenizer, device, console, given.model)
    check_base_model(resume_from, resumed, base_model)  # not --ignore_data_order_mismatch's: it is about data
    parallel = data_parallel(model, processes, args.fsdp)
    autocast = mixed_precision(args.bf16, args.fp16, device, config.model.resolved_dtype())
    scaler = gradient_scaler(args.fp16, device)

    # 3. How the run is cut into steps (each covers world_size × batch × accumulation units), and the optimizer.
    steps_per_epoch, total_steps = count_steps(len(train_units), args, processes.world_size)
    optimizer = build_optimizer(
        model, args.optim, args.learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    )
    warmup = warmup_steps(total_steps, args.warmup_steps, args.warmup_ratio)
    schedule = build_schedule(optimizer, args.lr_scheduler_type, warmup, total_steps, args.lr_scheduler_kwargs)
    console.print(run_line(config, output_dir, processes, total_steps, warmup, model, device, autocast))
    if resume_from is not None:
        load_checkpoint(resume_from, model, optimizer, schedule, lora_settings, parallel, resumed.get("world_size", 1))
        console.print(f"resumed from {resume_from} at step {resumed['step']}")

    # 4. The steps. From here on Ctrl-C, SIGTERM and SIGUSR1 stop the run cleanly (minisft/machinery/stopping.py).
    collate_fn = functools.partial(
        collate, model=model, pad_token_id=tokenizer.pad_token_id, padding_free=config.packing.padding_free,
        pad_to_multiple_of=config.packing.pad_to_multiple_of, device=device, boundaries=config.packing.neat_packing,
        per_sample=args.loss_normalization == "sample",
    )  # fmt: skip
    in_output_dir = resume_from is not None and resume_from.resolve().parent == output_dir.resolve()
    run = Run(
        model=model, optimizer=optimizer, schedule=schedule, scaler=scaler, autocast=autocast, parallel=parallel,
        collate=collate_fn, train_units=train_units, eval_units=eval_units, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, output_dir=output_dir, lora_settings=lora_settings,
        base_name=config.model.model_name_or_path, seed=args.seed, data_order=order, completed=resumed["step"],
        saved=resume_from if in_output_dir else None, interval=Interval(resumed.get("num_tokens", 0)),
        base_model=base_model, on_event=given.on_event,
    )  # fmt: skip
    run.best = best_tracker(args, resumed, resume_from, output_dir)
    # Every input is open and checked: only now may --overwrite_output_dir remove the previous run's files.
    prepare_output_dir(output_dir, args.overwrite_output_dir, resume_from is not None, processes, console)
    metrics_log = open_metrics_log(config, output_dir, run.completed) if processes.is_main else None
    if metrics_log is not None and metrics_log.note:  # the torn last line a killed run left, dropped
        console.print(f"note: {metrics_log.note}", markup=False, highlight=False)
    run.probes = open_probes(args, output_dir, run.completed, tokenizer, processes, metrics_log, console)
    if processes.is_main:
        record_outputs(output_dir)  # metrics.jsonl and the trackers' folders
    tell(run, "train_begin", model=run.model, tokenizer=tokenizer, total_steps=run.total_steps)
    with stop_requests(one_process=not processes.distributed, speak=processes.is_main) as stop:
        last_metrics, stopped = run_steps(run, args, stop, metrics_log, console)
        if stopped:  # still inside stop_requests: a second SIGTERM cannot cut the checkpoint short
            save_on_stop(run, args, stop.signal, console)
            record_end(run, args, metrics_log, signal=stop.signal or "a stop request")
            return TrainResult(output_dir, run.completed, last_metrics, interrupted=True, history=run.history)

        # 5. Outputs: an HF-format model (or a peft adapter), the tokenizer with its chat template.
        load_best(run, console)  # --load_best_model_at_end: the best checkpoint's weights are what is saved
        merged_dir = write_outputs(run, tokenizer, config.model, config.lora, console)
        record_end(run, args, metrics_log)
    tell(run, "train_end")
    evaluation = evaluation_of(run, args) if run.eval_units else None
    model.eval()  # ready to generate: dropout off
    return TrainResult(output_dir, run.completed, last_metrics, merged_dir, False, run.history, model, evaluation)


# ----------------------------------------------------------------------------- the steps


@dataclass(kw_only=True)  # built by name: 20 fields, no order to remember
class Run:
    """A run once set up: what its steps use and change, and what a checkpoint of them holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16's; None otherwise
    autocast: Callable
    parallel: DataParallel
    collate: Callable[[list[dict]], dict]  # units → {"inputs", "labels"} on the device
    train_units: Sequence[dict]
    eval_units: Sequence[dict] | None
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    lora_settings: LoraSettings | None
    base_name: str
    seed: int
    data_order: Callable[[], dict]
    completed: int = 0  # steps done
    saved: Path | None = None  # the checkpoint of step `completed`, if there is one
    interval: Interval = field(default_factory=lambda: Interval())  # the figures since the last log line (below)
    base_model: dict = field(default_factory=dict)  # what it trains from (checkpoint.base_identity)
    history: list[dict] = field(default_factory=list)  # every record logged
    on_event: Callable[..., bool | None] | None = None  # Given.on_event: told of the run's events (tell)
    stop_asked: bool = False  # the event hook asked the run to end after this step
    best: Best | None = None  # --load_best_model_at_end's best evaluation and patience (machinery/best_checkpoint.py)
    probes: Probes | None = None  # --probe_prompts: asked before the first step, at each evaluation and at the end


def run_steps(run: Run, args: TrainingConfig, stop, metrics_log, console: Console) -> tuple[dict, bool]:
    """The steps from run.completed to run.total_steps, with logs, evaluations and checkpoints between them.

    Returns the last logged figures, and whether a stop request (or a second Ctrl-C) ended the run early.
    """
    last_metrics: dict = {}
    progress = progress_display(console, run.total_steps, run.completed)  # a bar, lines or a notebook's table
    evaluation = evaluation_of(run, args)
    try:
        with progress:
            if args.eval_on_start:  # a check that evaluation works before any time goes into training
                record = {**epoch_record(run), **evaluation()}
                if run.best is not None:  # --metric_for_best_model's name checked now; no checkpoint to load here
                    run.best.value_of(record, run.parallel)
                log(run, metrics_log, record, last_metrics)
                progress.show(record)
            elif run.probes is not None and run.completed == 0:  # the probes' answers before any training
                figures = probe_figures(run)
                if figures:  # match rates, where probes have expected answers
                    record = {**epoch_record(run), **figures}
                    log(run, metrics_log, record, last_metrics)
            for step in range(run.completed, run.total_steps):
                if run.stop_asked:  # by the event hook (a callback's should_training_stop): the run ends as done
                    break
                micro_batches, weights, local_tokens, local_weight = share_of_step(run, args, step)
                # The stop requests travel in the step's token all-reduce: every process sees the same sum,
                # so all stop before the same step, even if only one of them got the signal.
                step_tokens, step_weight, stop_votes = run.parallel.sum(
                    [local_tokens, local_weight, float(stop.signal is not None)]
                )
                if stop_votes:
                    return last_metrics, True
                learning_rate = run.optimizer.param_groups[0]["lr"]
                figures = train_step(
                    run.model, micro_batches, step_weight, run.collate, run.optimizer, run.schedule, args.max_grad_norm,
                    weights=weights, parallel=run.parallel, scaler=run.scaler, autocast=run.autocast,
                    passes=stop.abandonable,
                )  # fmt: skip
                if not math.isfinite(figures[-1]):  # the gradient norm: fp16's scaler skipped the step
                    console.print(f"fp16: the gradients overflowed at step {step + 1}; skipped, scale lowered")
                run.completed = step + 1
                run.interval.add_step(*figures, step_tokens, learning_rate)
                tell(run, "step_end", step=run.completed, epoch=run.completed / run.steps_per_epoch)
                if run.stop_asked:  # this step is the run's last: logged (and evaluated) as a last step is
                    run.total_steps = run.completed
                record = {}
                if logging_due(args, run.completed, run.total_steps):
                    record = run.interval.figures(epoch_record(run), run.parallel.device)
                if evaluation_due(args, run.completed, run.steps_per_epoch, run.total_steps) and run.eval_units:
                    record.update({**epoch_record(run), **evaluation()})
                elif run.completed == run.total_steps and run.probes is not None:  # the end, where no evaluation was
                    record.update(probe_figures(run))  # (the last step is always logged: record holds its step)
                if record:
                    log(run, metrics_log, record, last_metrics)
                    progress.show(record)
                if stops_early(run, record, console):  # --early_stopping_patience: the run ends as a finished one
                    run.stop_asked, run.total_steps = True, run.completed
                if save_due(args, run.completed, run.steps_per_epoch, run.total_steps):
                    run.saved = save(run, args)
                    tell(run, "save", checkpoint=run.saved)
                progress.advance(run.completed)
    except KeyboardInterrupt:  # a second Ctrl-C (one process): the step under way is abandoned
        run.optimizer.zero_grad(set_to_none=True)
        return last_metrics, True
    except NonFiniteStep as error:  # raised before the step applied anything: run.completed steps are good
        raise TrainingError(
            f"The loss (or the gradient norm) is not finite at step {run.completed + 1}: {error}. Nothing from this "
            f"step was applied; the last good checkpoint stays in {run.output_dir}. Try a lower --learning_rate, or "
            "--bf16 false."
        ) from None
    finally:
        if metrics_log is not None:
            metrics_log.close()
    return last_metrics, False


def share_of_step(run: Run, args: TrainingConfig, step: int) -> tuple[list[list[dict]], list[float], int, float]:
    """This process's micro-batches of `step` (lists of units), their weights (DataParallel.mine), their trained
    tokens and the loss's Σ ω over them (batches.count_weighted_tokens: the same number without example weights
    and with token normalisation), counted from the label lists: each micro-batch is collated just before its
    forward."""
    indices = micro_batches_of_step(
        step, len(run.train_units), args.per_device_train_batch_size, args.gradient_accumulation_steps,
        run.steps_per_epoch, run.seed, run.parallel.processes.world_size,
    )  # fmt: skip
    shares = run.parallel.mine(indices)
    micro_batches = [[run.train_units[index] for index in batch] for batch, _ in shares]
    weights = [weight for _, weight in shares]
    per_sample = args.loss_normalization == "sample"
    counts = [count_weighted_tokens(units, per_sample) for units, weight in zip(micro_batches, weights) if weight]
    return micro_batches, weights, sum(tokens for tokens, _ in counts), sum(total for _, total in counts)


def save(run: Run, args: TrainingConfig) -> Path:
    """checkpoint-{completed}: the weights (or adapter), optimizer, schedule, random states and trainer state."""
    processes = run.parallel.processes
    state = {
        "step": run.completed,
        "epoch": run.completed / run.steps_per_epoch,
        "seed": run.seed,
        "world_size": processes.world_size,
        "num_tokens": run.interval.total_tokens + run.interval.tokens,  # the trained tokens of all steps so far
        "data_order": run.data_order(),
        "base_model": run.base_model,
        **(run.best.state() if run.best is not None else {}),
    }
    path = save_checkpoint(
        run.output_dir, run.completed, run.model, run.optimizer, run.schedule, state, run.lora_settings,
        run.base_name, run.parallel,
    )  # fmt: skip
    if processes.is_main:
        prune(run.output_dir, args.save_total_limit, current=path, best=run.best.folder if run.best else None)
        record_outputs(run.output_dir)  # the new checkpoint is this run's; the pruned ones are gone
    return path


def save_on_stop(run: Run, args: TrainingConfig, signal: str | None, console: Console) -> None:
    """The checkpoint of the last whole step (unless it was just written), and how to continue.

    Written inside stop_requests, so that a second SIGTERM (torchrun forwards the one SLURM sent) cannot cut it."""
    path = run.saved if run.saved and run.saved.name == f"checkpoint-{run.completed}" else save(run, args)
    console.print(
        f"{signal or 'a stop request'}: stopped after step {run.completed}, saved in {path}. "
        "Continue with --resume_from_checkpoint true."
    )


def epoch_record(run: Run) -> dict:
    return {"step": run.completed, "epoch": round(run.completed / run.steps_per_epoch, 4)}


def log(run: Run, metrics_log: MetricsLog | None, record: dict, last_metrics: dict) -> None:
    """A record: to metrics.jsonl and the trackers (rank 0), kept in the run's history (TrainResult.history) and
    told to the event hook."""
    if metrics_log is not None:  # rank 0
        metrics_log.write(record)
        last_metrics.update(record)
    run.history.append(record)
    tell(run, "log", record=record)


def tell(run: Run, event: str, **info) -> None:
    """Tell the run's event hook what just happened: train_begin (model, tokenizer, total_steps), step_end (step,
    epoch), log (record), evaluate (metrics), save (checkpoint), train_end. The Python front door
    (minisft/trainer.py) turns these into its callbacks' calls. A hook that answers True asks the run to end after
    this step, as a finished run ends (its model written): a transformers callback's control.should_training_stop."""
    if run.on_event is not None and run.on_event(event, **info):
        run.stop_asked = True


def evaluation_of(run: Run, args: TrainingConfig) -> Callable[[], dict]:
    """The eval figures of run.model as it is when called (sft/step.py's evaluate), told to the event hook."""

    def evaluation() -> dict:
        metrics = evaluate(
            run.model, run.eval_units, run.collate, args.per_device_eval_batch_size, parallel=run.parallel,
            autocast=run.autocast,
        )  # fmt: skip
        metrics.update(probe_figures(run))  # --probe_prompts' match rates are eval metrics too
        tell(run, "evaluate", metrics=metrics)
        return metrics

    return evaluation


def probe_figures(run: Run) -> dict:
    """Ask the probes now (machinery/probes.py) and return their match rates; nothing without --probe_prompts."""
    return run.probes.answer(run.model, run.completed, run.autocast) if run.probes is not None else {}


# ----------------------------------------------------------------------------- setting up


def check_flags(config: RunConfig) -> None:
    """Refused before any work starts: flag combinations that cannot work (config.check_run, which ran as the
    config was built: asked again for one changed since), and the optional packages the flags need."""
    check_run(config)
    args = config.training
    check_probes(args)  # a bad --probe_prompts file, before any data is read or model loaded
    check_attention_implementation(config.model.attn_implementation)
    for tracker in chosen_trackers(args.report_to):
        import_tracker(tracker)
    if args.optim in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        import_bitsandbytes(f"--optim {args.optim}")
    if config.lora.load_in_4bit:
        import_bitsandbytes("--load_in_4bit")


def open_output_dir(
    config: RunConfig, processes: Processes, console, dataset=None
) -> tuple[Path, Path | None, OutputLock]:
    """The run's folder, checked, made and locked (rank 0), the checkpoint to resume from, and the lock to hold.

    Nothing is removed here: --overwrite_output_dir clears the previous run only once every input is open
    (prepare_output_dir)."""
    args = config.training
    output_dir = Path(args.output_dir or time.strftime("outputs/run-%Y%m%d-%H%M%S"))
    model = config.model.model_name_or_path
    # The embedded model's folder is its cache (models.embedded_model_dir), named here without converting anything.
    model_folder = cache_root() / EMBEDDED_MODEL_NAME if model.lower() == EMBEDDED_MODEL_NAME else model
    mixes = config.data.datasets is not None and dataset is None
    read = [read_from(entry) for entry in check_entries(config.data.datasets, "datasets")] if mixes else []
    refuse_unsafe_folder(output_dir, read or [data_source(config, dataset)], model_folder)
    resume_from = resolve_resume(output_dir, args.resume_from_checkpoint)
    check_output_dir(output_dir, args.overwrite_output_dir, resuming=resume_from is not None)
    barrier(processes)  # every process has checked the folder before rank 0 makes it
    lock = OutputLock(output_dir, None)  # under torchrun only rank 0 writes, and holds the lock
    if processes.is_main:
        make_folder(output_dir)
        lock = take_lock(output_dir)  # the last check: nothing after it can fail and leave it held
        if lock.note:
            console.print(lock.note, highlight=False, soft_wrap=True)
        if resume_from is not None:
            remove_leftovers(output_dir)  # what runs killed while saving left: minisft's own temporary folders
    barrier(processes)
    return output_dir, resume_from, lock


def data_source(config: RunConfig, dataset=None):
    """What the run reads its rows from: the dataset a Python caller gave, else --dataset_name, else the demo's."""
    return dataset if dataset is not None else config.data.dataset_name or demo_dataset_path()


def prepare_data(
    config: RunConfig, tokenizer, processes: Processes, console, dataset=None
) -> tuple[Sequence, Sequence | None, list[dict] | None]:
    """The train and eval units (packed rows, or examples), each split's counts said in one line. A split left
    with no example (every one dropped) is refused here, before the model loads, if it is to be used."""
    args, data, max_length = config.training, config.data, config.data.max_length
    source = data_source(config, dataset)
    mixes = data.datasets is not None and dataset is None  # a --config file's datasets: list (machinery/mixture.py)
    splits_of = (data.dataset_train_split, data.dataset_test_split, data.eval_split_size)
    files = None if mixes else folder_line(source, *splits_of)
    if files:
        console.print(files, markup=False, highlight=False, soft_wrap=True)  # file names are not rich markup
    # Under torchrun rank 0 prepares first and the others then find its preparation in the cache.
    if not processes.is_main:
        barrier(processes)
    if mixes:
        splits, line, mixture = prepare_mixture(data.datasets, tokenizer, data, config.packing, args.seed)
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        splits, mixture = load_and_prepare(source, tokenizer, config.data, config.packing, args.seed), None
    if processes.is_main:
        barrier(processes)
    evaluates = args.eval_strategy != "no" or args.eval_on_start
    if evaluates and splits.eval is None:
        asked = f"--eval_strategy {args.eval_strategy}" if args.eval_strategy != "no" else "--eval_on_start"
        raise ConfigError(
            f"{asked}: there is no eval split to evaluate on. Hold one out with "
            "--eval_split_size 0.1, or give a dataset with a test split (--dataset_test_split), or --eval_strategy no."
        )
    console.print(splits.cache_note, highlight=False)  # whether the preparation was reused (minisft/machinery/cache.py)
    pad_note = setup_pad_token(tokenizer, config.data.pad_token)  # before any batch: the tokenizer may have none
    if pad_note:
        console.print(pad_note)
    train_units = units_for(splits.train, "train", max_length, config.packing, console, used=True)
    eval_units = None
    if splits.eval is not None:
        eval_units = units_for(splits.eval, "eval", max_length, config.packing, console, used=evaluates)
    if splits.train.stats.completion_mask_unused:  # TRL's default for pre-tokenized rows: every token trained
        console.print("data: the rows' completion_mask is not applied; --completion_only_loss applies it")
    if processes.is_main:  # the pre-flight audit's warnings (machinery/audit.py); inspect --audit shows the table
        for warning in audit_split(splits.train, tokenizer).warnings:
            console.print(Text.assemble(("warning: ", "yellow"), warning), soft_wrap=True)
    return train_units, eval_units, mixture


def resume_state(
    resume_from: Path | None, args: TrainingConfig, world_size: int, console
) -> tuple[dict, TrainingConfig]:
    """The trainer state to go on from ({"step": 0} for a new run), and the training flags, with the
    per-process batch that keeps the checkpoint's global batch if it was saved by another number of processes."""
    if resume_from is None:
        return {"step": 0}, args
    state = read_trainer_state(resume_from)
    batch, accumulation, note = batch_for_processes(
        resume_from, state, args.per_device_train_batch_size, args.gradient_accumulation_steps, world_size
    )
    if note:
        console.print(note)
    return state, dataclasses.replace(args, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)


def check_data_order(resume_from: Path | None, state: dict, order, ignore_mismatch: bool, console) -> None:
    """Refused before the model loads: a resume whose steps would not see the checkpoint's run's examples."""
    if resume_from is None:
        return
    changes = check_resume(resume_from, state, order(), ignore_mismatch)
    if changes:
        console.print(f"[yellow]warning:[/] --ignore_data_order_mismatch: resuming although {'; '.join(changes)}")


def prepare_model(config: RunConfig, tokenizer, device: torch.device, console: Console, given=None):
    """The model to train (loaded, or the one a Python caller gave: adopted), its LoRA settings (None: full
    fine-tuning), and the identity of its base."""
    lora, dtype = config.lora, DTYPES[config.model.resolved_dtype()]
    quantization = (
        four_bit_quantization(
            dtype, lora.bnb_4bit_quant_type, lora.use_bnb_nested_quant, lora.bnb_4bit_quant_storage, device
        )
        if lora.load_in_4bit and given is None
        else None
    )
    model = adopt_model(given, dtype, device, lora) if given is not None else load_model(
        config.model.model_name_or_path,
        dtype=dtype,
        attn_implementation=config.model.attn_implementation,
        trust_remote_code=config.model.trust_remote_code,
        quantization_config=quantization,
        device=device,
    )  # fmt: skip
    base_model = base_identity(base_of(model), config.model.model_name_or_path)  # as loaded: before LoRA, resizing
    if quantization:
        console.print(f"QLoRA: the base's Linear layers quantized to 4-bit {lora.bnb_4bit_quant_type} as it loaded")
    fit_embeddings_to_tokenizer(model, tokenizer)
    use_sdpa_by_example(model)  # packed rows: one causal sdpa per example instead of a dense mask per row
    lora_settings = attach_lora(model, lora, console)
    check_head(model)
    if config.training.gradient_checkpointing:
        # Newer transformers name it activation_checkpointing_enable; the old name warns, and goes in v6.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.training.neftune_noise_alpha is not None:
        add_neftune_noise(model, config.training.neftune_noise_alpha)
    if config.training.torch_compile:
        compile_decoder_layers(model, config.training.torch_compile_mode)
    return model, lora_settings, base_model


def count_steps(unit_count: int, args: TrainingConfig, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total steps): --max_steps if set, else --num_train_epochs of them."""
    micro_batches_per_epoch = math.ceil(unit_count / (args.per_device_train_batch_size * world_size))
    steps_per_epoch = math.ceil(micro_batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total_steps


def open_metrics_log(config: RunConfig, output_dir: Path, start_step: int) -> MetricsLog:
    """metrics.jsonl, and the trackers of --report_to, which are given every flag of the run."""
    flags = {name: value for part in vars(config).values() for name, value in vars(part).items()}
    args = config.training
    return MetricsLog(output_dir, start_step, args.report_to, args.run_name or output_dir.name, flags)


def run_line(config: RunConfig, output_dir, processes, total_steps, warmup, model, device, autocast) -> str:
    """The run's opening line: its shape, its schedule and its memory savers; and a second line, a warning, where
    bf16 was asked for on a CPU that runs it slowly."""
    args = config.training
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    bf16_autocast = autocast is not nullcontext and not args.fp16
    warning = slow_bf16_warning(device, bf16_autocast, config.model.resolved_dtype())
    return (
        f"run {args.run_name or output_dir.name}: {total_steps} steps of {args.gradient_accumulation_steps} × "
        f"{args.per_device_train_batch_size} {'rows' if config.packing.packs('train') else 'examples'}"
        + (f" × {processes.world_size} processes ({'FSDP' if args.fsdp else 'DDP'})" if processes.distributed else "")
        + f", {warmup} warmup, {args.lr_scheduler_type} schedule, {args.optim}, {trainable:,} trainable parameters, "
        f"{device}{', fp16 autocast, gradient scaler' if args.fp16 else ''}"
        f"{', bf16 autocast' if bf16_autocast else ''}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}"
        + (f", torch.compile ({args.torch_compile_mode or 'default'} mode)" if args.torch_compile else "")
        + (f", NEFTune noise alpha {args.neftune_noise_alpha:g}" if args.neftune_noise_alpha is not None else "")
        + (", the loss averaged per example (loss_normalization sample)" if args.loss_normalization == "sample" else "")
        + ("" if config.packing.neat_packing else ", packing without attention boundaries (examples see each other)")
        + (f"\n{warning}" if warning else "")
    )


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    if contents(output_dir) and not (overwrite or resuming):
        raise ConfigError(
            f"--output_dir {output_dir} is not empty. Pass --overwrite_output_dir to train into it anyway (it "
            "removes only what the previous minisft run there wrote), or --resume_from_checkpoint true to continue it."
        )


def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool, processes: Processes, console) -> None:
    """Just before the run's first write: with --overwrite_output_dir, rank 0 removes the previous run's files
    (only those its record lists and minisft writes, minisft/machinery/outputs.py) and starts this run's record."""
    if processes.is_main:
        note = start_writing(output_dir, overwrite and not resuming)
        if note:
            console.print(note, highlight=False, soft_wrap=True)
    barrier(processes)  # nothing is written into the folder until it is cleared


def data_order(config: RunConfig, train_units: Sequence[dict], world_size: int, mixture: list[dict] | None) -> dict:
    """What decides the examples of each step: every checkpoint stores it, and a resume must match it.

    The global batch, not its split: a step covers the same units of the epoch's order whatever the
    number of processes, the per-process batch and the accumulation that multiply to it. It reads the
    flags of three stages (training's batch and seed, data's max_length, the packing), so it takes the run's."""
    args = config.training
    order = {
        "global_batch_size": world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "seed": args.seed,
        "max_length": config.data.max_length,
        "packing": config.packing.packing,
    }
    if config.packing.packing:
        order["packing_strategy"] = config.packing.packing_strategy
    # Whatever else shapes the examples (the file's content, the split, the template, the masks) shows here.
    order["train_data"] = data_fingerprint(train_units)
    if mixture is not None:  # said by name, with each source's count: a changed proportion is refused as that
        order["datasets"] = mixture
    return order


def units_for(
    prepared: PreparedDataset, split: str, max_length: int | None, packing: PackingConfig, console, used: bool
) -> Sequence[dict]:
    """What a batch of `split` is made of, packed rows or the examples themselves, and the split's one line of
    counts: what it holds, what was cut to fit max_length (or split over rows instead), what was dropped.
    A split the run uses that has no example left is refused, with why they were dropped.

    Preparation made every cut, as prepare.cut_lengths decided; a packer of bfd_split or wrapped splits instead.
    """
    stats, cut_to = prepared.stats, cut_lengths(max_length, packing)[split]
    reasons = ", ".join(f"{count:,} {reason}" for reason, count in stats.drop_reasons.items())
    if used and not stats.examples:
        if stats.drop_reasons.get("every trained token was past max_length"):
            remedy = f"raise --max_length ({max_length}), or shorten the prompts"
        elif stats.drop_reasons.get("of weight 0"):  # the rows' own weight column leaves nothing
            remedy = "give some examples a weight above 0 (weight 0 leaves an example out)"
        else:  # nothing to train on before any cut: the masks leave no token (python -m minisft.inspect shows them)
            remedy = "check the loss masking flags against the data with python -m minisft.inspect"
        raise ConfigError(
            f"data ({split}): every example was dropped ({reasons}), so there is nothing to "
            f"{'train on' if split == 'train' else 'evaluate'}: {remedy}."
        )
    packed = pack_prepared(prepared.examples, max_length, packing.packing_strategy) if packing.packs(split) else None
    if cut_to is not None:
        fitted = f"{stats.truncated:,} truncated to {cut_to} tokens ({stats.truncated_tokens:,} tokens cut)"
    elif packed is not None:
        fitted = f"{packed.stats.split_examples:,} split over rows (nothing cut)"
    else:
        fitted = "nothing cut (no --max_length)"
    line = (
        f"data ({split}): {stats.examples:,} examples, {stats.trained_tokens:,} trained tokens; {fitted}, "
        f"{stats.dropped:,} dropped" + (f" ({reasons})" if reasons else "")
    )
    if packed is None:
        console.print(line)
        return prepared.examples
    rows = packed.stats
    console.print(f"{line}; packed into {rows.rows:,} rows of {max_length}, efficiency {rows.efficiency:.1%}")
    return packed.rows


def adopt_model(model, dtype: torch.dtype, device: torch.device, lora: LoraConfig):
    """A model the caller loaded, made what load_model makes: the --dtype weights, on the run's device. LoRA layers
    it already holds (minisft's get_peft_model) are trained as they are, --use_peft's settings describing them."""
    if lora.load_in_4bit:
        raise ConfigError("--load_in_4bit quantizes the base as it loads: give the model by name, not loaded.")
    injected = bool(lora_layers(model))
    if injected and not lora.use_peft:
        raise ConfigError("The model given holds LoRA layers: train them with --use_peft and their settings.")
    if injected and model.dtype != dtype:  # a cast would take LoRA's float32 weights down with the base's
        raise ConfigError(
            f"The model given holds LoRA layers over {str(model.dtype).removeprefix('torch.')} weights, but --dtype "
            f"asks for {str(dtype).removeprefix('torch.')}: set --dtype to its dtype, or cast it before adding LoRA."
        )
    return model.to(device) if injected else model.to(device=device, dtype=dtype)


def base_of(model):
    """What checkpoint.base_identity reads of the base (its config, its parameters), also where LoRA layers were
    injected before the run: without the adapters' weights, each wrapped Linear's under its own name. So a model
    given with LoRA in it has the identity of its base loaded by name, and a resume recognises it."""
    if not lora_layers(model):
        return model
    base = [(name.replace(".base.", "."), weight) for name, weight in model.named_parameters() if ".lora_" not in name]
    return types.SimpleNamespace(config=model.config, named_parameters=lambda: iter(base))


def attach_lora(model, lora: LoraConfig, console: Console):
    """Inject LoRA, or start from an existing adapter, or train the LoRA layers the model was given with. None:
    full fine-tuning."""
    if not lora.use_peft:  # --lora_adapter and --merge_lora without it are refused with the flags (config.check_run)
        return None
    if lora_layers(model):  # injected before the run (adopt_model): the settings describe them
        console.print(f"training the LoRA adapters on {len(lora_layers(model))} Linear layers the model was given with")
        return lora.settings()
    if lora.lora_adapter:
        settings = read_adapter_settings(lora.lora_adapter)
        load_adapter(model, lora.lora_adapter)
        console.print(f"continuing the adapter {lora.lora_adapter}")
    else:
        settings = lora.settings()
        note = rank_note(model, settings)  # said before the adapters are made: too large a rank may not fit in memory
        if note:
            console.print(note, highlight=False, soft_wrap=True)
        console.print(str(inject_lora(model, settings)))
    return settings


def rank_note(model: torch.nn.Module, settings: LoraSettings) -> str | None:
    """A note when r exceeds a targeted layer's rank, min(d_in, d_out): there B A can already be any update of the
    layer, so more rank adds parameters and nothing else, up to more than training the layer itself would."""
    layers = [model.get_submodule(name) for name in resolve_targets(model, settings)[0]]
    over = [layer for layer in layers if settings.r > min(layer.in_features, layer.out_features)]
    if not over:
        return None
    adapters = sum(settings.r * (layer.in_features + layer.out_features) for layer in layers)
    full = sum(layer.in_features * layer.out_features for layer in layers)
    size = sum(parameter.numel() for parameter in model.parameters())
    ranks = ", ".join(str(rank) for rank in sorted({min(layer.in_features, layer.out_features) for layer in over}))
    every = len(over) == len(layers)
    which = "every targeted layer's rank" if every else f"the rank of {len(over)} of {len(layers)} targeted layers"
    return (
        f"note: --lora_r {settings.r} exceeds {which} ({ranks}): the adapters hold {adapters:,} parameters, "
        f"{adapters / (size + adapters):.2%} of the model with them; "
        + (
            f"full fine-tuning of the targeted layers would train fewer ({full:,})"
            if adapters > full
            else "above a layer's rank, more rank adds parameters but no expressiveness"
        )
    )


def gradient_scaler(fp16: bool, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16: the loss is multiplied by a scale before backward and the gradients divided by it before clipping;
    a step whose gradients overflowed is skipped and the scale halved. Otherwise None: train_step needs none."""
    return torch.amp.GradScaler(device.type) if fp16 else None


def mixed_precision(bf16: bool | None, fp16: bool, device: torch.device, torch_dtype: str):
    """A context manager for the forward pass: bf16 or fp16 autocast over fp32 weights, or nothing.

    bf16 is on by default only on a GPU that supports it: on a CPU a bf16 step measured 4-8× slower than
    fp32 (models.slow_bf16_warning says so when it is asked for there). fp16 (--fp16, for
    GPUs without bf16) needs its gradient scaler beside it (see train): fp16's 5 exponent bits
    underflow on small gradients unless the loss is scaled up first.
    """
    if fp16:
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and torch_dtype == "float32"
    if not bf16:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def micro_batches_of_step(
    step: int, unit_count: int, batch_size: int, accumulation: int, steps_per_epoch: int, seed: int,
    world_size: int = 1,
) -> list[list[int]]:  # fmt: skip
    """The unit indices of every micro-batch of `step`, all processes' together: a pure function of (seed, step).

    A step covers accumulation × world_size micro-batches of batch_size units.
    """
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    order = torch.randperm(unit_count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_step = accumulation * world_size
    first = step_in_epoch * per_step
    starts = range(first * batch_size, min((first + per_step) * batch_size, unit_count), batch_size)
    return [order[start : start + batch_size] for start in starts]


def steps_of(value: float, total_steps: int) -> int:
    """--logging_steps, --eval_steps or --save_steps in steps: below 1 a fraction of the run, rounded up,
    as transformers 5 reads them (0.25 of 10 steps: every 3)."""
    return math.ceil(total_steps * value) if value < 1 else int(value)


def logging_due(args: TrainingConfig, completed: int, total_steps: int) -> bool:
    every = steps_of(args.logging_steps, total_steps)
    return completed % every == 0 or completed == total_steps or (completed == 1 and args.logging_first_step)


def evaluation_due(args: TrainingConfig, completed: int, steps_per_epoch: int, total_steps: int) -> bool:
    if args.eval_strategy == "steps":
        return completed % steps_of(args.eval_steps or args.logging_steps, total_steps) == 0
    if args.eval_strategy == "epoch":
        return completed % steps_per_epoch == 0 or completed == total_steps
    return False


def saves_checkpoints(args: TrainingConfig) -> bool:
    """Whether the run writes checkpoints at all (--save_steps 0 still means never, as before --save_strategy)."""
    return args.save_strategy == "epoch" or (args.save_strategy == "steps" and args.save_steps > 0)


def save_due(args: TrainingConfig, completed: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether to write a checkpoint after step `completed`. Never after the last step: the run then writes
    its model (or adapter) to output_dir itself."""
    if completed >= total_steps or not saves_checkpoints(args):
        return False
    if args.save_strategy == "epoch":
        return completed % steps_per_epoch == 0
    return completed % steps_of(args.save_steps, total_steps) == 0


def write_outputs(run: Run, tokenizer, model_config: ModelConfig, lora: LoraConfig, console: Console) -> Path | None:
    """Rank 0 writes the model (or adapter), the tokenizer and, with --merge_lora, the merged model."""
    # Under FSDP every process sends its shards to rank 0; otherwise the model holds its weights whole.
    weights = whole_weights(run.model, run.lora_settings) if run.parallel.sharded else None
    processes, merged_dir = run.parallel.processes, None
    if processes.is_main:
        try:
            merged_dir = write_model(
                run.model, tokenizer, run.output_dir, run.lora_settings, model_config, lora, console, weights
            )
        except WRITE_ERRORS as error:
            failure = write_failure(f"the trained model to {run.output_dir}", error, run.output_dir)
            raise CheckpointError(failure) from None
        finally:
            record_outputs(run.output_dir)  # also what a failed write left: --overwrite_output_dir may clear it
    barrier(processes)
    return merged_dir


def write_model(
    model, tokenizer, output_dir: Path, lora_settings, model_config: ModelConfig, lora: LoraConfig, console,
    weights=None,
) -> Path | None:  # fmt: skip
    """`weights`: gathered from FSDP's shards (distributed.whole_weights), or None: the model holds them."""
    base_name = model_config.model_name_or_path
    if lora_settings is None:
        model.save_pretrained(output_dir, state_dict=weights)
    else:
        save_adapter(model, output_dir, lora_settings, base_name, tensors=weights)
    tokenizer.save_pretrained(output_dir)
    console.print(f"saved the {'adapter' if lora_settings else 'model'} and tokenizer to {output_dir}")
    if not lora.merge_lora:
        return None
    if lora.load_in_4bit or weights is not None:
        # A 4-bit base cannot take the update exactly, and a sharded one is not whole in this process:
        # merge into the full-precision base, loaded afresh, instead.
        model = load_model(
            base_name, dtype=DTYPES[model_config.resolved_dtype()], trust_remote_code=model_config.trust_remote_code
        )
        fit_embeddings_to_tokenizer(model, tokenizer)
        load_adapter(model, output_dir)
    merged_dir = output_dir / "merged"
    merged_model(model).save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    console.print(f"saved the merged model to {merged_dir}")
    return merged_dir


# ----------------------------------------------------------------------------- metrics


class Interval:
    """Figures summed between two log lines (over all processes)."""

    def __init__(self, total_tokens: int = 0):
        self.total_tokens = total_tokens  # a resumed run goes on from the checkpoint's count
        self.reset()

    def reset(self):
        self.steps, self.loss, self.tokens, self.correct, self.entropy = 0, 0.0, 0, 0, 0.0
        self.started = time.perf_counter()

    def add_step(self, loss, correct, entropy, grad_norm: float, tokens, learning_rate: float) -> None:
        self.steps += 1
        self.loss += loss
        self.tokens += int(tokens)
        self.correct += int(correct)
        self.entropy += entropy
        self.grad_norm, self.learning_rate = grad_norm, learning_rate

    def figures(self, where: dict, device: torch.device) -> dict:
        """The interval's log record, after `where` ({"step", "epoch"}); the next interval starts."""
        seconds = time.perf_counter() - self.started
        self.total_tokens += self.tokens
        record = {
            **where,
            "loss": self.loss / max(self.steps, 1),
            "learning_rate": self.learning_rate,
            "grad_norm": self.grad_norm,
            "num_tokens": self.total_tokens,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else 0.0,
            "mean_token_accuracy": self.correct / max(self.tokens, 1),
            "entropy": self.entropy / max(self.tokens, 1),
            "peak_memory_mb": peak_memory_mb(device),
        }
        self.reset()
        return record


def peak_memory_mb(device: torch.device) -> float:
    """On a GPU the allocator's peak; on a CPU the process's peak resident memory since it started.

    On Linux that is /proc's VmHWM, not getrusage's ru_maxrss: at exec Linux folds the launching process's
    high-water mark into ru_maxrss, so a run started from a larger process (a notebook, a benchmark's driver)
    would report that process's peak as its own.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):  # not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS counts bytes, the BSDs KiB
