"""What every command-line entry point shares: flag parsing, and errors without tracebacks.

A user's mistake (a bad file, an unknown flag value) is answered with one clear message and
exit status 2; only a bug in minisft shows a traceback.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from transformers import HfArgumentParser

from .errors import UserError

stderr_console = Console(stderr=True)


def demo_dataset_path() -> Path:
    """The small demo dataset that ships inside minisft (train.jsonl + test.jsonl)."""
    return Path(str(resources.files("minisft") / "demo_data"))


def parse_flags(config_types: tuple, argv: list[str] | None, program: str, description: str):
    parser = HfArgumentParser(config_types, prog=f"python -m {program}", description=description)
    return parser.parse_args_into_dataclasses(args=argv)


def run(main, argv: list[str] | None = None) -> None:
    """Run an entry point, turning user errors into one readable line."""
    try:
        main(argv)
    except UserError as error:
        stderr_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except BrokenPipeError:  # e.g. `python -m minisft.inspect --json | head`
        sys.stderr.close()
