"""The flags, grouped by the stage that reads them.

Flag names are those of TRL's SFTConfig / ScriptArguments / ModelConfig and transformers'
TrainingArguments wherever the concept is the same, so a TRL user can switch without
relearning. transformers' HfArgumentParser turns these dataclasses into a command line:
every field is a `--flag`, its `help` is what `--help` prints (argparse formats it, hence
`%%` for a literal `%`), and booleans take `--flag` / `--flag false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A flag value that cannot work; the message names the flag."""


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
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "The dtype the weights are loaded and trained in. bfloat16 is pure bf16 training, as the first "
            "seed does; for bf16 compute over fp32 weights use --bf16 instead.",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "The attention kernel; packed rows get boundaries in its own form.",
            "choices": ["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"],
        },
    )


@dataclass
class DataConfig:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A local .jsonl/.json/.parquet/.csv file, a folder of them, or a hub dataset name. "
            "Empty: the demo dataset that ships with minisft."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "The dataset's own evaluation split, used when it exists."}
    )
    eval_split_size: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the train split for evaluation (seeded by --seed), "
            "instead of the dataset's own test split."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for the held-out split (and, in training, shuffling)."})
    dataset_text_field: str = field(default="text", metadata={"help": "The column that holds plain text."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate every tokenized example to this many tokens, keeping the start. Counted."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train only on the completion of prompt/completion data. Default: on for prompt/completion data.",
            # a bare --completion_only_loss means true, like the plain boolean flags
            "nargs": "?",
            "const": True,
        },
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Train only on the assistant turns of conversations: from the template's {%% generation %%} tags, "
            "else from the response/instruction templates of a known template family (ChatML, Llama 3, Gemma)."
        },
    )
    response_template: str | None = field(
        default=None,
        metadata={
            "help": "Train only on the tokens after this string (or JSON list of token ids), up to the next "
            "--instruction_template: TRL's former DataCollatorForCompletionOnlyLM."
        },
    )
    instruction_template: str | None = field(
        default=None,
        metadata={"help": "With --response_template: where each trained response ends (string or JSON list of ids)."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A Jinja file, or a tokenizer folder whose chat template replaces the tokenizer's own."},
    )
    eos_token: str | None = field(
        default=None,
        metadata={"help": "The end-of-sequence token appended to text and completions. Default: the tokenizer's."},
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "The token batches are padded with, and the saved tokenizer's pad token. Default: the "
            "tokenizer's own, else its EOS (as TRL). Padding is never trained, so it does not change the loss."
        },
    )

    def __post_init__(self):
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"--max_length must be a positive number of tokens, got {self.max_length}.")


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

    def packs(self, split: str) -> bool:
        """Whether `split` ("train" or "eval") is packed: eval follows --packing unless --eval_packing says."""
        if split == "eval" and self.eval_packing is not None:
            return self.eval_packing
        return self.packing


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
            "Default: the attention's q_proj and v_proj, as peft."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside LoRA, e.g. embed_tokens lm_head."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rank-stabilised LoRA)."})
    lora_adapter: str | None = field(
        default=None, metadata={"help": "A peft-format adapter folder to continue training from."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: the frozen base's Linear layers in 4-bit nf4 (bitsandbytes)."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also write the base model with the adapter merged in, to output_dir/merged."}
    )

    def settings(self):
        from .lora import LoraSettings, parse_target_modules

        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=parse_target_modules(self.lora_target_modules),
            modules_to_save=list(self.lora_modules_to_save or []),
            use_rslora=self.use_rslora,
        )


@dataclass
class TrainingConfig:
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the model, checkpoints and metrics go. Default: outputs/run-DATE-TIME, a new folder."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Train into a non-empty output_dir anyway."})
    learning_rate: float = field(default=2e-5, metadata={"help": "The peak learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples (or packed rows) per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Examples (or packed rows) per eval batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step; the loss is normalised over all of them."}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run; overrides num_train_epochs if > 0."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of the run's steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; overrides --warmup_ratio if > 0."})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "The schedule after warmup.",
            "choices": ["linear", "cosine", "constant", "constant_with_warmup"],
        },
    )
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "The optimizer.", "choices": ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]},
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
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Under torchrun: shard weights, gradients and optimizer state across processes (PyTorch's FSDP2) "
            "instead of DDP's full copy per process."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, more compute."}
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Without packing: lay each micro-batch's examples end to end in one row, with boundaries."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch's length up to a multiple of this (e.g. 8 or 64)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    eval_strategy: str = field(
        default="no", metadata={"help": "When to evaluate.", "choices": ["no", "steps", "epoch"]}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every this many steps. Default: logging_steps."}
    )
    save_steps: int = field(default=500, metadata={"help": "Write a checkpoint every this many steps; 0: never."})
    save_total_limit: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the newest this many checkpoints (never deleting the one just written). "
            "Unset or 0: keep them all, as transformers reads 0."
        },
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
    report_to: str = field(
        default="none", metadata={"help": "Also log to: none or tensorboard.", "choices": ["none", "tensorboard"]}
    )

    def __post_init__(self):
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}.")
