"""TRL's own prepared training data, as the reference minisft's data preparation is checked against.

`trl_prepared` builds a real `trl.SFTTrainer` (on a tiny random model, so it costs a few seconds on a CPU)
and reads back `trainer.train_dataset`: the rows SFTTrainer would train on after its `_prepare_dataset`
(ChatML conversion, EOS appending, tokenization, completion / assistant masks turned into labels,
truncation to `max_length`, dropping rows left with no trained token). Nothing is trained.
`assert_same_examples` compares minisft's prepared examples with those rows, naming the first token that differs.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from contextlib import contextmanager

import pytest

# The only columns that describe an example's format. Anything else a caller's example carries
# (minisft's "origin", say) would become a dataset column TRL does not know about.
FORMAT_KEYS = ("messages", "text", "prompt", "completion")


@contextmanager
def _quiet():
    """Silence the progress bars and the chatter of datasets / transformers / TRL while the trainer is built."""
    import datasets
    import transformers

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("trl", "transformers", "datasets", "accelerate")]
    levels = [logger.level for logger in loggers]
    transformers_verbosity = transformers.logging.get_verbosity()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(transformers_verbosity)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bar()


def trl_trainer(examples: list[dict], tokenizer, **sft_config_kwargs):
    """A constructed (never trained) SFTTrainer over `examples`; its `train_dataset` is the prepared data.

    The tokenizer is deep-copied first: SFTTrainer sets pad_token / eos_token (and, with
    `chat_template_path`, the chat template) on the object it is given, which would leak into the
    caller's tokenizer and from there into whatever minisft is compared with.
    """

    if not examples:
        raise ValueError("trl_prepared needs at least one example: SFTTrainer reads the first one to detect the format")
    return trl_trainer_for_rows(
        [{key: example[key] for key in FORMAT_KEYS if key in example} for example in examples],
        tokenizer,
        **sft_config_kwargs,
    )


def trl_trainer_for_rows(rows: list[dict], tokenizer, **sft_config_kwargs):
    """As trl_trainer, for raw rows handed to TRL whole: tools, chat_template_kwargs, pre-tokenized columns."""
    import datasets
    import trl

    from minisft.machinery.models import tiny_model

    tokenizer = copy.deepcopy(tokenizer)
    with _quiet(), tempfile.TemporaryDirectory(prefix="trl-reference-") as output_dir:
        args = trl.SFTConfig(
            output_dir=output_dir,
            report_to="none",
            # One process: forking workers costs more than it saves on a handful of rows,
            # and a subprocess's failure would be harder to read.
            dataset_num_proc=None,
            use_cpu=True,
            # TRL's default is not to shuffle; pinned so the rows keep the input order even if that changes.
            shuffle_dataset=False,
            **sft_config_kwargs,
        )
        trainer = trl.SFTTrainer(
            model=tiny_model(tokenizer),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    return trainer


def trl_prepared(examples: list[dict], tokenizer, **sft_config_kwargs) -> list[dict]:
    """TRL 1.16's prepared rows for `examples`: [{"input_ids": [...], "labels": [...]}, ...].

    `sft_config_kwargs` go to `trl.SFTConfig` (max_length, completion_only_loss, assistant_only_loss,
    eos_token, chat_template_path, ...). Rows TRL drops (fully masked after truncation) are absent, the
    rest keep the input order.
    """
    return prepared_rows_of(trl_trainer(examples, tokenizer, **sft_config_kwargs))


def trl_prepared_rows(rows: list[dict], tokenizer, **sft_config_kwargs) -> list[dict]:
    """As trl_prepared, for raw rows handed to TRL whole (see trl_trainer_for_rows)."""
    return prepared_rows_of(trl_trainer_for_rows(rows, tokenizer, **sft_config_kwargs))


def prepared_rows_of(trainer) -> list[dict]:
    dataset = trainer.train_dataset
    return [
        {"input_ids": list(ids), "labels": list(labels)} for ids, labels in zip(dataset["input_ids"], dataset["labels"])
    ]


def trl_train(model, examples: list[dict], tokenizer, output_dir, **sft_config_kwargs):
    """Train `model` (a transformers model, or a peft model) with a real `trl.SFTTrainer`, quietly; the trainer.

    For parity runs of the training loop (tests/test_loop_parity_trl.py). Only what keeps the run quiet and on
    the CPU is fixed here; every setting that changes the numbers (optimizer, schedule, bf16, gradient
    checkpointing, packing, ...) is the caller's to spell out in `sft_config_kwargs`. The trained weights are
    `trainer.model`'s; `trainer.state.log_history` holds what was logged; `trainer.train_dataset` the prepared rows.
    """
    import datasets
    import transformers
    import trl

    rows = [{key: example[key] for key in FORMAT_KEYS if key in example} for example in examples]
    tokenizer = copy.deepcopy(tokenizer)
    with _quiet():
        args = trl.SFTConfig(
            output_dir=str(output_dir),
            report_to="none",
            use_cpu=True,
            dataset_num_proc=None,
            disable_tqdm=True,
            **sft_config_kwargs,
        )
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
        )
        # With the progress bar off, transformers prints every log line instead.
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    return trainer


def assert_same_examples(tokenizer, prepared, theirs):
    """minisft's prepared examples equal TRL's, example by example: same count, same input_ids, same labels."""
    ours = prepared.examples
    origins = prepared.origins if getattr(prepared, "origins", None) else [f"minisft #{i}" for i in range(len(ours))]
    if len(ours) != len(theirs):
        pytest.fail(
            f"minisft kept {len(ours)} examples, TRL {len(theirs)}\n"
            + "\n".join(f"  minisft {i}: {tokenizer.decode(e['input_ids'][:12])!r}" for i, e in enumerate(ours))
            + "\n"
            + "\n".join(f"  TRL     {i}: {tokenizer.decode(e['input_ids'][:12])!r}" for i, e in enumerate(theirs))
        )
    for index, (mine, reference_example) in enumerate(zip(ours, theirs)):
        for key in ("input_ids", "labels"):
            _assert_same_sequence(tokenizer, index, origins[index], key, list(mine[key]), reference_example[key])


def _assert_same_sequence(tokenizer, index, origin, key, ours, theirs):
    if ours == theirs:
        return
    position = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    start, stop = max(0, position - 4), position + 5
    pytest.fail(
        f"example {index} ({origin}): {key} differ at position {position} "
        f"(minisft has {len(ours)} tokens, TRL {len(theirs)})\n"
        f"  minisft [{start}:{stop}]: {_show(tokenizer, ours, start, stop)}\n"
        f"  TRL     [{start}:{stop}]: {_show(tokenizer, theirs, start, stop)}\n"
        + (
            f"  TRL's whole example: {tokenizer.decode(theirs)!r}"
            if key == "input_ids"
            else f"  TRL trains on: {tokenizer.decode([t for t in theirs if t != -100])!r}"
        )
    )


def _show(tokenizer, sequence, start, stop):
    shown = []
    for token in sequence[start:stop]:
        shown.append("-100" if token == -100 else f"{token}:{tokenizer.decode([token])!r}")
    return " ".join(shown) or "(nothing)"
