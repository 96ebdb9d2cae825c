"""`python -m minisft.train`: supervised fine-tuning from the command line.

    python -m minisft.train --dataset_name data.jsonl --output_dir out --use_peft --packing
    python -m minisft.train --config run.yaml --learning_rate 1e-4     # a file of flags, overridden

The flags are TRL's names for the same things (`python -m minisft.train --help` lists them);
the run itself is minisft/loop.py, callable from Python as `minisft.loop.train(RunConfig(...))`.
"""

from __future__ import annotations

from rich.console import Console

from .cli import parse_flags, run
from .config import DataConfig, LoraConfig, ModelConfig, PackingConfig, TrainingConfig
from .loop import RunConfig, train


def main(argv: list[str] | None = None) -> None:
    model, data, packing, lora, training = parse_flags(
        (ModelConfig, DataConfig, PackingConfig, LoraConfig, TrainingConfig),
        argv,
        "minisft.train",
        description=__doc__.splitlines()[0],
    )
    result = train(RunConfig(model=model, data=data, packing=packing, lora=lora, training=training))
    console = Console(stderr=True)
    shown = [name for name in ("loss", "eval_loss") if name in result.metrics]
    figures = "".join(f"; {name} {result.metrics[name]:.4g}" for name in shown)
    state = "stopped" if result.interrupted else "done"
    console.print(f"{state}: {result.steps} steps{figures}; outputs in {result.output_dir}")


if __name__ == "__main__":
    run(main)
