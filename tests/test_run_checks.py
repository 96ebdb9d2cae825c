"""Flag combinations that cannot work are refused as the flags are parsed (config.check_run): one line, exit
status 2, before any data line, tokenizer or model. And minisft/machinery/config.py imports no stage of the
machinery, so every stage may import it."""

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch

import minisft.machinery.loop
from minisft.machinery.config import ConfigError, DataConfig, LoraConfig, ModelConfig, RunConfig, TrainingConfig

from .tiny_runs import refused_train


class WorkStarted(Exception):
    """Raised in place of reading the data, the tokenizer or a model: a refused run must never get that far."""


def refuse_work(*args, **kwargs):
    raise WorkStarted


@pytest.fixture
def no_work(monkeypatch):
    for name in ("load_and_prepare", "load_tokenizer", "load_model"):
        monkeypatch.setattr(minisft.machinery.loop, name, refuse_work)
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one plain process, not torchrun


def refused(argv: list[str], capsys) -> str:
    """The train command refuses in one line, and before any data line. Returns the line."""
    error, err = refused_train(argv, capsys)
    assert not [line for line in err.splitlines() if line.startswith("data:")], err
    return error


def flags(tmp_path, *more) -> list[str]:
    model, data = str(tmp_path / "model"), str(tmp_path / "data.jsonl")
    return ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(tmp_path / "out"), *more]


@pytest.mark.parametrize(
    "given, message",
    [
        (["--merge_lora"], "--lora_adapter and --merge_lora need --use_peft."),
        (["--lora_adapter", "adapter"], "--lora_adapter and --merge_lora need --use_peft."),
        (["--load_in_4bit"], "--load_in_4bit needs --use_peft"),
        (["--fsdp"], "--fsdp shards the model across processes: start it with torchrun"),
        (["--fsdp", "--optim", "adafactor"], "--optim adafactor does not run on FSDP's sharded weights"),
        (["--instruction_template", "<|user|>"], "--instruction_template needs a --response_template."),
        (["--pad_to_multiple_of", "2048"], "--pad_to_multiple_of must be from 1 to --max_length (1024), got 2048."),
    ],
)
def test_a_combination_that_cannot_work_is_refused_before_any_work(given, message, tmp_path, capsys, no_work):
    assert message in refused(flags(tmp_path, *given), capsys)
    assert not (tmp_path / "out").exists()


def test_packing_without_a_row_length_is_refused_before_any_work(tmp_path, capsys, no_work):
    config = tmp_path / "run.yaml"
    config.write_text("max_length: null\n")  # the command line has no spelling for "no --max_length"
    assert "--packing needs a row length: set --max_length" in refused(
        flags(tmp_path, "--config", str(config), "--packing"), capsys
    )


def test_a_resume_without_an_output_dir_is_refused_before_any_work(tmp_path, capsys, no_work):
    argv = ["--model_name_or_path", str(tmp_path), "--dataset_name", "data.jsonl", "--resume_from_checkpoint"]
    assert "--resume_from_checkpoint and torchrun runs need an explicit --output_dir" in refused(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: FlexAttention trains on it")
def test_flex_attention_on_the_cpu_is_refused_before_any_work(tmp_path, capsys, no_work):
    given = flags(tmp_path, "--attn_implementation", "flex_attention")
    assert "--attn_implementation flex_attention trains only on a GPU" in refused(given, capsys)


def test_the_demo_refuses_before_it_asks_its_prompts(capsys, no_work):
    """The demo asks its probe prompts before its first step: a refused flag must come before any work."""
    assert "--fsdp shards the model across processes" in refused(["--fsdp"], capsys)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_the_demo_asks_for_a_missing_tracker_before_its_prompts(capsys, no_work):
    assert "--report_to mlflow" in refused(["--report_to", "mlflow"], capsys)


@pytest.mark.parametrize("extra", [{"fsdp": True}, {}])
def test_fp16_needs_float32_weights_and_one_scaler(extra, monkeypatch):
    """fp16 needs CUDA (refused earlier without it): pretend there is one, and torchrun for --fsdp."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = ModelConfig(dtype="float32" if extra else "bfloat16")
    with pytest.raises(ConfigError, match="--fp16 is mixed precision over float32 weights"):
        RunConfig(model=model, training=TrainingConfig(output_dir="out", fp16=True, **extra))


def test_a_config_changed_after_it_was_built_is_checked_again(tmp_path, no_work):
    config = RunConfig(training=TrainingConfig(output_dir=str(tmp_path / "out")))
    config.lora.merge_lora = True
    with pytest.raises(ConfigError, match="need --use_peft"):
        minisft.machinery.loop.train(config)


def test_a_valid_combination_is_not_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    RunConfig(lora=LoraConfig(use_peft=True, merge_lora=True, load_in_4bit=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    RunConfig(training=TrainingConfig(output_dir="out", fsdp=True))


def test_config_imports_only_errors_and_the_lesson_module_it_names():
    """Every stage of the machinery imports config.py, so an import of a stage from it would be a cycle in waiting:
    it takes only minisft.errors and the lesson's optim.py (the names --optim and --lr_scheduler_type offer)."""
    code = "import sys, minisft.machinery.config; print(' '.join(m for m in sys.modules if m.startswith('minisft')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    packages = {"minisft", "minisft.machinery", "minisft.sft"}  # imported on the way to their modules
    assert set(result.stdout.split()) == packages | {"minisft.errors", "minisft.machinery.config", "minisft.sft.optim"}


def test_every_data_flag_says_whether_it_changes_the_prepared_tokens():
    """The preparation cache keys prepared data by these flags (machinery/cache.py): a flag that forgot to say would
    reuse a stale preparation when it changes."""
    undecided = [flag.name for flag in dataclasses.fields(DataConfig) if "prepared" not in flag.metadata]
    assert undecided == []
    assert all(isinstance(flag.metadata["prepared"], bool) for flag in dataclasses.fields(DataConfig))
