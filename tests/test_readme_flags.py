"""The README's "Coming from TRL" table stays true: every field it says minisft has under the same name is a flag of
`python -m minisft.train`, and every TRL field it lists is one TRL really has."""

import dataclasses
import re
from pathlib import Path

from transformers import TrainingArguments
from trl import ModelConfig, ScriptArguments, SFTConfig

from minisft.machinery.cli import FlagParser
from minisft.train import CONFIG_TYPES

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
# Values quoted in the first column (bfd, nll, adamw_8bit, ...) are not fields.
VALUES = {"bfd", "wrapped", "nll", "dft", "adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"}
VALUES |= {"paged_adamw_32bit", "adafactor", "skip_prepare_dataset"}
# Fields transformers 5 renamed or removed, listed because TRL users still type them.
FORMER_FIELDS = {"torch_dtype", "warmup_ratio"}


def table_rows() -> list[tuple[list[str], str]]:
    section = README.split("#### Coming from TRL", 1)[1].split("\n\n", 2)[2]
    rows = []
    for line in section.splitlines()[2:]:  # below the header and its rule
        if not line.startswith("| `"):
            break
        theirs, ours = line.strip("|").split(" | ", 1)
        rows.append((re.findall(r"`([a-z_0-9*]+)", theirs), ours))
    return rows


def minisft_flags() -> set[str]:
    parser = FlagParser(CONFIG_TYPES)
    return {option.lstrip("-") for action in parser._actions for option in action.option_strings}


def test_fields_said_to_be_the_same_are_flags():
    flags = minisft_flags()
    same = [name for names, ours in table_rows() if ours.startswith("same") for name in names if name not in VALUES]
    assert len(same) > 40
    assert [name for name in same if name not in flags] == []


def test_every_listed_field_is_trls_or_transformers():
    configs = (SFTConfig, ModelConfig, ScriptArguments, TrainingArguments)
    known = {field.name for config in configs for field in dataclasses.fields(config)} | VALUES | FORMER_FIELDS
    listed = [name for names, _ in table_rows() for name in names if "*" not in name]
    assert [name for name in listed if name not in known] == []
