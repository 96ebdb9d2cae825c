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


def parse_flags(
    config_types: tuple, argv: list[str] | None, program: str, description: str, defaults: dict | None = None
):
    """The flags as dataclasses. `--config FILE` (JSON or YAML) sets defaults; flags given beside it win.

    `defaults` replaces some fields' own defaults (the demo's, say); a config file and the flags still win.
    """
    parser = HfArgumentParser(config_types, prog=f"python -m {program}", description=description)
    parser.set_defaults(**(defaults or {}))
    parser.add_argument("--config", help="A JSON or YAML file of flag values; flags on the command line override it.")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise UserError("--config needs a file: --config run.yaml")
        parser.set_defaults(**read_config_file(Path(argv[position + 1]), parser))
    *configs, _, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see --help)")  # usage and exit status 2
    return tuple(configs)  # the namespace left out holds --config itself


def read_config_file(path: Path, parser) -> dict:
    if not path.is_file():
        raise UserError(f"--config {path}: no such file.")
    import yaml  # transformers depends on PyYAML; YAML is a superset of JSON, so one reader serves both

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid JSON or YAML ({error}).") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown flags {unknown}. See --help for the flags.")
    return values


def run(main, argv: list[str] | None = None) -> None:
    """Run an entry point, turning user errors into one readable line."""
    try:
        main(argv)
    except UserError as error:
        stderr_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except BrokenPipeError:  # e.g. `python -m minisft.inspect --json | head`
        sys.stderr.close()
