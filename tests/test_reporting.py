"""--report_to: every tracker gets each logged figure at its step, under transformers' names; a missing tracker
package is one line before any work.

wandb, trackio and mlflow are not installed with the test extras, so the wiring is checked against stand-ins
that record the calls minisft makes on each package's API; where wandb is installed, a real offline run is too.
"""

import importlib.util
import json
import sys
import types

import pytest

from minisft.machinery.cli import run
from minisft.machinery.config import ConfigError, TrainingConfig
from minisft.machinery.loop import train
from minisft.machinery.reporting import MetricsError, MetricsLog, chosen_trackers, tracker_name
from minisft.train import main

from .tiny_runs import metrics, run_config


def recording_module(name: str, calls: list) -> types.ModuleType:
    """A stand-in for a tracker package: each function records (package, function, args, kwargs)."""
    module = types.ModuleType(name)

    def recorder(function):
        def record(*args, **kwargs):
            calls.append((name, function, args, kwargs))

        return record

    for function in ("init", "log", "finish", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(module, function, recorder(function))
    return module


def test_tracker_names_are_transformers_names():
    """A record's figures reach the trackers under the names transformers' integrations give them (rewrite_logs):
    train/loss, and eval/loss for eval_loss, not eval/eval_loss."""
    from transformers.integrations.integration_utils import rewrite_logs

    record = {"loss": 1.0, "mean_token_accuracy": 0.5, "eval_loss": 2.0, "eval_mean_token_accuracy": 0.4}
    assert [tracker_name(name) for name in record] == list(rewrite_logs(record))


def test_every_tracker_gets_every_figure_at_its_step(tiny_dir, tmp_path, monkeypatch):
    calls = []
    for name in ("wandb", "trackio", "mlflow"):
        monkeypatch.setitem(sys.modules, name, recording_module(name, calls))
    output_dir = tmp_path / "out"
    config = run_config(tiny_dir, output_dir, max_steps=3, report_to=["tensorboard", "wandb", "trackio", "mlflow"])
    config.training.run_name = "my-run"
    train(config)

    logged = [
        {f"train/{key}": value for key, value in record.items() if key not in ("step", "epoch")}
        for record in metrics(output_dir)
    ]
    steps = [record["step"] for record in metrics(output_dir)]
    assert steps == [1, 2, 3]
    wandb_logs = [
        (args[0], kwargs["step"])
        for package, function, args, kwargs in calls
        if package == "wandb" and function == "log"
    ]
    assert wandb_logs == list(zip(logged, steps))
    trackio_logs = [
        (args[0], kwargs["step"])
        for package, function, args, kwargs in calls
        if package == "trackio" and function == "log"
    ]
    assert trackio_logs == list(zip(logged, steps))
    mlflow_logs = [(args[0], kwargs["step"]) for package, function, args, kwargs in calls if function == "log_metrics"]
    assert mlflow_logs == list(zip(logged, steps))
    started = {package: kwargs for package, function, args, kwargs in calls if function in ("init", "start_run")}
    assert started["wandb"]["name"] == started["trackio"]["name"] == started["mlflow"]["run_name"] == "my-run"
    assert started["wandb"]["config"]["learning_rate"] == config.training.learning_rate  # the run's flags
    finished = {package for package, function, _, _ in calls if function in ("finish", "end_run")}
    assert finished == {"wandb", "trackio", "mlflow"}
    assert any((output_dir / "runs" / "my-run").iterdir())  # TensorBoard's event file, beside them


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (not a test extra)")
def test_wandb_offline(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    output_dir = tmp_path / "out"
    train(run_config(tiny_dir, output_dir, max_steps=2, report_to=["wandb"]))
    assert list((output_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("tracker", ["wandb", "trackio", "mlflow"])
def test_a_missing_tracker_is_one_line_before_any_work(tracker, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now raises ImportError
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--model_name_or_path", tiny_dir, "--output_dir", str(output_dir), "--report_to", tracker])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--report_to {tracker} needs the {tracker} package: pip install {tracker}" in error
    assert "Traceback" not in error and not output_dir.exists()


def test_none_stands_alone_and_all_means_the_installed_ones():
    with pytest.raises(ConfigError, match="none means no tracker"):
        TrainingConfig(report_to=["none", "wandb"])
    installed = [name for name in ("wandb", "trackio", "mlflow") if importlib.util.find_spec(name)]
    assert chosen_trackers(["all"]) == ["tensorboard", *installed]  # tensorboard is a test extra
    assert chosen_trackers(["none"]) == [] and TrainingConfig(report_to="wandb").report_to == ["wandb"]
    assert json.dumps(TrainingConfig().report_to) == '["none"]'


def test_a_resume_drops_a_torn_last_line_with_a_note_and_keeps_a_whole_one(tmp_path):
    """A run killed while appending leaves its last line cut short: the old code stopped there with a traceback."""
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    log = MetricsLog(tmp_path, 3, ["none"], "run", {})
    assert log.note.startswith(f"{tmp_path / 'metrics.jsonl'} line 4: dropped, 15 bytes without a newline")
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"

    # Whole but for its newline (the write stopped just before it): kept, and nothing to say.
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    log = MetricsLog(tmp_path, 3, ["none"], "run", {})
    assert log.note is None and (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"


def test_a_bad_line_before_the_last_stops_a_resume_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": "2"}\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl line 2: not a record of a logging step"):
        MetricsLog(tmp_path, 3, ["none"], "run", {})
