"""`python -m minisft.train`: supervised fine-tuning from the command line.

    python -m minisft.train                                            # the demo: see a model learn, in minutes
    python -m minisft.train --dataset_name data.jsonl --output_dir out --use_peft --packing
    python -m minisft.train --config run.yaml --learning_rate 1e-4     # a file of flags, overridden

With no --dataset_name it runs the demo: LoRA on the embedded SmolLM2-135M-Instruct, trained on
the small dataset in minisft/demo_data/ (a few facts the model cannot know, and the first seed's
"微调测试" → "我学会了"). Its --probe_prompts, minisft/demo_probes.jsonl, are asked before training, at each
epoch's evaluation and after (minisft/machinery/probes.py), so the lesson shows in the answers, not only in the
loss: the summary ends with them before and after. The demo's defaults are printed; any flag overrides them.

The flags are TRL's names for the same things (`python -m minisft.train --help` lists them);
the run itself is minisft/machinery/loop.py, callable from Python as `minisft.machinery.loop.train(RunConfig(...))`
(RunConfig: minisft/machinery/config.py).
"""

from __future__ import annotations

import shlex
import sys
from importlib import resources

import transformers
from rich.console import Console

from .machinery.cli import parse_flags, run
from .machinery.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig
from .machinery.distributed import start, stop
from .machinery.loop import check_flags, train
from .machinery.stopping import STOPPED_EXIT_CODE
from .summary import print_summary

CONFIG_TYPES = (ModelConfig, DataConfig, PackingConfig, LoraConfig, TrainingConfig)

# Asked before training, at each epoch's evaluation and after: two trained questions, the eval split's held-out
# rephrasings (test.jsonl's questions), and a general question the model should keep answering (Paris).
DEMO_PROBES = str(resources.files("minisft") / "demo_probes.jsonl")
# Measured on a 2-core CPU: with these, 6 epochs (18 steps) bring the train loss from 3.6 to about 0.1,
# the held-out rephrasings are answered with the right facts, and the model still knows Paris.
DEMO_DEFAULTS = {
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,  # 12 examples seen 6 times: nothing to regularise, and dropout slows the lesson
    "lora_target_modules": ["all-linear"],
    "assistant_only_loss": True,  # learn the answers, not the questions
    "learning_rate": 1e-3,  # LoRA's B starts at zero and must move far in 18 steps
    "num_train_epochs": 6.0,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "eval_strategy": "epoch",
    "save_steps": 0,
    "probe_prompts": DEMO_PROBES,  # answered in at most --probe_max_new_tokens 32
}


def main(argv: list[str] | None = None) -> None:
    transformers.logging.disable_progress_bar()  # a bar for a one-second weight load is noise
    processes = start()  # under torchrun, only rank 0 speaks (minisft/machinery/distributed.py)
    # Piped to a log, a line is kept whole (grep finds it) rather than wrapped at rich's default 80 columns.
    console = Console(stderr=True, quiet=not processes.is_main, soft_wrap=not sys.stderr.isatty())
    description = __doc__.splitlines()[0]
    flags = parse_flags(CONFIG_TYPES, argv, "minisft.train", description)
    demo = flags[1].dataset_name is None and flags[1].datasets is None  # a --config file's mixture is data too
    if demo:
        flags = parse_flags(CONFIG_TYPES, argv, "minisft.train", description, defaults=DEMO_DEFAULTS)
        console.print(
            f"[bold]demo defaults[/] (override any with a flag): {demo_settings(flags)}",
            highlight=False,
            soft_wrap=True,
        )
    config = RunConfig(*flags)
    check_flags(config)  # the optional packages and the probe file too, before any work
    result = train(config, console)
    stop(processes)  # leave the process group: the other processes may exit now
    if not processes.is_main:
        return  # exit 0 and let rank 0 finish: torchrun ends the others as soon as one exits non-zero
    state = "stopped" if result.interrupted else "done"
    console.print(f"{state}: {result.steps} steps; outputs in {result.output_dir}")
    print_summary(result.output_dir, console)  # with the probes' answers, before and after
    if demo and not result.interrupted:
        command = f"python -m minisft.chat --model_name_or_path {shlex.quote(str(result.output_dir))}"
        console.print(f"Chat with it: {command}", markup=False, highlight=False, soft_wrap=True)  # pasted as it is
    if result.interrupted:  # stopped by a signal, after its checkpoint: "try again later" (machinery/stopping.py)
        sys.exit(STOPPED_EXIT_CODE)


def demo_settings(flags: tuple) -> str:
    """The demo defaults in force, as the flags that would set them (those a flag overrode are left out)."""
    values = {name: value for config in flags for name, value in vars(config).items()}
    return " ".join(f"--{name} {flag_text(value)}" for name, value in DEMO_DEFAULTS.items() if values[name] == value)


def flag_text(value) -> str:
    if isinstance(value, list):
        return " ".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    run(main)
