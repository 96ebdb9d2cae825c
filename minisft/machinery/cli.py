"""What every command-line entry point shares: flag parsing, and errors without tracebacks.

A user's mistake (a bad file, an unknown flag value) is answered with one clear message and
exit status 2; only a bug in minisft shows a traceback. Ctrl-C before or after the training steps
(while the data is prepared, or the model loads) ends the command with one word and status 130.
"""

from __future__ import annotations

import sys
from argparse import ArgumentTypeError
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from transformers import HfArgumentParser

from minisft.errors import UserError

from .config import OWN_METADATA

stderr_console = Console(stderr=True)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C ended


def demo_dataset_path() -> Path:
    """The small demo dataset that ships inside minisft (train.jsonl + test.jsonl)."""
    return Path(str(resources.files("minisft") / "demo_data"))


class FlagParser(HfArgumentParser):
    """HfArgumentParser, minus the field metadata minisft reads itself (config.OWN_METADATA): HfArgumentParser hands
    every metadata key to argparse's add_argument, which refuses a key it does not know. (minisft's dataclasses set
    no _argument_group_name, so every flag is added through this parser's own add_argument.)"""

    def add_argument(self, *names, **options):
        if options.get("config_only"):  # a list of sources is written in a --config file, not on a command line
            self.set_defaults(**{names[0].lstrip("-"): options.get("default")})  # its value when no file gives one
            return None
        return super().add_argument(*names, **{key: value for key, value in options.items() if key not in OWN_METADATA})


def parse_flags(
    config_types: tuple, argv: list[str] | None, program: str, description: str, defaults: dict | None = None
):
    """The flags as dataclasses. `--config FILE` (JSON or YAML) sets defaults; flags given beside it win.

    `defaults` replaces some fields' own defaults (the demo's, say); a config file and the flags still win.
    """
    parser = FlagParser(config_types, prog=f"python -m {program}", description=description)
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
        raise UserError(f"--config {path}: not valid JSON or YAML ({' '.join(str(error).split())}).") from None
    except UnicodeDecodeError as error:
        raise UserError(
            f"--config {path}: not a UTF-8 text file (byte {error.start}); it takes JSON or YAML."
        ) from None
    except RecursionError:
        raise UserError(f"--config {path}: nested too deeply to read.") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}.")
    actions = {action.dest: action for action in parser._actions}
    from .mixture import check_entries  # here: chat and plot, which read --config too, need not import preparation

    mixes = "datasets" in values and "datasets" in parser._defaults  # a command that reads data (FlagParser above)
    mixture = {"datasets": check_entries(values.pop("datasets"), f"--config {path}")} if mixes else {}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"--config {path}: unknown flags {unknown}. See --help for the flags.")
    # The values are checked where the Python API's are: by the flag dataclasses, as the run builds them (config.py).
    return {name: as_flag_value(actions[name], value, path) for name, value in values.items()} | mixture


def as_flag_value(action, value, path: Path):
    """A config file's value as the command line would give it. YAML reads `true` and `2024` as a boolean and a
    number where a flag takes text (--resume_from_checkpoint true, --run_name 2024), one name where it takes a
    list of them, and `1e-4` as text where it takes a number."""
    if action.nargs == "+" and not isinstance(value, list):
        value = [value]
    if action.type is str:
        return [as_text(item) for item in value] if isinstance(value, list) else as_text(value)
    if isinstance(value, str):
        try:
            return action.type(value)
        except (ValueError, ArgumentTypeError):
            wanted = {int: "a whole number", float: "a number"}.get(action.type, "true or false")
            raise UserError(f"--config {path}: --{action.dest} must be {wanted}, got {value!r}.") from None
    return value  # any other type is checked by the flag dataclasses


def as_text(value):
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (int, float)) else value  # anything else is refused as it is


def run(main, argv: list[str] | None = None) -> None:
    """Run an entry point, turning user errors into one readable line."""
    try:
        main(argv)
    except UserError as error:
        stderr_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except BrokenPipeError:  # e.g. `python -m minisft.inspect --json | head`
        sys.stderr.close()
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (which stop cleanly, minisft/machinery/stopping.py)
        stderr_console.print("interrupted", highlight=False)
        sys.exit(INTERRUPTED_EXIT_CODE)
