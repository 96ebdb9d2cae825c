"""The end-of-run summary: curves, figures, and the warning signs detected from the metrics."""

import json
import shlex

import pytest
from rich.console import Console

from minisft.machinery.cli import run
from minisft.summary import chart, main, print_summary, warning_signs

from .tiny_runs import records


def test_healthy_run_has_no_warning_signs():
    assert warning_signs(records([3.0, 2.2, 1.8, 1.5, 1.3], {2: 2.5, 4: 2.0, 5: 1.9})) == []


def test_eval_rising_while_train_falls_is_overfitting():
    signs = warning_signs(records([3.0, 2.0, 1.0, 0.6, 0.3], {1: 2.9, 3: 2.0, 5: 2.6}))
    assert len(signs) == 1 and signs[0].startswith("Overfitting: eval loss rose from 2 (step 3) to 2.6 (step 5)")


def test_overfitting_advice_points_to_the_best_checkpoint_or_the_flags_that_keep_it():
    overfit = records([3.0, 2.0, 1.0, 0.6, 0.3], {1: 2.9, 3: 2.0, 5: 2.6})
    assert "--load_best_model_at_end saves the best evaluation's weights" in warning_signs(overfit)[0]
    end = {"best_global_step": 3, "metric_for_best_model": "eval_loss", "best_metric": 2.0, "stop_reason": "max_steps"}
    kept = warning_signs([*overfit, {"step": 5, **end, "best_model_checkpoint": "out/checkpoint-3"}])[0]
    assert kept.endswith("The best evaluation's weights were kept: step 3's, by eval_loss, are the saved model.")
    end["stop_reason"] = "stopped by SIGTERM"
    cut = warning_signs([*overfit, {"step": 5, **end, "best_model_checkpoint": "out/checkpoint-3"}])[0]
    assert cut.endswith("are out/checkpoint-3.")


def test_eval_rising_with_train_rising_is_not_overfitting():
    # Both curves going up is a diverging run, not a model that fits the train examples too well.
    signs = warning_signs(records([3.0, 2.0, 1.5, 1.8, 2.5], {1: 2.9, 3: 2.0, 5: 2.6}))
    assert not any(sign.startswith("Overfitting") for sign in signs)


def test_no_real_improvement_is_underfitting_and_suggests_a_higher_learning_rate():
    signs = warning_signs(records([2.50, 2.48, 2.45, 2.40]))
    assert len(signs) == 1 and signs[0].startswith("Under-fitting") and "--learning_rate" in signs[0]


def test_a_flat_train_curve_is_not_underfitting_when_the_eval_loss_fell_well():
    """The issue's run: train loss 2.103 → 2.08 (a few examples per step, noisy) while eval loss fell 35%."""
    assert warning_signs(records([2.103, 2.09, 2.095, 2.08], {1: 2.0, 2: 1.6, 4: 1.3})) == []
    signs = warning_signs(records([2.103, 2.09, 2.095, 2.08], {1: 2.0, 4: 1.95}))  # both flat: under-fitting
    assert len(signs) == 1
    assert signs[0].startswith("Under-fitting: train loss went from 2.103 to only 2.08, eval loss from 2 to 1.95.")


def test_a_slow_runs_speed_keeps_its_digits(tmp_path):
    lines = [{**record, "tokens_per_second": 0.42} for record in records([3.0, 2.0])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    console = Console(record=True, width=120)
    print_summary(tmp_path, console)
    assert "speed                  0.42 trained tokens/s" in console.export_text()  # it said 0


def test_extremely_low_loss_is_memorisation():
    signs = warning_signs(records([2.0, 0.5, 0.1, 0.01]))
    assert len(signs) == 1 and signs[0].startswith("Memorisation: the final train loss 0.01")


def test_chart_puts_the_points_where_they_belong():
    lines = chart({"loss": [(1, 4.0), (11, 0.5)], "eval_loss": [(11, 2.25)]}, width=11, height=3)
    rows = [line.split("┤", 1)[1] for line in lines[:3]]
    assert rows[0] == "[cyan]•[/]" + " " * 10  # the highest value, first step: top left
    assert rows[1].endswith("[magenta]◆[/]")  # halfway down, last step
    assert rows[2].endswith("[cyan]•[/]")  # the lowest value, last step: bottom right
    assert lines[0].startswith("  4 ┤") and lines[2].startswith("0.5 ┤")  # the axis labels
    assert "step 1" in lines[-1] and lines[-1].endswith("step 11")


def test_summary_prints_figures_and_signs(tmp_path):
    lines = records([3.0, 2.0, 1.0, 0.6, 0.03], {1: 2.9, 3: 2.0, 5: 2.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    console = Console(record=True, width=120)
    signs = print_summary(tmp_path, console)
    text = console.export_text()
    assert [sign.split(":")[0] for sign in signs] == ["Overfitting", "Memorisation"]
    assert "train loss             3 → 0.03" in text
    assert "eval loss              2.9 → 2.6 (best 2 at step 3)" in text
    assert "mean token accuracy    50.0% (last logging interval), eval 30.0% (last evaluation)" in text
    assert "warning: Overfitting" in text and f"python -m minisft.plot {tmp_path}" in text


def test_missing_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(main, [str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: no such file" in err and "Traceback" not in err


def write_with_a_torn_line(folder, lines):
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (folder / "metrics.jsonl").write_text(text + '{"step": 6, "epoch": 0.6, "lo')  # a run killed mid-write


def test_a_torn_last_line_is_dropped_with_a_note(tmp_path, capsys):
    """What an interrupted run leaves: the old summary stopped on it with a traceback."""
    write_with_a_torn_line(tmp_path, records([3.0, 2.0, 1.5, 1.2, 1.0]))
    run(main, [str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: {tmp_path / 'metrics.jsonl'} line 6: dropped, 29 bytes without a newline" in out
    assert "train loss 3 → 1" in out and "steps 5 (0.5 epochs)" in out


def test_a_bad_line_before_the_last_is_one_line_naming_it(tmp_path, capsys):
    lines = [json.dumps(line) + "\n" for line in records([3.0, 2.0, 1.5])]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "[1, 2]\n" + lines[2])
    with pytest.raises(SystemExit) as exit_info:
        run(main, [str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'metrics.jsonl'} line 2: not a record of a logging step" in err


def test_the_plot_command_pastes_back_as_the_folder(tmp_path):
    """A folder name the shell would read as two commands (or rich as markup) is printed quoted, as it is."""
    folder = tmp_path / "run; touch pwned [bold]x"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in records([3.0, 2.0])))
    console = Console(record=True, width=40)
    print_summary(folder, console)
    command = next(line for line in console.export_text().splitlines() if line.startswith("Plot it:"))
    assert shlex.split(command) == ["Plot", "it:", "python", "-m", "minisft.plot", str(folder)]
