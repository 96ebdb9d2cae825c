"""The flags, grouped by the stage that reads them.

Flag names are those of TRL's SFTConfig / ScriptArguments / ModelConfig and transformers'
TrainingArguments wherever the concept is the same, so a TRL user can switch without
relearning. transformers' HfArgumentParser turns these dataclasses into a command line:
every field is a `--flag`, its `help` is what `--help` prints (argparse formats it, hence
`%%` for a literal `%`), and booleans take `--flag` / `--flag false`.

Each dataclass checks its values as it is built (check_values): the type its annotation names,
the field's choices, the range in FLAG_RANGES. The parser converts and checks a flag's text
itself, but a --config file's values and the Python API's arguments arrive as they are: the
same checks refuse `learning_rate: [1, 2]` in a YAML file and TrainingConfig(eval_strategy="step").

RunConfig, the whole run's flags, checks their combinations as it is built (check_run): --merge_lora
without --use_peft, --fsdp outside torchrun and the like are refused as the command line is parsed,
before any data, tokenizer or model is read. Only what needs the data (a masking flag the dataset's
format cannot honour) or the model (LoRA on its output head) is checked where that is read.

This module imports nothing of minisft but minisft.errors and the lesson's minisft/sft/optim.py (the
names --optim and --lr_scheduler_type offer, and the check of --lr_scheduler_kwargs), so every stage
of the machinery may import it.

Each DataConfig field says in its metadata whether it changes the prepared tokens ("prepared"):
the preparation cache (minisft/machinery/cache.py) keys prepared data by those fields, so a new field must
decide, and tests/test_flags.py fails for one that does not. HfArgumentParser would hand that key
to argparse, which knows no such option: cli.FlagParser drops it (OWN_METADATA).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields

import torch

from minisft.errors import UserError
from minisft.sft.optim import OPTIMIZERS, SCHEDULES, schedule_options

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Field metadata that minisft reads itself, not argparse: whether a DataConfig field changes the prepared tokens.
OWN_METADATA = ("prepared", "config_only")


class ConfigError(UserError, ValueError):
    """A flag value that cannot work; the message names the flag."""


# --logging_steps and --eval_steps: a count of steps, or below 1 a fraction of the run (as transformers 5 reads them).
STEPS_OR_FRACTION = (
    lambda x: 0 < x < 1 or (x >= 1 and x % 1 == 0),
    "a whole number of steps, or a fraction of the run in (0, 1)",
)
# The accepted values of the numeric flags, checked as the flags are parsed: before any data or model is read.
# flag: (accepts the value, the accepted range in words). An unset flag (None) is not checked.
FLAG_RANGES = {
    "max_length": (lambda n: n >= 1, "a positive number of tokens"),
    "eval_split_size": (lambda x: 0 <= x < 1, "a fraction in [0, 1)"),
    # More worker processes than this only wait on each other (and each forks a copy of the tokenizer).
    "dataset_num_proc": (lambda n: 1 <= n <= 256, "from 1 to 256"),
    "lora_r": (lambda n: n >= 1, "a rank of at least 1"),
    "lora_alpha": (lambda x: x > 0, "positive"),
    "lora_dropout": (lambda p: 0 <= p < 1, "a probability in [0, 1)"),
    "learning_rate": (lambda x: x > 0, "positive"),
    "per_device_train_batch_size": (lambda n: n >= 1, "at least 1"),
    "per_device_eval_batch_size": (lambda n: n >= 1, "at least 1"),
    "probe_max_new_tokens": (lambda n: n >= 1, "at least 1"),
    "gradient_accumulation_steps": (lambda n: n >= 1, "at least 1"),
    "num_train_epochs": (lambda x: x > 0, "positive"),
    "max_steps": (lambda n: n >= -1, "a number of steps, or -1 (or 0): as many as --num_train_epochs take"),
    "warmup_ratio": (lambda x: 0 <= x <= 1, "a fraction of the run in [0, 1]"),
    "warmup_steps": (
        lambda x: 0 <= x < 1 or (x >= 1 and x % 1 == 0),
        "a whole number of steps, or a fraction of the run in [0, 1)",
    ),
    "weight_decay": (lambda x: x >= 0, "0 or more"),
    "adam_beta1": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "adam_beta2": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "adam_epsilon": (lambda x: x >= 0, "0 or more"),
    "max_grad_norm": (lambda x: x >= 0, "0 (no clipping) or more"),
    "pad_to_multiple_of": (lambda n: n >= 1, "at least 1"),
    "logging_steps": STEPS_OR_FRACTION,
    "eval_steps": STEPS_OR_FRACTION,
    "save_steps": (
        lambda x: 0 <= x < 1 or (x >= 1 and x % 1 == 0),
        "a whole number of steps (0: never), or a fraction of the run in (0, 1)",
    ),
    "neftune_noise_alpha": (lambda x: x > 0, "positive (the NEFTune paper uses 5 to 15)"),
    "save_total_limit": (lambda n: n >= 0, "0 (keep all) or more"),
    "early_stopping_patience": (lambda n: n >= 1, "a number of evaluations, at least 1"),
    "early_stopping_threshold": (lambda x: x >= 0, "0 or more"),
    "seed": (lambda n: -(2**63) <= n < 2**64, "a whole number that fits in 64 bits, as torch.manual_seed takes it"),
}


# How a flag's type is named to the user, and which Python values it takes (a bool is an int to Python, not here).
TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}
TYPE_CHECKS = {
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    float: lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    bool: lambda value: isinstance(value, bool),
    str: lambda value: isinstance(value, str),
    dict: lambda value: isinstance(value, dict),
    list: lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value),  # list[str]: names
}


def check_values(config) -> None:
    """Refuse a flag of `config` (one of the dataclasses here) whose value has the wrong type, is not one of its
    choices, or is outside its range in FLAG_RANGES. The command line's parser converts and checks what it is
    given; a --config file's values and the Python API's arguments arrive as they are, and are checked here."""
    for flag in fields(config):
        value, kinds = getattr(config, flag.name), flag_types(type(config))[flag.name]
        if value is None and None in kinds or flag.metadata.get("config_only"):
            continue  # a --config file's list of sources is checked by machinery/mixture.py, entry by entry
        if not any(TYPE_CHECKS[kind](value) for kind in kinds if kind is not None):
            wanted = " or ".join(TYPE_NAMES.get(kind, "a list of names") for kind in kinds if kind is not None)
            raise ConfigError(f"--{flag.name} must be {wanted}, got {shown(value)}.")
        if isinstance(value, float) and not math.isfinite(value):  # inf epochs or steps never end; nan compares false
            raise ConfigError(f"--{flag.name} must be a finite number, got {shown(value)}.")
        choices = flag.metadata.get("choices")
        if choices and any(item not in choices for item in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"--{flag.name} must be one of {', '.join(choices)}, got {shown(value)}.")
        if flag.name in FLAG_RANGES:
            accepts, accepted = FLAG_RANGES[flag.name]
            if not accepts(value):
                raise ConfigError(f"--{flag.name} must be {accepted}, got {shown(value)}.")


@functools.cache
def flag_types(config_type) -> dict[str, list]:
    """Each field's accepted types, from its annotation: `int | None` -> [int, None], `list[str]` -> [list]."""
    kinds = {}
    for name, hint in typing.get_type_hints(config_type).items():  # the annotations here are strings: evaluated
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds[name] = [None if member is type(None) else typing.get_origin(member) or member for member in members]
    return kinds


def shown(value) -> str:
    """A flag's value as the user wrote it: -1, not the parser's -1.0; [1, 2] and "step" as in JSON or YAML."""
    if isinstance(value, float):
        return f"{value:g}"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


@functools.cache  # once per process: the demo parses its flags twice
def notice(line: str) -> None:
    print(f"note: {line}", file=sys.stderr)


@functools.cache
def checkpoint_dtype(model_name_or_path: str, trust_remote_code: bool) -> str:
    """The dtype in a checkpoint's config.json, as transformers reads it (its dtype, or the older torch_dtype)."""
    from .models import model_config

    try:
        dtype = model_config(model_name_or_path, trust_remote_code).dtype
    except (OSError, ValueError) as error:
        raise ConfigError(f"--dtype auto: cannot read the config.json of {model_name_or_path} ({error}).") from None
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def refuse_float16_without_cuda(flag: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{flag}: float16 weights need a CUDA GPU, and none is visible here (a CPU computes float16 slowly, and "
            "pure float16 training underflows without a GPU's loss scaling); use --dtype float32 (or bfloat16)."
        )


@dataclass
class ModelConfig:
    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "A local HF-format folder, a hub id, or 'smollm2-135m-instruct': the embedded default "
            "(SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32, cached after the first conversion)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with a hub model or tokenizer. Off unless you trust it."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "The dtype the weights are loaded and trained in. bfloat16 is pure bf16 training, as the first "
            "seed does; for bf16 compute over fp32 weights use --bf16 instead. float16 needs a CUDA GPU. auto: the "
            "dtype in the checkpoint's config.json, float32 if it names none.",
            "choices": [*DTYPE_NAMES, "auto"],
        },
    )
    torch_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Deprecated: the former name of --dtype (transformers 5 and TRL renamed it); sets --dtype.",
            "choices": [*DTYPE_NAMES, "auto"],
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "The attention kernel; packed rows get boundaries in its own form.",
            "choices": ["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"],
        },
    )

    def __post_init__(self):
        check_values(self)
        if self.torch_dtype is not None:
            notice("--torch_dtype is deprecated (transformers 5 and TRL call it --dtype): read as --dtype")
        if (self.torch_dtype or self.dtype) == "float16":
            refuse_float16_without_cuda(f"--{'torch_dtype' if self.torch_dtype else 'dtype'} float16")

    def resolved_dtype(self) -> str:
        """The dtype the weights load and train in: --dtype (or the --torch_dtype of old), auto looked up."""
        name = self.torch_dtype or self.dtype
        if name != "auto":
            return name
        name = checkpoint_dtype(self.model_name_or_path, self.trust_remote_code)
        if name not in DTYPE_NAMES:
            raise ConfigError(
                f"--dtype auto: the config.json of {self.model_name_or_path} says {name}, which minisft does not "
                "train in; pass --dtype float32 (or bfloat16)."
            )
        if name == "float16":
            refuse_float16_without_cuda(f"--dtype auto (float16 in the config.json of {self.model_name_or_path})")
        return name


# "prepared" in a DataConfig field's metadata: whether it changes the prepared tokens, and so keys the preparation
# cache (machinery/cache.py). Not the dataset's name (its files are fingerprinted instead), --max_length (counted
# through the length each split is cut to), --chat_template_path (through the tokenizer's template), the pad token
# (padding happens in batches), the workers (any number gives the same output) nor the cache itself.
@dataclass
class DataConfig:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A local .jsonl/.json/.parquet/.csv file (.jsonl.gz, .json.gz, .csv.gz too), a folder of them, "
            "or a hub dataset name. Empty: the demo dataset that ships with minisft.",
            "prepared": False,
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "The hub dataset's configuration name.", "prepared": True}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on.", "prepared": True})
    dataset_test_split: str = field(
        default="test", metadata={"help": "The dataset's own evaluation split, used when it exists.", "prepared": True}
    )
    eval_split_size: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the train split for evaluation (seeded by --seed), "
            "instead of the dataset's own test split.",
            "prepared": True,
        },
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "The column that holds plain text.", "prepared": True}
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Truncate every tokenized example to this many tokens, keeping the start (under --packing_strategy "
            "bfd_split or wrapped: split it over rows instead). Counted. Also the length of a packed row.",
            "prepared": False,
        },
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train only on the completion of prompt/completion data. Default: on for prompt/completion data.",
            # a bare --completion_only_loss means true, like the plain boolean flags
            "nargs": "?",
            "const": True,
            "prepared": True,
        },
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Train only on the assistant turns of conversations: from the template's {%% generation %%} tags, "
            "else from the response/instruction templates of a known template family (ChatML, Llama 3, Gemma).",
            "prepared": True,
        },
    )
    response_template: str | None = field(
        default=None,
        metadata={
            "help": "Train only on the tokens after this string (or JSON list of token ids), up to the next "
            "--instruction_template: TRL's former DataCollatorForCompletionOnlyLM.",
            "prepared": True,
        },
    )
    instruction_template: str | None = field(
        default=None,
        metadata={
            "help": "With --response_template: where each trained response ends (string or JSON list of ids).",
            "prepared": True,
        },
    )
    mask_history: bool = field(
        default=False,
        metadata={
            "help": "Train only the last assistant turn of each conversation (LLaMA-Factory's name); the turns are "
            "those --assistant_only_loss or --response_template with --instruction_template find.",
            "prepared": True,
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A Jinja file, or a tokenizer folder whose chat template replaces the tokenizer's own.",
            "prepared": False,
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "The end-of-sequence token appended to text and completions. Default: the tokenizer's.",
            "prepared": True,
        },
    )
    drop_reasoning: bool = field(
        default=False,
        metadata={
            "help": "Leave the assistant turns' reasoning_content (reasoning traces) out of the training text, "
            "on purpose: needed when the chat template never renders them. Counted.",
            "prepared": True,
        },
    )
    add_special_tokens: bool = field(
        default=True,
        metadata={
            "help": "Encode text and prompt/completion rows with the tokenizer's special tokens (a BOS, for the "
            "tokenizers that add one). false: the texts already hold them, as TRL's dataset_kwargs="
            '{"add_special_tokens": False} says. Conversations: the chat template writes its own.',
            "prepared": True,
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "The token batches are padded with, and the saved tokenizer's pad token. Default: the "
            "tokenizer's own, else its EOS (as TRL). Padding is never trained, so it does not change the loss.",
            "prepared": False,
        },
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes that tokenize the dataset. Default: one for data under 8 MB, else one per CPU "
            "core (at most 8). Any number gives the same examples.",
            "prepared": False,
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where prepared datasets are kept and reused while the data files, tokenizer and data flags "
            "stay the same. Default: $MINISFT_CACHE/prepared. none: prepare afresh every run, keep nothing.",
            "prepared": False,
        },
    )
    # Only in a --config file (no command-line flag): each source is prepared and cached alone, then mixed.
    datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "A mixture (TRL's datasets: list): path, name, split and proportion per source.",
            "prepared": False,
            "config_only": True,
        },
    )

    def __post_init__(self):
        check_values(self)
        if self.datasets is not None and self.dataset_name is not None:
            raise ConfigError("--dataset_name and a datasets: mixture both name the data: give one of them.")
        # Here, not in RunConfig: `python -m minisft.inspect` prepares data from these flags too.
        if self.instruction_template is not None and self.response_template is None:
            raise ConfigError("--instruction_template needs a --response_template.")
        if self.mask_history and not (self.assistant_only_loss or self.instruction_template is not None):
            raise ConfigError(
                "--mask_history needs the assistant turns located: add --assistant_only_loss, or --response_template "
                "with --instruction_template."
            )


@dataclass
class PackingConfig:
    packing: bool = field(
        default=False, metadata={"help": "Pack several examples into each row of --max_length tokens."}
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "bfd: best-fit decreasing, overlong examples truncated; bfd_split: overlong examples split "
            "into chunks; wrapped: concatenate and cut every max_length tokens, across examples.",
            "choices": ["bfd", "bfd_split", "wrapped"],
        },
    )
    eval_packing: bool | None = field(
        default=None,
        metadata={"help": "Pack the eval split too. Default: as --packing.", "nargs": "?", "const": True},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Without packing: lay each micro-batch's examples end to end in one row, with boundaries."},
    )
    neat_packing: bool = field(
        default=True,
        metadata={
            "help": "Keep packed examples apart (attention boundaries). false, to see what they are for: each packed "
            "or padding-free row is one sequence, its examples see those before them, positions run on (as in TRL's "
            "wrapped packing). Needs --packing, --eval_packing or --padding_free. LLaMA-Factory's name; its default "
            "is false, minisft's true."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch's length up to a multiple of this (e.g. 8 or 64)."}
    )

    def __post_init__(self):
        check_values(self)

    def packs(self, split: str) -> bool:
        """Whether `split` ("train" or "eval") is packed: eval follows --packing unless --eval_packing says."""
        if split == "eval" and self.eval_packing is not None:
            return self.eval_packing
        return self.packing


def parse_target_modules(values: list[str] | str | None) -> list[str] | str | None:
    """--lora_target_modules as LoRA takes it: names space- or comma-separated, one regex, or all-linear."""
    if values is None or isinstance(values, str):
        return values
    names = [name for value in values for name in value.split(",") if name]
    if len(names) == 1 and (names[0] == "all-linear" or re.search(r"[\\^$.*+?()\[\]|{}]", names[0])):
        return names[0]
    return names


@dataclass
class LoraConfig:
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all the weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear layers to adapt: names (space- or comma-separated), one regex, or all-linear. "
            "Default: peft's for the model type (q_proj v_proj for most), else the attention's q_proj and v_proj "
            "where the model has them."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside LoRA, e.g. embed_tokens lm_head."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rank-stabilised LoRA)."})
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: also train each output row's length apart from its direction (peft's)."}
    )
    lora_adapter: str | None = field(
        default=None, metadata={"help": "A peft-format adapter folder to continue training from."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: the frozen base's Linear layers quantized to 4 bits (bitsandbytes) as the model loads."
        },
    )
    bnb_4bit_quant_type: str = field(
        default="nf4",
        metadata={"help": "The 4-bit levels: nf4 (normal-float, QLoRA's) or fp4.", "choices": ["nf4", "fp4"]},
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Also quantize the 4-bit blocks' scales (~0.4 bit per weight less)."}
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={
            "help": "The dtype the packed 4-bit codes are stored in. Default: uint8. FSDP1 needed the dtype of the "
            "other weights; FSDP2 (--fsdp) shards any.",
            "choices": ["uint8", "float32", "bfloat16", "float16"],
        },
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also write the base model with the adapter merged in, to output_dir/merged."}
    )

    def settings(self):
        from minisft.sft.lora import LoraSettings

        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=parse_target_modules(self.lora_target_modules),
            modules_to_save=list(self.lora_modules_to_save or []),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )

    def __post_init__(self):
        # One name (from a --config file, or from Python) is read as the command line reads it: a list of one.
        for name in ("lora_target_modules", "lora_modules_to_save"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        check_values(self)


@dataclass
class TrainingConfig:
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the model, checkpoints and metrics go. Default: outputs/run-DATE-TIME, a new folder."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty output_dir anyway: removes the previous minisft run's files there (those "
            "its .minisft-run.json lists), keeps every other file."
        },
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "The peak learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples (or packed rows) per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Examples (or packed rows) per eval batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step; the loss is normalised over all of them."}
    )
    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "How a step's token losses are averaged. token: every trained token counts the same (a long "
            "answer counts more than a short one); sample: each example's mean token loss counts the same. Either "
            "way an example's `weight` column scales it. eval_loss stays per token.",
            "choices": ["token", "sample"],
        },
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run; overrides num_train_epochs if > 0."})
    seed: int = field(
        default=42,
        metadata={"help": "Seed for each epoch's shuffling of the training data, and for the --eval_split_size rows."},
    )
    warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Warmup: a number of steps, or below 1 a fraction of the run, rounded up (0.03: the first 3%%), "
            "as transformers 5 reads it."
        },
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Deprecated (transformers 5 removed it): warmup as a fraction of the run; --warmup_steps 0.03 "
            "says the same. Counts only where --warmup_steps is 0."
        },
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "The schedule after warmup (transformers' get_scheduler, step by step): linear and cosine fall "
            "to 0; cosine_with_min_lr to a floor (min_lr or min_lr_rate); cosine_with_restarts restarts num_cycles "
            "times; polynomial falls to lr_end with power; warmup_stable_decay holds the peak, then decays over "
            "num_decay_steps (required) to min_lr_ratio. Settings: --lr_scheduler_kwargs.",
            "choices": list(SCHEDULES),
        },
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "The schedule's settings as JSON, e.g. '{\"min_lr_rate\": 0.1}'. cosine: num_cycles; "
            "cosine_with_min_lr: num_cycles, min_lr | min_lr_rate; cosine_with_restarts: num_cycles; polynomial: "
            "lr_end, power; warmup_stable_decay: num_decay_steps, num_stable_steps, warmup_type, decay_type "
            "(linear, cosine, 1-sqrt), min_lr_ratio, num_cycles. Defaults: transformers'."
        },
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata={
            "help": "The optimizer. adamw_torch_fused and adamw_torch: the same fused AdamW (transformers' "
            "adamw_torch is the unfused loop); adamw_8bit, paged_adamw_8bit, paged_adamw_32bit: bitsandbytes' "
            "(paged: state the GPU can page out to the CPU; unpaged on a CPU); adafactor: transformers' Adafactor as "
            "its Trainer builds it (factored second moments, no first; the --adam_* flags do not apply).",
            "choices": list(OPTIMIZERS),
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (never on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the gradient's total norm to this; 0: no clipping."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Autocast the forward pass to bfloat16 over fp32 weights. Default: on where the hardware runs "
            "bf16 fast (a CUDA GPU that supports it), off on CPUs.",
            "nargs": "?",
            "const": True,
        },
    )
    fp16: bool = field(
        default=False,
        metadata={
            "help": "Mixed precision in float16, for GPUs without bf16 (T4, V100): fp16 autocast over fp32 weights, "
            "with a gradient scaler. Needs a CUDA GPU."
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Under torchrun: shard weights, gradients and optimizer state across processes (PyTorch's FSDP2) "
            "instead of DDP's full copy per process."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute activations in the backward pass: less memory, more compute. Off by default, unlike "
            "TRL: on SmolLM2-135M on a CPU it saved 12%% of the memory and cost 15%% of the tokens/s. On a GPU, "
            "where activations bound the batch, turn it on."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer with torch.compile (inductor): norms, projections and MLP fused; "
            "attention per example, the chunked loss and generation stay eager. Costs a compilation at the start "
            "(and at the first evaluation); see benchmarks/RESULTS.md for what it gains."
        },
    )
    torch_compile_mode: str | None = field(
        default=None,
        metadata={
            "help": "torch.compile's mode; giving one turns --torch_compile on, as in transformers. Default: "
            "torch's (default).",
            "choices": ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        },
    )
    neftune_noise_alpha: float | None = field(
        default=None,
        metadata={
            "help": "NEFTune: in training only, add uniform noise of magnitude alpha / sqrt(length × hidden) to the "
            "input embeddings (the paper uses 5 to 15). Default: off."
        },
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every this many optimizer steps (and the last); below 1 a fraction of the run, rounded up "
            "(0.1: every 10%%), as transformers 5 reads it."
        },
    )
    logging_first_step: bool = field(default=False, metadata={"help": "Log the first step too."})
    eval_strategy: str = field(
        default="no", metadata={"help": "When to evaluate.", "choices": ["no", "steps", "epoch"]}
    )
    eval_steps: float | None = field(
        default=None,
        metadata={"help": "Evaluate every this many steps; below 1 a fraction of the run. Default: logging_steps."},
    )
    eval_on_start: bool = field(default=False, metadata={"help": "Evaluate once before the first step too."})
    probe_prompts: str | None = field(
        default=None,
        metadata={
            "help": 'A JSONL file of prompts ({"prompt" or "messages", "expected", "kind": trained, held_out '
            "(default), general}), answered greedily before the first step, at every evaluation and at the end: "
            "answers in output_dir/probes.jsonl, eval_probe_match_<kind> (answers containing expected, any case) in "
            "the metrics, the table in the summary."
        },
    )
    probe_max_new_tokens: int = field(default=32, metadata={"help": "The longest answer to a probe, in tokens."})
    save_strategy: str = field(
        default="steps",
        metadata={
            "help": "When to write a checkpoint: every --save_steps, at the end of each epoch, or never (no). The "
            "end of the run writes the model to output_dir instead of a checkpoint.",
            "choices": ["no", "steps", "epoch"],
        },
    )
    save_steps: float = field(
        default=500,
        metadata={
            "help": "With --save_strategy steps: a checkpoint every this many steps; below 1 a fraction of the run; "
            "0: never."
        },
    )
    save_total_limit: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the newest this many checkpoints (never deleting the one just written, nor the best "
            "with --load_best_model_at_end). Unset or 0: keep them all, as transformers reads 0."
        },
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={
            "help": "Save the best checkpoint's weights (by --metric_for_best_model) at the end, not the last step's. "
            "Needs an evaluation at checkpoints: --eval_strategy and --save_strategy alike, every evaluation on a "
            "checkpoint (--eval_steps a multiple of --save_steps)."
        },
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "With --load_best_model_at_end: the eval figure that ranks checkpoints (eval_ may be left out; "
            "loss: eval_loss, the default), e.g. eval_mean_token_accuracy or eval_probe_match_held_out."
        },
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata={"help": "Whether a higher --metric_for_best_model is better. Default: false for a loss, else true."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "With --load_best_model_at_end: stop after this many evaluations in a row without an improvement "
            "(transformers' EarlyStoppingCallback). Default: no early stopping."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={"help": "How much --metric_for_best_model must beat the best by to count as an improvement."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder to resume from, or true: the newest in output_dir.",
            "nargs": "?",
            "const": "true",
        },
    )
    ignore_data_order_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume even though a setting that decides which examples each step sees (batch size, "
            "accumulation, max_length, packing, seed, the tokenized dataset) differs from the checkpoint's: the "
            "run goes on from the checkpoint's step in the new order, no longer the run it came from. Without it "
            "such a resume is refused. (transformers' ignore_data_skip is another thing: it restarts the data "
            "from the beginning instead of skipping to the checkpoint's place.)"
        },
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Also log to these trackers: tensorboard, wandb (WANDB_MODE=offline works), trackio, mlflow, "
            "several at once, all (every one installed), or none (only metrics.jsonl).",
            "choices": ["none", "all", "tensorboard", "wandb", "trackio", "mlflow"],
        },
    )
    run_name: str | None = field(
        default=None,
        metadata={
            "help": "The run's name, printed and given to the trackers (--report_to). Default: output_dir's name."
        },
    )

    def __post_init__(self):
        if self.warmup_ratio is not None:
            notice("--warmup_ratio is deprecated (transformers 5 removed it): --warmup_steps below 1 is a fraction")
        if isinstance(self.lr_scheduler_kwargs, str):  # from the command line: JSON, as transformers reads it
            try:
                self.lr_scheduler_kwargs = json.loads(self.lr_scheduler_kwargs)
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"--lr_scheduler_kwargs {self.lr_scheduler_kwargs}: not valid JSON ({error})."
                ) from None
        if not isinstance(self.lr_scheduler_kwargs, (dict, type(None))):
            raise ConfigError(
                f"--lr_scheduler_kwargs must be a JSON object of settings, got {json.dumps(self.lr_scheduler_kwargs)}."
            )
        if isinstance(self.report_to, str):  # one name, from a config file or from Python
            self.report_to = [self.report_to]
        check_values(self)
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are two kinds of mixed precision: choose one.")
        if self.fp16 and not torch.cuda.is_available():
            raise ConfigError(
                "--fp16 needs a CUDA GPU, and none is visible here: a CPU has no fast float16 and needs no loss "
                "scaling; train in float32 (the default), or --bf16 on a CPU with AMX."
            )
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError(f"--report_to {' '.join(self.report_to)}: none means no tracker; give it alone.")
        schedule_options(self.lr_scheduler_type, self.lr_scheduler_kwargs, self.learning_rate)  # refused now, if at all
        if self.torch_compile_mode is not None:
            self.torch_compile = True  # as transformers' TrainingArguments reads a mode without the switch
        check_best_model_flags(self)


def check_best_model_flags(args: TrainingConfig) -> None:
    """--load_best_model_at_end and its flags (machinery/best_checkpoint.py): refused where they cannot work, and
    the defaults resolved as transformers resolves them (metric loss; greater_is_better false for a loss)."""
    if not args.load_best_model_at_end:
        given = [
            name for name in ("metric_for_best_model", "greater_is_better", "early_stopping_patience")
            if getattr(args, name) is not None
        ] + (["early_stopping_threshold"] if args.early_stopping_threshold else [])  # fmt: skip
        if given:
            raise ConfigError(
                f"--{given[0]} needs --load_best_model_at_end: the best checkpoint is what it is about (early stopping "
                "without it would save the weights of the evaluations past the best)."
            )
        return
    if args.early_stopping_threshold and args.early_stopping_patience is None:
        raise ConfigError("--early_stopping_threshold says what counts for --early_stopping_patience: set that too.")
    if args.eval_strategy == "no":
        raise ConfigError("--load_best_model_at_end compares evaluations: set --eval_strategy steps or epoch.")
    if args.save_strategy != args.eval_strategy:
        raise ConfigError(
            f"--load_best_model_at_end loads the checkpoint of an evaluation: --save_strategy {args.save_strategy} "
            f"must be --eval_strategy's, {args.eval_strategy}."
        )
    every, saves = args.eval_steps or args.logging_steps, args.save_steps
    whole = every >= 1 and saves >= 1  # fractions of the run round up: only equal ones fall on the same steps
    if args.eval_strategy == "steps" and (not saves or (every % saves if whole else every != saves)):
        raise ConfigError(
            f"--load_best_model_at_end needs a checkpoint at every evaluation: --eval_steps {every:g} must be a "
            f"multiple of --save_steps {saves:g} (fractions of the run: the same fraction)."
        )
    if args.fsdp:
        raise ConfigError(
            "--load_best_model_at_end does not load a sharded checkpoint into FSDP's model yet: without --fsdp (DDP), "
            "every process loads the best."
        )
    args.metric_for_best_model = args.metric_for_best_model or "loss"
    if args.greater_is_better is None:
        args.greater_is_better = not args.metric_for_best_model.endswith("loss")


@dataclass
class RunConfig:
    """The whole run's flags; their combinations are checked as it is built (check_run)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self):
        check_run(self)


def check_run(config: RunConfig) -> None:
    """Flag combinations that cannot work, refused from the flags alone (and the process count torchrun sets):
    before any data, tokenizer or model is read. minisft.machinery.loop.train asks again, for a config changed since."""
    model, data, packing, lora, args = config.model, config.data, config.packing, config.lora, config.training
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # as minisft.machinery.distributed.start reads it
    if args.output_dir is None and (args.resume_from_checkpoint or under_torchrun):
        raise ConfigError("--resume_from_checkpoint and torchrun runs need an explicit --output_dir.")
    if args.fsdp and args.optim not in ("adamw_torch_fused", "adamw_torch"):
        raise ConfigError(
            f"--optim {args.optim} does not run on FSDP's sharded weights (DTensors): bitsandbytes' kernels and "
            "Adafactor's factored state take whole tensors. Use --optim adamw_torch_fused (the default) with --fsdp."
        )
    if args.fsdp and not under_torchrun:
        raise ConfigError("--fsdp shards the model across processes: start it with torchrun --nproc_per_node N")
    if args.fsdp and args.torch_compile:
        raise ConfigError("--torch_compile with --fsdp is not written yet: use DDP (no --fsdp) or one process.")
    if args.fsdp and args.probe_prompts:
        raise ConfigError("--probe_prompts cannot run with --fsdp yet: no process holds the whole weights to generate.")
    if (lora.lora_adapter or lora.merge_lora) and not lora.use_peft:
        raise ConfigError("--lora_adapter and --merge_lora need --use_peft.")
    if lora.load_in_4bit and not lora.use_peft:
        raise ConfigError("--load_in_4bit needs --use_peft: a 4-bit base is frozen, only LoRA can train over it.")
    if args.fp16 and (args.fsdp or model.resolved_dtype() != "float32"):
        raise ConfigError(
            "--fp16 is mixed precision over float32 weights with one process's gradient scaler: it needs --dtype "
            "float32 and no --fsdp (FSDP would need a sharded scaler, not written yet)."
        )
    if model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            f"--attn_implementation flex_attention trains only on a GPU: PyTorch's FlexAttention has no backward pass "
            f"on the CPU (torch {torch.__version__}); use sdpa (the default) or eager."
        )
    # Padding past the longest an example can be only adds pad tokens; without --max_length, 65,536 is the bound.
    multiple = packing.pad_to_multiple_of
    if multiple is not None and multiple > (data.max_length or 2**16):
        bound = f"--max_length ({data.max_length})" if data.max_length else "65,536 without --max_length"
        raise ConfigError(f"--pad_to_multiple_of must be from 1 to {bound}, got {multiple}.")
    packed = [flag for flag, on in (("--packing", packing.packing), ("--eval_packing", packing.eval_packing)) if on]
    if packed and data.max_length is None:
        raise ConfigError(f"{packed[0]} needs a row length: set --max_length (e.g. 1024).")
    if not packing.neat_packing and not (packed or packing.padding_free):
        raise ConfigError(
            "--neat_packing false removes the boundaries between packed examples: it needs --packing, --eval_packing "
            "or --padding_free (unpacked examples are each a row of their own)."
        )
