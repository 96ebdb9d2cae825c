"""A tokenizer without a pad token (Llama 3, Mistral and Qwen base tokenizers have none) trains as with one.

Batches are padded with --pad_token, else the tokenizer's pad token, else its EOS, as TRL 1.16 chooses it
(checked against a real SFTTrainer). Which token pads never changes the loss, since padding is never trained
and never attended to: a run without a pad token and a run padding with another token log the same losses.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from minisft.machinery.config import DataConfig, ModelConfig, RunConfig, TrainingConfig
from minisft.machinery.loop import train
from minisft.machinery.models import tiny_model
from minisft.sft.batches import setup_pad_token
from minisft.sft.packing import PackingError

EOS = "<|im_end|>"
OTHER = "<|endoftext|>"  # a pad token whose id (0) is not EOS's (2): the padded batches differ
CONVERSATIONS = [
    ("Hi", "Hello!"),
    ("What is the capital of France?", "Paris, on the Seine, has been the capital for a very long time."),
    ("微调测试", "我学会了"),
    ("Count to ten.", "One, two, three, four, five, six, seven, eight, nine, ten."),
    ("Say yes.", "Yes."),
    ("Name three colours.", "Red, green and blue."),
    ("Who are you?", "A tiny model, trained for two steps."),
    ("2+2?", "4"),
]


def without_pad_token(tokenizer):
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    return tokenizer


def test_the_tokenizers_own_pad_token_is_kept(fresh_tokenizer):
    fresh_tokenizer.pad_token = OTHER
    assert setup_pad_token(fresh_tokenizer) is None
    assert fresh_tokenizer.pad_token == OTHER


def test_without_one_eos_pads_and_the_run_says_so(fresh_tokenizer):
    note = setup_pad_token(without_pad_token(fresh_tokenizer))
    assert fresh_tokenizer.pad_token == EOS and fresh_tokenizer.pad_token_id == fresh_tokenizer.eos_token_id
    assert note == f"padding: the tokenizer has no pad token, so batches are padded with its EOS {EOS!r}, as TRL does"


def test_pad_token_flag_wins_and_must_be_in_the_vocabulary(fresh_tokenizer):
    assert setup_pad_token(fresh_tokenizer, OTHER) == f"padding: with {OTHER!r} (--pad_token)"
    assert fresh_tokenizer.pad_token == OTHER
    with pytest.raises(PackingError, match=r"--pad_token '<pad>' is not a token of this tokenizer's vocabulary"):
        setup_pad_token(fresh_tokenizer, "<pad>")


def test_neither_pad_nor_eos_is_a_clear_error(fresh_tokenizer):
    without_pad_token(fresh_tokenizer).eos_token = None
    with pytest.raises(PackingError, match="neither a pad token nor an EOS token .* pass --pad_token"):
        setup_pad_token(fresh_tokenizer)


@pytest.mark.parametrize("pad_token", [None, OTHER])
def test_the_choice_is_trls(fresh_tokenizer, pad_token):
    pytest.importorskip("trl")
    from tests.trl_reference import trl_trainer

    without_pad_token(fresh_tokenizer)
    examples = [{"text": "Hello world"}]
    theirs = trl_trainer(examples, fresh_tokenizer, pad_token=pad_token, max_length=64).processing_class.pad_token
    setup_pad_token(fresh_tokenizer, pad_token)
    assert fresh_tokenizer.pad_token == theirs


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """The same tiny model twice: beside a tokenizer without a pad token, and beside one padding with OTHER."""
    root = tmp_path_factory.mktemp("pad")
    model = tiny_model(tokenizer)
    folders = {}
    for name, pad_token in (("no-pad", None), ("other-pad", OTHER)):
        folder = root / name
        model.save_pretrained(folder)
        saved = copy.deepcopy(tokenizer)
        saved.pad_token = pad_token
        saved.save_pretrained(folder)
        folders[name] = str(folder)
    assert AutoTokenizer.from_pretrained(folders["no-pad"]).pad_token is None
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CONVERSATIONS
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    folders["data"] = str(root / "train.jsonl")
    return folders


def run_losses(model_dir: str, data: str, output_dir, **data_flags) -> tuple[list[float], str]:
    """Train 3 steps of 4 unequal conversations (so every batch is padded); the losses and what the run printed."""
    log = io.StringIO()
    config = RunConfig(
        model=ModelConfig(model_name_or_path=model_dir),
        data=DataConfig(dataset_name=data, max_length=128, **data_flags),
        training=TrainingConfig(
            output_dir=str(output_dir),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=1,
            save_steps=0,
        ),
    )
    train(config, console=Console(file=log, width=200))
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record], log.getvalue()


def test_training_without_a_pad_token_gives_the_same_losses(model_dirs, tmp_path):
    losses, printed = run_losses(model_dirs["no-pad"], model_dirs["data"], tmp_path / "no-pad")
    assert f"padding: the tokenizer has no pad token, so batches are padded with its EOS {EOS!r}" in printed
    other_losses, other_printed = run_losses(model_dirs["other-pad"], model_dirs["data"], tmp_path / "other-pad")
    assert "padding:" not in other_printed
    assert len(losses) == 3 and losses == other_losses
    # The saved tokenizer keeps the choice, so it pads the same way at inference.
    assert AutoTokenizer.from_pretrained(tmp_path / "no-pad").pad_token == EOS


def test_the_pad_token_flag_on_the_training_path(model_dirs, tmp_path):
    losses, printed = run_losses(model_dirs["no-pad"], model_dirs["data"], tmp_path / "flag", pad_token=OTHER)
    assert f"padding: with {OTHER!r} (--pad_token)" in printed
    reference, _ = run_losses(model_dirs["other-pad"], model_dirs["data"], tmp_path / "reference")
    assert losses == reference


def test_inspect_says_how_training_will_pad(model_dirs, capsys):
    from minisft.inspect import main as inspect_main
    from minisft.machinery.cli import run

    inspect_main(["--model_name_or_path", model_dirs["no-pad"], "--dataset_name", model_dirs["data"]])
    assert f"batches are padded with its EOS {EOS!r}" in " ".join(capsys.readouterr().err.split())  # rich wraps it
    with pytest.raises(SystemExit) as exit_info:
        run(
            inspect_main,
            [
                "--model_name_or_path",
                model_dirs["no-pad"],
                "--dataset_name",
                model_dirs["data"],
                "--pad_token",
                "<pad>",
            ],
        )
    assert exit_info.value.code == 2 and "--pad_token '<pad>' is not a token" in " ".join(
        capsys.readouterr().err.split()
    )
