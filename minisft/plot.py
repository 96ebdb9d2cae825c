"""`python -m minisft.plot OUTPUT_DIR`: a run's curves as a PNG, the four the second seed says to monitor.

    loss and eval loss      is it learning, and does it generalise? (see minisft/summary.py for the warning signs)
    learning rate           the schedule: warmup, then linear or cosine decay
    gradient norm           spikes mean unstable steps; clipped at --max_grad_norm

matplotlib is an optional extra: pip install "minisft[plot]".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .machinery.cli import run
from .machinery.extras import import_optional
from .summary import curve, read_metrics

PANELS = [
    ("loss", ["loss", "eval_loss"]),
    ("learning rate", ["learning_rate"]),
    ("gradient norm", ["grad_norm"]),
]


def plot(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw output_dir/metrics.jsonl into a PNG (default: output_dir/metrics.png) and return its path."""
    records = read_metrics(output_dir, Console(stderr=True))
    install = 'pip install "minisft[plot]" (or pip install matplotlib)'
    matplotlib = import_optional("matplotlib", "python -m minisft.plot", "matplotlib", install)
    matplotlib.use("Agg")  # files only: no display needed, as on a server
    import matplotlib.pyplot as pyplot

    path = Path(path) if path else Path(output_dir) / "metrics.png"
    figure, axes = pyplot.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), layout="constrained")
    for axis, (title, names) in zip(axes, PANELS):
        for name in names:
            points = curve(records, name)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(names) > 1:
            axis.legend()
    figure.suptitle(str(output_dir))
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minisft.plot", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="The --output_dir of a minisft run (it holds metrics.jsonl).")
    parser.add_argument("--output", help="Where to write the PNG. Default: OUTPUT_DIR/metrics.png.")
    args = parser.parse_args(argv)
    Console(stderr=True).print(f"wrote {plot(args.output_dir, args.output)}", markup=False, highlight=False)


if __name__ == "__main__":
    run(main)
