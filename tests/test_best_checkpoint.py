"""--load_best_model_at_end and early stopping (minisft/machinery/best_checkpoint.py), on a run made to overfit.

Two conversations to train on, four others to evaluate on, a constant high learning rate: on the tiny model the eval
loss falls for four steps, then rises while the train loss keeps falling. Every comparison of weights is bit for bit
(torch.equal): the saved model must be the best checkpoint's, not a model close to it.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from minisft.machinery.checkpoint import CheckpointError, prune, read_trainer_state
from minisft.machinery.cli import run
from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainingConfig
from minisft.machinery.loop import train
from minisft.summary import print_summary
from minisft.train import main

from .tiny_runs import CONVERSATIONS, metrics

pytestmark = pytest.mark.usefixtures("one_thread")

OVERFIT = dict(
    max_steps=15, learning_rate=3e-2, lr_scheduler_type="constant", per_device_train_batch_size=2, logging_steps=1,
    eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train.jsonl: two conversations; test.jsonl: four others (the eval split)."""
    folder = tmp_path_factory.mktemp("overfit_data")
    for name, pairs in (("train.jsonl", CONVERSATIONS[:2]), ("test.jsonl", CONVERSATIONS[5:9])):
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def overfit_config(tiny_dir, data_dir, output_dir, lora=None, **flags) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model_name_or_path=tiny_dir),
        data=DataConfig(dataset_name=str(data_dir), max_length=128),
        lora=lora or LoraConfig(),
        training=TrainingConfig(output_dir=str(output_dir), **{**OVERFIT, **flags}),
    )


def tensors_equal(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    first, second = load_file(a / name), load_file(b / name)
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def evaluations(output_dir: Path, name: str = "eval_loss") -> dict[int, float]:
    return {record["step"]: record[name] for record in metrics(output_dir) if name in record}


@pytest.fixture(scope="module")
def stopped(tiny_dir, data_dir, tmp_path_factory):
    """The overfitting run with patience 3 and --save_total_limit 1."""
    output_dir = tmp_path_factory.mktemp("stopped")
    train(overfit_config(tiny_dir, data_dir, output_dir, early_stopping_patience=3, save_total_limit=1))
    return output_dir


# ----------------------------------------------------------------------------- early stopping, the best saved


def test_early_stopping_stops_an_overfitting_run_and_saves_the_best_checkpoint_bit_for_bit(stopped):
    losses = evaluations(stopped)
    best = min(losses, key=losses.get)
    assert best == 4 and max(losses) == 7 < OVERFIT["max_steps"]  # 3 evaluations past the best, then stopped
    assert all(losses[step] > losses[best] for step in (5, 6, 7))
    end = metrics(stopped)[-1]
    assert end["stop_reason"] == "early stopping: 3 evaluations without improvement (patience 3)"
    assert (end["best_global_step"], end["best_metric"]) == (4, losses[4])
    assert tensors_equal(stopped, stopped / "checkpoint-4")
    assert not tensors_equal(stopped, stopped / "checkpoint-6")  # the weights did move on after the best


def test_save_total_limit_1_keeps_the_best_checkpoint_and_the_newest(stopped, tmp_path):
    assert sorted(path.name for path in stopped.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for step in (2, 3, 5, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    prune(tmp_path, 2, current=tmp_path / "checkpoint-8", best=tmp_path / "checkpoint-3")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-8"]  # 2: best and newest


def test_the_trainer_state_keeps_the_best_and_the_patience_count(stopped, tmp_path):
    state = read_trainer_state(stopped / "checkpoint-6")
    assert state["best_global_step"] == 4 and state["best_metric"] == evaluations(stopped)[4]
    assert state["best_model_checkpoint"] == str(stopped / "checkpoint-4")
    assert (state["metric_for_best_model"], state["greater_is_better"]) == ("eval_loss", False)
    assert state["early_stopping_patience_counter"] == 2  # steps 5 and 6 did not improve on step 4
    copy = shutil.copytree(stopped / "checkpoint-6", tmp_path / "checkpoint-6")
    (copy / "trainer_state.json").write_text(json.dumps({**state, "best_global_step": "4"}))  # edited by hand
    with pytest.raises(CheckpointError, match='best_global_step "4", where a whole number ≥ 1, or null belongs'):
        read_trainer_state(copy)


def test_a_resume_goes_on_counting_the_patience_from_the_checkpoint(tiny_dir, data_dir, stopped, tmp_path):
    """Resumed from checkpoint-6 (two evaluations without improvement): one more, step 7's, ends it, as before."""
    output_dir = shutil.copytree(stopped, tmp_path / "out", ignore=shutil.ignore_patterns(".minisft.lock"))
    flags = dict(early_stopping_patience=3, save_total_limit=1, resume_from_checkpoint="true")
    result = train(overfit_config(tiny_dir, data_dir, output_dir, **flags))
    assert result.steps == 7 and metrics(output_dir)[-1]["best_global_step"] == 4
    assert tensors_equal(output_dir, stopped) and tensors_equal(output_dir, stopped / "checkpoint-4")


def test_a_resume_that_compares_by_another_metric_is_refused(tiny_dir, data_dir, stopped, tmp_path):
    output_dir = shutil.copytree(stopped, tmp_path / "out", ignore=shutil.ignore_patterns(".minisft.lock"))
    flags = dict(metric_for_best_model="mean_token_accuracy", resume_from_checkpoint="true")
    with pytest.raises(CheckpointError, match=r"compared checkpoints by eval_loss \(lower is better\); this run asks"):
        train(overfit_config(tiny_dir, data_dir, output_dir, **flags))


def test_the_summary_and_the_plot_show_the_best_step_and_why_the_run_stopped(stopped, monkeypatch):
    console = Console(record=True, width=200)
    print_summary(stopped, console)
    text = " ".join(console.export_text().split())
    assert f"best checkpoint step 4, eval_loss {evaluations(stopped)[4]:.4g} (the saved model)" in text
    assert "stopped early stopping: 3 evaluations without improvement (patience 3)" in text
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from minisft.plot import plot

    marked = []
    draw = Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda axis, x, **style: marked.append(x) or draw(axis, x, **style))
    plot(stopped)
    assert marked == [4]


# ----------------------------------------------------------------------------- LoRA, another metric


def test_with_lora_the_saved_adapter_is_the_best_checkpoints(tiny_dir, data_dir, tmp_path):
    lora = LoraConfig(use_peft=True, lora_r=8, lora_alpha=16)
    result = train(overfit_config(tiny_dir, data_dir, tmp_path, lora, learning_rate=0.1, early_stopping_patience=3))
    losses, end = evaluations(tmp_path), metrics(tmp_path)[-1]
    best = min(losses, key=losses.get)
    assert result.steps < OVERFIT["max_steps"] and end["stop_reason"].startswith("early stopping")
    assert end["best_global_step"] == best != result.steps
    adapter = "adapter_model.safetensors"
    assert tensors_equal(tmp_path, tmp_path / f"checkpoint-{best}", adapter)
    assert not tensors_equal(tmp_path, tmp_path / f"checkpoint-{result.steps - 1}", adapter)


def test_a_metric_that_rises_is_better_higher(tiny_dir, data_dir, tmp_path):
    """eval_mean_token_accuracy ("mean_token_accuracy": eval_ may be left out): higher is better unless told."""
    config = overfit_config(tiny_dir, data_dir, tmp_path, max_steps=6, metric_for_best_model="mean_token_accuracy")
    assert config.training.greater_is_better is True
    train(config)
    accuracy, end = evaluations(tmp_path, "eval_mean_token_accuracy"), metrics(tmp_path)[-1]
    best = max(accuracy, key=accuracy.get)  # the first of the highest: a tie is no improvement
    assert best != min(accuracy, key=accuracy.get) and best != 6
    assert (end["best_global_step"], end["metric_for_best_model"]) == (best, "eval_mean_token_accuracy")
    assert end["stop_reason"] == "max_steps (6)"
    assert tensors_equal(tmp_path, tmp_path / f"checkpoint-{best}")


# ----------------------------------------------------------------------------- refused


def cli(tiny_dir, data_dir, output_dir, *flags) -> list[str]:
    common = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_dir), "--output_dir", str(output_dir)]
    return [*common, "--max_steps", "3", "--max_length", "128", *flags]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--load_best_model_at_end"], "compares evaluations: set --eval_strategy steps or epoch"),
        (["--load_best_model_at_end", "--eval_strategy", "epoch"], "--save_strategy steps must be --eval_strategy's"),
        (
            ["--load_best_model_at_end", "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "2"],
            "a checkpoint at every evaluation: --eval_steps 3 must be a multiple of --save_steps 2",
        ),
        (
            ["--load_best_model_at_end", "--eval_strategy", "steps", "--eval_steps", "0.5", "--save_steps", "1"],
            "--eval_steps 0.5 must be a multiple of --save_steps 1 (fractions of the run: the same fraction)",
        ),
        (["--early_stopping_patience", "2", "--eval_strategy", "steps"], "needs --load_best_model_at_end"),
        (["--metric_for_best_model", "eval_loss"], "--metric_for_best_model needs --load_best_model_at_end"),
        (["--early_stopping_patience", "0"], "--early_stopping_patience must be a number of evaluations, at least 1"),
    ],
)
def test_combinations_that_cannot_work_are_one_line_before_any_work(tiny_dir, data_dir, tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        run(main, cli(tiny_dir, data_dir, tmp_path / "out", *flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert words in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_an_unknown_metric_is_refused_at_the_first_evaluation_naming_those_there_are(
    tiny_dir, data_dir, tmp_path, capsys
):  # fmt: skip
    flags = ["--load_best_model_at_end", "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1"]
    flags += ["--metric_for_best_model", "bleu", "--eval_on_start"]  # checked before the first step
    with pytest.raises(SystemExit) as exit_info:
        run(main, cli(tiny_dir, data_dir, tmp_path, *flags))
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "--metric_for_best_model eval_bleu: the evaluation gives no such figure; it gives eval_loss," in err
    assert not list(tmp_path.glob("checkpoint-*"))


def test_transformers_early_stopping_callback_is_the_patience_flag(tiny_dir, data_dir, tmp_path):
    from transformers import EarlyStoppingCallback

    from minisft import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", save_steps=10)
    callback = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.01)
    trainer = SFTTrainer(tiny_dir, args=args, train_dataset=str(data_dir), callbacks=[callback])
    assert (trainer.args.early_stopping_patience, trainer.args.early_stopping_threshold) == (2, 0.01)
    assert trainer.args.metric_for_best_model == "loss" and trainer.args.greater_is_better is False
    assert trainer.callbacks == []  # the loop stops itself; the callback would wait for a best_metric never set


def test_the_front_doors_state_names_the_best_as_transformers_does(tiny_dir, data_dir, tmp_path):
    from transformers import EarlyStoppingCallback

    from minisft import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_length=128, **OVERFIT)
    trainer = SFTTrainer(tiny_dir, args=args, train_dataset=str(data_dir), callbacks=[EarlyStoppingCallback(3)])
    trainer.train()
    losses = evaluations(tmp_path)
    best = min(losses, key=losses.get)
    assert trainer.state.global_step < OVERFIT["max_steps"] and best < trainer.state.global_step  # it stopped early
    assert (trainer.state.best_global_step, trainer.state.best_metric) == (best, losses[best])
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
