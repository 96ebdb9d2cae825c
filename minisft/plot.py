"""`python -m minisft.plot OUTPUT_DIR`: a run's curves as a PNG, the four the second seed says to monitor.

    loss and eval loss      is it learning, and does it generalise? (see minisft/summary.py for the warning signs)
    learning rate           the schedule: warmup, then linear or cosine decay
    gradient norm           spikes mean unstable steps; clipped at --max_grad_norm

A run with --load_best_model_at_end has its best step marked on the loss panel: the checkpoint that was saved.
A run with --probe_prompts that have expected answers gets a fourth panel, the share of each kind's probes
answered right (eval_probe_match_<kind>), from before the first step to the end: did it learn, did it forget?

matplotlib is an optional extra: pip install "minisft[plot]".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .machinery.cli import run
from .machinery.extras import import_optional
from .summary import curve, read_metrics, run_end

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
    matches = sorted({name for record in records for name in record if name.startswith("eval_probe_match_")})
    panels = PANELS + ([("probes answered right", matches)] if matches else [])
    figure, axes = pyplot.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), layout="constrained")
    end = run_end(records)
    if end is not None and end["best_global_step"] is not None:  # on the loss panel, before its legend is drawn
        label = f"best: step {end['best_global_step']} ({end['metric_for_best_model']} {end['best_metric']:.4g})"
        axes[0].axvline(end["best_global_step"], color="grey", linestyle="--", linewidth=1, label=label)
    for axis, (title, names) in zip(axes, panels):
        for name in names:
            points = curve(records, name)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(names) > 1 or title.startswith("probes"):
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
