"""`python -m minisft.plot`: a PNG of the curves, or one line saying how to install matplotlib."""

import json
import sys

import pytest

from minisft.machinery.cli import run
from minisft.plot import main

from .tiny_runs import records


@pytest.fixture
def run_dir(tmp_path):
    lines = records([3.0, 2.0, 1.0, 0.6, 0.3], {2: 2.5, 4: 1.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path


def test_writes_a_png_of_the_curves(run_dir, capsys):
    pyplot = pytest.importorskip("matplotlib.pyplot")  # a test extra; the plot extra for users
    run(main, [str(run_dir)])
    path = run_dir / "metrics.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = pyplot.imread(path).shape
    assert width > 2 * height  # three panels side by side
    assert f"wrote {path}" in capsys.readouterr().err
    run(main, [str(run_dir), "--output", str(run_dir / "elsewhere.png")])
    assert (run_dir / "elsewhere.png").is_file()


def test_without_matplotlib_it_says_how_to_install_it(run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        run(main, [str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install "minisft[plot]"' in err and "Traceback" not in err
    assert not (run_dir / "metrics.png").exists()


def test_a_torn_last_line_is_dropped_with_a_note(run_dir, capsys):
    """An interrupted run's metrics.jsonl ends in half a line: plotted without it, and said so."""
    pytest.importorskip("matplotlib")
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "ep')
    run(main, [str(run_dir)])
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = " ".join(capsys.readouterr().err.split())
    assert f"note: {run_dir / 'metrics.jsonl'} line 6: dropped, 15 bytes without a newline" in err


def test_probe_match_rates_get_a_panel_of_their_own(run_dir, monkeypatch):
    """--probe_prompts with expected answers: each kind's match rate, from step 0 to the end, in a fourth panel."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from minisft.plot import plot

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = {0: (0.0, 1.0), 2: (0.5, 1.0), 4: (1.0, 0.5)}  # step: (trained, general)
    lines = [{"step": 0, "epoch": 0.0}] + lines
    for line in lines:
        if line["step"] in rates:
            line["eval_probe_match_trained"], line["eval_probe_match_general"] = rates[line["step"]]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    drawn = {}
    draw = Axes.plot
    monkeypatch.setattr(
        Axes, "plot", lambda axis, x, y, **style: drawn.update({style["label"]: (x, y)}) or draw(axis, x, y, **style)
    )
    plot(run_dir)
    assert drawn["eval_probe_match_trained"] == ((0, 2, 4), (0.0, 0.5, 1.0))
    assert drawn["eval_probe_match_general"] == ((0, 2, 4), (1.0, 1.0, 0.5))
    assert drawn["eval_loss"] == ((2, 4), (2.5, 1.2))  # the other panels as before
