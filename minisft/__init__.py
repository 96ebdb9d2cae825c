"""minisft: supervised fine-tuning of causal language models, from scratch in plain PyTorch.

Two rooms:

    minisft/sft/        the SFT algorithm, one file per concept, in reading order (its __init__ lists them)
    minisft/machinery/  what makes it run for real: flags, file readers, caches, checkpoints, processes, trackers

and the entry points at the top: `python -m minisft.train`, `minisft.inspect` (what each stage of the lesson
produced for your data), `minisft.chat`, `minisft.summary`, `minisft.plot`.

From Python, the front door in TRL's shape (minisft/trainer.py): `from minisft import SFTTrainer, SFTConfig`.
It is imported on first use (PEP 562's module __getattr__), so `import minisft` stays cheap.
"""

__version__ = "0.1.0"

FRONT_DOOR = (
    "SFTTrainer",
    "SFTConfig",
    "TrainingArguments",
    "DataCollatorForCompletionOnlyLM",
    "LoraConfig",
    "get_peft_model",
    "embedded_model_path",
)
__all__ = list(FRONT_DOOR)


def __getattr__(name: str):
    if name in FRONT_DOOR:
        from minisft import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'minisft' has no attribute {name!r}")
