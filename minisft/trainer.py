"""The front door in TRL's shape: a TRL script runs on minisft with only its imports changed.

    from minisft import SFTConfig, SFTTrainer                 # instead of: from trl import SFTConfig, SFTTrainer
    from minisft import LoraConfig, get_peft_model            # instead of: from peft import ...
    from minisft import TrainingArguments                     # instead of: from transformers import ...
    from minisft import DataCollatorForCompletionOnlyLM       # TRL's, removed from TRL in 0.20

    trainer = SFTTrainer(model, args=SFTConfig(output_dir="out", max_steps=30), train_dataset=rows,
                         processing_class=tokenizer)
    trainer.train()                                           # trainer.model: trained, in memory
    trainer.model.generate(...)

Nothing here trains. Each argument becomes what the command line would say, and the loop the CLI
runs (minisft/machinery/loop.py: train) makes every training decision:

    SFTConfig(**fields)                 the CLI's flags, one field each, built and checked by the same
                                        dataclasses (machinery/config.py); TRL's former names read as today's
    a loaded model, a tokenizer,        handed to the loop as they are (loop.Given); the model's
    rows or a datasets.Dataset          name_or_path stands for --model_name_or_path in what the run writes
    get_peft_model, peft_config         minisft's own LoRA (sft/lora.py), its settings the --lora_* flags
    DataCollatorForCompletionOnlyLM     --response_template / --instruction_template
    formatting_func                     the rows turned into {"text": ...} rows before the loop reads them
    dataset_kwargs                      --add_special_tokens
    callbacks                           told of the loop's events (loop.tell) with the state they expect;
                                        transformers' EarlyStoppingCallback is --early_stopping_patience

What minisft does not have is refused in one line (a minisft.errors.UserError) naming the closest
thing it has; a field that does nothing here with the value given (report_to=[], logging_dir) is
accepted with one line saying so.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
import types
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from minisft.errors import UserError
from minisft.machinery import config as flags
from minisft.machinery import loop
from minisft.machinery.models import embedded_model_dir
from minisft.sft.lora import inject_lora
from minisft.summary import print_summary

# Each config dataclass, by its place in RunConfig: together their fields are every flag of python -m minisft.train.
SECTIONS = {
    "model": flags.ModelConfig,
    "data": flags.DataConfig,
    "packing": flags.PackingConfig,
    "lora": flags.LoraConfig,
    "training": flags.TrainingConfig,
}
SECTION_OF = {field.name: section for section, kind in SECTIONS.items() for field in dataclasses.fields(kind)}
# Names TRL and transformers used before: read as today's (the CLI has no such flags).
FORMER_NAMES = {"max_seq_length": "max_length", "evaluation_strategy": "eval_strategy"}
# transformers fields that do nothing in minisft, with the values for which that is true (None: any value).
# Given so, they are noted and let pass; given any other value, refused.
NO_OP_FIELDS = {
    "logging_dir": None,  # minisft's logs go to output_dir (metrics.jsonl, the trackers' folders)
    "logging_strategy": ("steps",),
    "push_to_hub": (False,),
    "remove_unused_columns": None,  # minisft reads only the columns of the dataset's format
    "dataloader_num_workers": None,  # batches come from memory: no loader processes
    "dataloader_pin_memory": None,
    "disable_tqdm": None,
    "log_level": None,
    "save_safetensors": (True,),  # minisft writes safetensors only
    "do_train": None,
    "do_eval": None,
    "group_by_length": (False,),
    "gradient_checkpointing_kwargs": None,  # always use_reentrant=False
    "ddp_find_unused_parameters": None,
    "torch_compile_backend": ("inductor",),  # --torch_compile compiles with inductor, torch's default backend
}


class FrontDoorError(UserError, ValueError):
    """A TRL argument minisft does not take, or takes otherwise; the message names it and the closest flag."""


def embedded_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct as an ordinary HF folder (converted from its GGUF once, as the CLI does),
    for AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained: the model made local."""
    return str(embedded_model_dir())


# ----------------------------------------------------------------------------- the config


class SFTConfig:
    """TRL's SFTConfig, and transformers' TrainingArguments (the same class here): one flat set of fields, the flags
    of python -m minisft.train, built into the CLI's config dataclasses and checked by them as it is made."""

    def __init__(self, **fields):
        object.__setattr__(self, "given", minisft_names(fields))
        object.__setattr__(self, "run", run_config(self.given))

    def __getattr__(self, name: str):
        name = FORMER_NAMES.get(name, name)
        if name not in SECTION_OF:
            raise AttributeError(f"SFTConfig has no field {name!r}")
        return getattr(getattr(self.run, SECTION_OF[name]), name)

    def __setattr__(self, name: str, value) -> None:
        """args.num_train_epochs = 1, as with TRL's: the config is built again, and checked again."""
        self.__init__(**{**self.given, name: value})

    def replace(self, **fields) -> SFTConfig:
        return SFTConfig(**{**self.given, **fields})

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in SECTION_OF}

    def __repr__(self) -> str:
        return f"SFTConfig({', '.join(f'{name}={value!r}' for name, value in self.given.items())})"


TrainingArguments = SFTConfig


def minisft_names(fields: dict) -> dict:
    """The fields by minisft's names: former names renamed, dataset_kwargs read, no-op fields noted and left out.
    A field minisft does not have is refused, naming the closest it has."""
    named, ignored = {}, []
    for name, value in fields.items():
        if name == "dataset_kwargs":
            named.update(dataset_kwargs_flags(value))
        elif name in NO_OP_FIELDS:
            harmless = NO_OP_FIELDS[name]
            if harmless is not None and value not in harmless:
                raise FrontDoorError(
                    f"SFTConfig({name}={value!r}): minisft does not do this; only "
                    f"{' or '.join(repr(value) for value in harmless)} is accepted (it changes nothing here)."
                )
            ignored.append(name)
        elif FORMER_NAMES.get(name, name) in SECTION_OF:
            named[FORMER_NAMES.get(name, name)] = value
        else:
            raise FrontDoorError(f"SFTConfig({name}=...): minisft has no such field; {closest(name)}")
    if ignored:
        flags.notice(f"SFTConfig: left out, as they do nothing in minisft: {', '.join(ignored)}")
    return named


def closest(name: str) -> str:
    """The minisft field nearest to `name` in spelling, said for a refusal."""
    match = difflib.get_close_matches(name, [*SECTION_OF, *FORMER_NAMES], n=1, cutoff=0.6)
    if match:
        return f"the closest is {match[0]}."
    return "its fields are the flags python -m minisft.train --help lists (README: Coming from TRL)."


def dataset_kwargs_flags(kwargs: dict | None) -> dict:
    """TRL's dataset_kwargs as flags: add_special_tokens is --add_special_tokens; skip_prepare_dataset is not needed
    (rows that hold input_ids are recognised as tokenized)."""
    named = {}
    for key, value in (kwargs or {}).items():
        if key == "add_special_tokens":
            named["add_special_tokens"] = value
        elif key != "skip_prepare_dataset":
            raise FrontDoorError(
                f"dataset_kwargs={{{key!r}: ...}}: minisft takes add_special_tokens only (and needs no "
                "skip_prepare_dataset: tokenized rows are recognised as such)."
            )
    return named


def run_config(fields: dict) -> flags.RunConfig:
    """The CLI's RunConfig of these fields (by minisft's names): each dataclass checks its values as it is built."""
    sections = {section: {} for section in SECTIONS}
    for name, value in fields.items():
        sections[SECTION_OF[name]][name] = value
    return flags.RunConfig(**{section: SECTIONS[section](**values) for section, values in sections.items()})


# ----------------------------------------------------------------------------- peft's and TRL's other pieces


@dataclass
class LoraConfig:
    """peft's LoraConfig, its names and defaults, for minisft's LoRA (sft/lora.py): the --lora_* flags."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None: peft's default for the model type
    bias: str = "none"
    task_type: str | None = "CAUSAL_LM"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if self.bias != "none":
            raise FrontDoorError(f"LoraConfig(bias={self.bias!r}): minisft's LoRA trains no biases; use bias='none'.")
        if self.task_type not in (None, "CAUSAL_LM"):  # peft's TaskType.CAUSAL_LM is a str equal to this
            raise FrontDoorError(f"LoraConfig(task_type={self.task_type!r}): minisft trains causal LMs only.")
        self.flags()  # the --lora_* flags' own checks, now

    def flags(self) -> dict:
        """The CLI's flags for this LoRA, checked by its LoraConfig dataclass."""
        targets = self.target_modules
        values = {
            "use_peft": True,
            "lora_r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_target_modules": [targets] if isinstance(targets, str) else None if targets is None else [*targets],
            "lora_modules_to_save": None if self.modules_to_save is None else [*self.modules_to_save],
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
        }
        flags.LoraConfig(**values)
        return values


def get_peft_model(model, peft_config: LoraConfig, *args, **kwargs):
    """peft's get_peft_model done by minisft: its LoRA injected into `model` in place, and `model` returned. The
    settings stay on the model (minisft_lora) for SFTTrainer, which trains these adapters."""
    if args or kwargs:
        raise FrontDoorError("get_peft_model(model, peft_config) takes no other arguments in minisft.")
    report = inject_lora(model, flags.LoraConfig(**peft_config.flags()).settings())
    model.minisft_lora = peft_config
    model.print_trainable_parameters = types.MethodType(lambda model: print(trainable_line(report)), model)
    return model


def trainable_line(report) -> str:
    return (
        f"trainable params: {report.trainable:,} || all params: {report.total:,} || "
        f"trainable%: {100 * report.trainable / report.total:.4f}"
    )


@dataclass
class DataCollatorForCompletionOnlyLM:
    """TRL's former collator (gone from TRL since 0.20): train only on the tokens after response_template, up to the
    next instruction_template. minisft builds its batches itself; this is --response_template and
    --instruction_template (the masks: sft/labels.py). The templates as strings or token-id lists."""

    response_template: str | list[int]
    instruction_template: str | list[int] | None = None
    tokenizer: object = None  # TRL's needs it; minisft tokenizes the templates with the trainer's tokenizer
    mlm: bool = False

    def flags(self) -> dict:
        if self.mlm:
            raise FrontDoorError("DataCollatorForCompletionOnlyLM(mlm=True): minisft trains causal LMs only.")
        as_flag = lambda template: json.dumps(template) if isinstance(template, list) else template  # noqa: E731
        return {
            "response_template": as_flag(self.response_template),
            "instruction_template": as_flag(self.instruction_template),
        }


# ----------------------------------------------------------------------------- the trainer

EVENT_METHODS = {
    "train_begin": "on_train_begin",
    "step_end": "on_step_end",
    "log": "on_log",
    "evaluate": "on_evaluate",
    "save": "on_save",
    "train_end": "on_train_end",
}


class SFTTrainer:
    """TRL's SFTTrainer over minisft.machinery.loop.train: the arguments become the run's flags and objects
    (see the module docstring); train() runs the loop, the CLI's own, and leaves trainer.model trained in memory."""

    def __init__(
        self, model, args: SFTConfig | None = None, *, train_dataset=None, eval_dataset=None, processing_class=None,
        tokenizer=None, data_collator=None, formatting_func=None, peft_config: LoraConfig | None = None,
        callbacks=None, max_seq_length: int | None = None, dataset_text_field: str | None = None,
        packing: bool | None = None, dataset_kwargs: dict | None = None, **unsupported,
    ):  # fmt: skip
        if unsupported:
            name = next(iter(unsupported))
            raise FrontDoorError(
                f"SFTTrainer({name}=...): minisft does not take it (the loss, the optimizer and the batches are the "
                "flags' to decide); see README: Python (coming from TRL)."
            )
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise FrontDoorError("SFTTrainer: processing_class and tokenizer (its former name) name two tokenizers.")
        fields = {**(args or SFTConfig()).given}
        for name, value in (("max_length", max_seq_length), ("dataset_text_field", dataset_text_field),
                            ("packing", packing)):  # fmt: skip
            if value is not None:  # TRL's older trainer took these itself; today's SFTConfig does
                fields[name] = value
        fields.update(dataset_kwargs_flags(dataset_kwargs))
        fields.update(collator_flags(data_collator))
        fields.update(model_flags(model, peft_config, fields))
        callbacks = [callback() if isinstance(callback, type) else callback for callback in callbacks or []]
        fields.update(early_stopping_flags(callbacks, fields))
        self.args = SFTConfig(**fields)
        self.model = None if isinstance(model, (str, os.PathLike)) else model  # loaded by the loop: set at train
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.tokenizer = self.processing_class
        self.dataset = data_source(train_dataset, eval_dataset, formatting_func, self.args)
        if isinstance(self.dataset, str):  # a path: read as --dataset_name reads it (and its preparation cached)
            self.args, self.dataset = self.args.replace(dataset_name=self.dataset), None
        self.callbacks = [callback for callback in callbacks if not is_early_stopping(callback)]  # the flags do it
        self.console = Console(stderr=True)
        self.state, self.control, self.result = new_state(), new_control(), None

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """The run, by minisft's loop; returns transformers' TrainOutput. The end-of-run summary is printed."""
        from transformers.trainer_utils import TrainOutput

        args = self.args
        if resume_from_checkpoint:
            args = args.replace(
                resume_from_checkpoint="true" if resume_from_checkpoint is True else resume_from_checkpoint
            )
        self.state, self.control = new_state(), new_control()
        started = time.perf_counter()
        self.result = loop.train(
            args.run, self.console, model=self.model, tokenizer=self.processing_class, dataset=self.dataset,
            on_event=self.on_event,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        self.console.print(f"{'stopped' if self.result.interrupted else 'done'}: {self.result.steps} steps; "
                           f"outputs in {self.result.output_dir}")  # fmt: skip
        print_summary(self.result.output_dir, self.console)
        end = next((record for record in reversed(self.result.history) if "stop_reason" in record), None)
        if end is not None:  # --load_best_model_at_end: the best, in transformers' TrainerState fields
            self.state.best_metric, self.state.best_global_step = end["best_metric"], end["best_global_step"]
            self.state.best_model_checkpoint = end["best_model_checkpoint"]
        loss = training_loss(self.result.history)
        metrics = {"train_runtime": seconds, "train_loss": loss, "epoch": self.state.epoch}
        return TrainOutput(global_step=self.result.steps, training_loss=loss, metrics=metrics)

    def evaluate(self) -> dict:
        """The eval figures of the trained model, over the eval split (sft/step.py's evaluate, as the run's)."""
        if self.result is None or self.result.evaluate is None:
            raise FrontDoorError(
                "trainer.evaluate() evaluates the trained model on the eval split: train() first, with an "
                "eval_dataset (eval_on_start=True evaluates before the first step too)."
            )
        return self.result.evaluate()

    def save_model(self, output_dir: str | None = None) -> None:
        """The model (or its adapter) and the tokenizer, written as the run writes them at its end."""
        if self.result is None:
            raise FrontDoorError("trainer.save_model() saves the trained model: train() first.")
        config = self.args.run
        folder = Path(output_dir) if output_dir is not None else self.result.output_dir
        if folder.resolve() == self.result.output_dir.resolve():
            return  # the run wrote them there as it ended
        settings = config.lora.settings() if config.lora.use_peft else None
        loop.write_model(self.model, self.processing_class, folder, settings, config.model, config.lora, self.console)

    def on_event(self, event: str, **info) -> bool:
        """The loop's event (loop.tell) as transformers' callbacks hear it; True asks the run to stop."""
        state = self.state
        if event == "train_begin":
            self.model, self.processing_class, state.max_steps = info["model"], info["tokenizer"], info["total_steps"]
            self.tokenizer = self.processing_class
        elif event == "step_end":
            state.global_step, state.epoch = info["step"], info["epoch"]
        elif event == "log":
            state.log_history.append(info["record"])
        keywords = {"log": {"logs": info.get("record")}, "evaluate": {"metrics": info.get("metrics")}}.get(event, {})
        for callback in self.callbacks:
            method = getattr(callback, EVENT_METHODS[event], None)
            if method is not None:  # a TrainerCallback, or anything with its methods
                method(self.args, state, self.control, model=self.model, processing_class=self.processing_class,
                       **keywords)  # fmt: skip
            elif callable(callback) and callback(event, **info):  # a plain function hears the loop's own events
                self.control.should_training_stop = True
        return self.control.should_training_stop


def new_state():
    from transformers import TrainerState

    return TrainerState()


def new_control():
    from transformers import TrainerControl

    return TrainerControl()


def training_loss(history: list[dict]) -> float:
    """The mean train loss over the steps, as transformers reports it: each logged mean weighted by its steps."""
    total, steps, last_step = 0.0, 0, 0
    for record in history:
        if "loss" in record:
            total += record["loss"] * (record["step"] - last_step)
            steps += record["step"] - last_step
            last_step = record["step"]
    return total / steps if steps else float("nan")


def is_early_stopping(callback) -> bool:
    return type(callback).__name__ == "EarlyStoppingCallback" and type(callback).__module__.startswith("transformers")


def early_stopping_flags(callbacks: list, fields: dict) -> dict:
    """transformers' EarlyStoppingCallback as --early_stopping_patience and --early_stopping_threshold: the loop
    stops itself (machinery/best_checkpoint.py). The callback would compare with a state.best_metric that only
    transformers' Trainer sets, and so never stop."""
    stopping = [callback for callback in callbacks if is_early_stopping(callback)]
    if not stopping:
        return {}
    if len(stopping) > 1 or "early_stopping_patience" in fields:
        raise FrontDoorError("SFTTrainer: early stopping is asked twice (callbacks and early_stopping_patience).")
    patience, threshold = stopping[0].early_stopping_patience, stopping[0].early_stopping_threshold
    return {"early_stopping_patience": patience, "early_stopping_threshold": threshold or 0.0}


def collator_flags(collator) -> dict:
    if collator is None:
        return {}
    if isinstance(collator, DataCollatorForCompletionOnlyLM):
        return collator.flags()
    raise FrontDoorError(
        f"data_collator={type(collator).__name__}: minisft builds its own batches (padding, packing, the label "
        "masks); it takes DataCollatorForCompletionOnlyLM only (as --response_template). Leave data_collator out."
    )


def model_flags(model, peft_config: LoraConfig | None, fields: dict) -> dict:
    """What the model argument sets: --model_name_or_path (a loaded model's name_or_path), its dtype unless the
    fields set one, and the LoRA flags of get_peft_model's adapters or of peft_config."""
    if isinstance(model, (str, os.PathLike)):
        return {"model_name_or_path": str(model), **(peft_config.flags() if peft_config else {})}
    if type(model).__module__.startswith("peft"):
        raise FrontDoorError(
            "SFTTrainer: the model is a peft PeftModel; minisft trains its own LoRA: make it with "
            "`from minisft import LoraConfig, get_peft_model` (the same calls), or pass peft_config=."
        )
    name = getattr(model, "name_or_path", "")
    if not name:
        raise FrontDoorError(
            "SFTTrainer: the model has no name_or_path (it was not loaded with from_pretrained), and its adapter and "
            "checkpoints must name their base: save_pretrained it to a folder and load it from there."
        )
    injected = getattr(model, "minisft_lora", None)
    if injected is not None and peft_config is not None:
        raise FrontDoorError("SFTTrainer: the model holds LoRA from get_peft_model already; leave peft_config out.")
    lora = injected or peft_config
    dtype = str(model.dtype).removeprefix("torch.")
    asked = "dtype" in fields or "torch_dtype" in fields
    own_dtype = {"dtype": dtype} if not asked and dtype in flags.DTYPE_NAMES else {}  # trained as it was loaded
    return {"model_name_or_path": name, **own_dtype, **(lora.flags() if lora else {})}


def data_source(train_dataset, eval_dataset, formatting_func, args: SFTConfig):
    """The dataset as the loop reads it (loop.Given.dataset): a path or the rows, eval beside train as a split."""
    if train_dataset is None:
        raise FrontDoorError("SFTTrainer: train_dataset is required (a path, a list of dicts, a datasets.Dataset).")
    in_memory = not isinstance(train_dataset, (str, os.PathLike))
    if formatting_func is not None:
        if not in_memory:
            raise FrontDoorError("formatting_func needs the rows in memory: load them (datasets.load_dataset) first.")
        train_dataset = formatted(train_dataset, formatting_func, args.dataset_text_field)
        if eval_dataset is not None:
            eval_dataset = formatted(eval_dataset, formatting_func, args.dataset_text_field)
    if eval_dataset is None:
        return str(train_dataset) if not in_memory else train_dataset
    if not in_memory or isinstance(train_dataset, dict) or isinstance(eval_dataset, (str, os.PathLike, dict)):
        raise FrontDoorError(
            "SFTTrainer: eval_dataset beside train_dataset takes both as rows (a list of dicts or a datasets.Dataset); "
            "for files, give a folder with train and test files as train_dataset."
        )
    if args.eval_split_size:
        raise FrontDoorError("SFTTrainer: eval_dataset and eval_split_size both make an eval split; choose one.")
    return {args.dataset_train_split: train_dataset, args.dataset_test_split: eval_dataset}


def formatted(dataset, formatting_func, text_field: str):
    """The rows as {text_field: text}, formatting_func applied as TRL applies it. TRL before 0.12 called it with a
    batch (a dict of columns) and wanted a list of texts back; later TRL calls it with one example, and takes a list
    back as the sign of a batch function. Here it is called first with a batch of the first row: a list back means
    a batch function, called batch by batch; a text back (or an error) means one example at a time."""
    if isinstance(dataset, dict):  # a DatasetDict: each split
        return {split: formatted(rows, formatting_func, text_field) for split, rows in dataset.items()}
    rows = list(dataset)
    batch_of = lambda part: {key: [row[key] for row in part] for key in rows[0]}  # noqa: E731
    try:
        batched = bool(rows) and isinstance(formatting_func(batch_of(rows[:1])), list)
    except Exception:  # a function of one example, given a batch; its own errors show when it is called right
        batched = False
    if batched:
        texts = []
        for start in range(0, len(rows), 1000):  # batches of 1,000 rows, as datasets' map makes them
            texts += formatting_func(batch_of(rows[start : start + 1000]))
    else:
        texts = [formatting_func(row) for row in rows]
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise FrontDoorError(f"formatting_func gave example {index} a {type(text).__name__}, not a text.")
    if len(texts) != len(rows):
        raise FrontDoorError(f"formatting_func gave {len(texts)} texts for {len(rows)} rows: one per row, please.")
    return [{text_field: text} for text in texts]
