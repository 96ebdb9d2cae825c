"""minisft: supervised fine-tuning of causal language models, from scratch in plain PyTorch.

Two rooms:

    minisft/sft/        the SFT algorithm, one file per concept, in reading order (its __init__ lists them)
    minisft/machinery/  what makes it run for real: flags, file readers, caches, checkpoints, processes, trackers

and the entry points at the top: `python -m minisft.train`, `minisft.inspect` (what each stage of the lesson
produced for your data), `minisft.chat`, `minisft.summary`, `minisft.plot`.
"""

__version__ = "0.1.0"
