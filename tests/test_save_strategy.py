"""When a run logs, evaluates and saves: --save_strategy, the step flags as fractions of the run (read as
transformers 5 reads them), --logging_first_step, --eval_on_start and --run_name."""

import io
from types import SimpleNamespace

import pytest
from rich.console import Console
from transformers import TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState

from minisft.machinery.config import TrainingConfig
from minisft.machinery.loop import logging_due, save_due, steps_of, train

from .tiny_runs import metrics, run_config


@pytest.mark.parametrize("value", [0.1, 0.25, 0.3, 0.5, 0.99, 1, 7, 500])
@pytest.mark.parametrize("total_steps", [1, 7, 10, 33])
def test_steps_of_is_transformers_reading(value, total_steps):
    state = TrainerState()
    state.compute_steps(SimpleNamespace(logging_steps=value, eval_steps=value, save_steps=value), total_steps)
    assert steps_of(value, total_steps) == state.logging_steps == state.save_steps


def transformers_decisions(total_steps: int, **flags) -> list[TrainerControl]:
    """transformers' DefaultFlowCallback's decision after each step 1..total_steps."""
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **flags)
    state = TrainerState(max_steps=total_steps)
    state.compute_steps(args, total_steps)
    decisions = []
    for step in range(1, total_steps + 1):
        state.global_step = step
        decisions.append(DefaultFlowCallback().on_step_end(args, state, TrainerControl()))
    return decisions


@pytest.mark.parametrize("save_steps", [0.25, 3, 1])
def test_save_steps_saves_where_transformers_does_but_the_last_step(save_steps):
    total = 10
    expected = [control.should_save for control in transformers_decisions(total, save_steps=save_steps)]
    args = TrainingConfig(save_steps=save_steps)
    ours = [save_due(args, step, steps_per_epoch=4, total_steps=total) for step in range(1, total + 1)]
    # The last step: transformers saves a checkpoint, minisft writes the model itself to output_dir.
    assert ours == expected[:-1] + [False]
    assert any(ours)


def test_save_strategy_epoch_no_and_save_steps_zero():
    by_epoch = TrainingConfig(save_strategy="epoch")
    assert [step for step in range(1, 10) if save_due(by_epoch, step, 3, 10)] == [3, 6, 9]
    for never in (TrainingConfig(save_strategy="no", save_steps=1), TrainingConfig(save_steps=0)):
        assert not any(save_due(never, step, 3, 10) for step in range(1, 11))


@pytest.mark.parametrize("logging_first_step", [False, True])
def test_logging_steps_as_a_fraction_and_the_first_step(logging_first_step):
    total = 10
    decisions = transformers_decisions(total, logging_steps=0.3, logging_first_step=logging_first_step)
    expected = [step for step, control in enumerate(decisions, 1) if control.should_log]
    args = TrainingConfig(logging_steps=0.3, logging_first_step=logging_first_step)
    ours = [step for step in range(1, total + 1) if logging_due(args, step, total)]
    assert ours == sorted({*expected, total})  # minisft also logs the last step
    assert (1 in ours) == logging_first_step


def test_a_run_with_fractions_first_step_eval_on_start_and_a_name(tiny_dir, tmp_path):
    output = io.StringIO()
    flags = dict(max_steps=4, logging_steps=0.5, logging_first_step=True, eval_strategy="steps", eval_steps=0.5)
    flags |= dict(eval_on_start=True, run_name="named", save_steps=0.5)
    config = run_config(tiny_dir, tmp_path / "out", **flags)
    config.data.eval_split_size = 0.2
    train(config, Console(file=output, width=400))
    records = metrics(tmp_path / "out")
    assert [(record["step"], "loss" in record, "eval_loss" in record) for record in records] == [
        (0, False, True),  # --eval_on_start: the untrained model
        (1, True, False),  # --logging_first_step
        (2, True, True),  # 0.5 of 4 steps: every 2
        (4, True, True),
    ]
    assert any(line.startswith("run named: ") for line in output.getvalue().splitlines())
    assert [path.name for path in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-2"]


@pytest.mark.parametrize("strategy, checkpoints", [("epoch", ["checkpoint-3", "checkpoint-6"]), ("no", [])])
def test_save_strategy_in_a_run(tiny_dir, tmp_path, strategy, checkpoints):
    # 10 conversations in batches of 4: 3 steps an epoch, 9 steps in 3 epochs; the last is the model itself.
    config = run_config(
        tiny_dir,
        tmp_path,
        max_steps=-1,
        num_train_epochs=3,
        per_device_train_batch_size=4,
        save_steps=1,
        save_strategy=strategy,
    )
    train(config, Console(file=io.StringIO()))
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == checkpoints
    assert (tmp_path / "model.safetensors").is_file()
