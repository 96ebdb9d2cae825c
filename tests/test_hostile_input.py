"""Ordinary mistakes a user makes are one line on stderr and exit status 2 (130 for Ctrl-C), naming the file, the
flag or the row and the cause: never a traceback, never a silent acceptance. And the notes for legal but absurd
settings, the files a folder run reads, and commands printed to paste that survive any path."""

import gzip
import io
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
from rich.console import Console

import minisft.machinery.loop
import minisft.train
from minisft.machinery.cli import parse_flags, run
from minisft.machinery.config import ConfigError, LoraConfig, TrainingConfig
from minisft.machinery.loop import TrainResult, attach_lora
from minisft.machinery.models import tiny_model
from minisft.train import CONFIG_TYPES, main

from .tiny_runs import data_file_of, refused_train, write_conversations


class ModelLoaded(Exception):
    """Raised in place of loading a model: a refusal that comes before it leaves this unraised."""


def load_model_refused(*args, **kwargs):
    raise ModelLoaded


@pytest.fixture
def no_model(monkeypatch):
    """Every refusal here must come before the model loads (the model file tests replace load_model themselves)."""
    monkeypatch.setattr(minisft.machinery.loop, "load_model", load_model_refused)


def refused(argv: list[str], capsys) -> str:
    return refused_train(argv, capsys)[0]


def train_flags(tiny_dir, tmp_path, data, *flags) -> list[str]:
    return ["--model_name_or_path", tiny_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--cache_dir", "none", *flags]  # fmt: skip


# ----------------------------------------------------------------------------- 1. rows


def test_a_deeply_nested_row_names_its_file_and_line(tiny_dir, tmp_path, capsys, no_model):
    data = tmp_path / "deep.jsonl"
    shutil.copy(data_file_of(tiny_dir), data)
    with data.open("a") as file:
        file.write("[" * 100_000 + "]" * 100_000 + "\n")  # json's parser recurses once per level: RecursionError
    error = refused(train_flags(tiny_dir, tmp_path, data), capsys)
    assert error.startswith(f"error: {data} line 11: JSON nested too deeply to read"), error


def test_a_row_too_deep_for_a_worker_names_its_rows(tiny_dir, tmp_path, capsys, no_model):
    """900 levels parse, but pickling the row to a worker process recurses past Python's limit."""
    data = tmp_path / "deep.jsonl"
    shutil.copy(data_file_of(tiny_dir), data)
    deep = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "extra": json.loads("[" * 900 + "]" * 900)}  # fmt: skip
    with data.open("a") as file:
        file.write(json.dumps(deep) + "\n")
    error = refused(train_flags(tiny_dir, tmp_path, data, "--dataset_num_proc", "2"), capsys)
    assert error.startswith(f"error: {data} line 1 to {data} line 11: a row nested too deeply"), error


# ----------------------------------------------------------------------------- 2. chat templates


@pytest.mark.parametrize(
    "template, cause",
    [
        ("{{ 1 + 'a' }}", "unsupported operand type(s) for +: 'int' and 'str'"),
        ("{{ messages[99].content }}", "list object has no element 99"),  # Jinja's own error: caught before too
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big. The sandbox blocks ranges larger than MAX_RANGE"),
        ("{{ 1 / 0 }}", "division by zero"),
    ],
)
def test_a_template_that_fails_while_rendering_names_the_row(template, cause, tiny_dir, tmp_path, capsys, no_model):
    path = tmp_path / "broken.jinja"
    path.write_text(template)
    flags = train_flags(tiny_dir, tmp_path, data_file_of(tiny_dir), "--chat_template_path", str(path))
    error = refused(flags, capsys)
    assert error.startswith(f"error: {data_file_of(tiny_dir)} line 1: the chat template rejected this conversation")
    assert cause in error


def test_a_template_error_crosses_from_a_worker_process(tiny_dir, tmp_path, capsys, no_model):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for i in range(10**9) %}x{% endfor %}")
    flags = ["--chat_template_path", str(path), "--dataset_num_proc", "2"]
    error = refused(train_flags(tiny_dir, tmp_path, data_file_of(tiny_dir), *flags), capsys)
    assert "line 1: the chat template rejected this conversation: Range too big" in error


@pytest.mark.parametrize(
    "content, cause",
    [
        (bytes(range(256)) * 4, "not a text file in UTF-8 (byte 128 is 0x80)"),
        ("{% for message in messages %}".encode(), "line 1: not a valid Jinja template (Unexpected end of template"),
    ],
)
def test_a_template_file_that_is_not_a_template_is_one_line(content, cause, tiny_dir, tmp_path, capsys, no_model):
    path = tmp_path / "template.jinja"
    path.write_bytes(content)
    error = refused(train_flags(tiny_dir, tmp_path, data_file_of(tiny_dir), "--chat_template_path", str(path)), capsys)
    assert error.startswith(f"error: --chat_template_path {path}") and cause in error, error


# ----------------------------------------------------------------------------- 3. model folders


def test_a_tokenizer_json_without_its_model_names_the_folder(tiny_dir, tmp_path, capsys, no_model):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    del tokenizer["model"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    error = refused(train_flags(str(folder), tmp_path, data_file_of(tiny_dir)), capsys)
    assert error.startswith(
        f"error: --model_name_or_path {folder}: the folder has no loadable tokenizer: tokenizer.json"
    )


class TouchWhenUnpickled:
    """A pickle that makes a folder when it is loaded: what a malicious "model.safetensors" could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("kind", ["pickle", "random bytes"])
def test_a_model_safetensors_that_is_not_one_is_named_and_never_unpickled(kind, tiny_dir, tmp_path, capsys):
    folder, marker = tmp_path / "model", tmp_path / "unpickled"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(pickle.dumps(TouchWhenUnpickled(marker)) if kind == "pickle" else os.urandom(4096))
    error = refused(train_flags(str(folder), tmp_path, data_file_of(tiny_dir)), capsys)
    assert error.startswith(f"error: {weights}: not a safetensors file"), error
    assert not marker.exists()


# ----------------------------------------------------------------------------- 4. --config values, and the Python API


@pytest.mark.parametrize(
    "yaml, message",
    [
        ("learning_rate: [1, 2]", "--learning_rate must be a number, got [1, 2]."),
        ("eval_strategy: step", '--eval_strategy must be one of no, steps, epoch, got "step".'),
        ("use_peft: 3", "--use_peft must be true or false, got 3."),
        ("lora_r: 1.5", "--lora_r must be a whole number, got 1.5."),
        ("warmup_steps: abc", "--warmup_steps must be a number, got 'abc'."),
        ("num_train_epochs: .inf", "--num_train_epochs must be a finite number, got inf."),
    ],
)
def test_a_config_value_of_the_wrong_type_names_the_flag(yaml, message, tmp_path, capsys, no_model):
    config = tmp_path / "run.yaml"
    config.write_text(yaml + "\n")
    error = refused(["--config", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    assert message in error, error


def test_config_values_are_read_as_the_command_line_reads_them(tmp_path):
    config = tmp_path / "run.yaml"
    # YAML reads 1e-4 as text, all-linear as one name, 2024 as a number and false as a boolean.
    config.write_text("learning_rate: 1e-4\nlora_target_modules: all-linear\nrun_name: 2024\nreport_to: none\n")
    _, _, _, lora, training = parse_flags(CONFIG_TYPES, ["--config", str(config)], "minisft.train", "test")
    assert training.learning_rate == 1e-4 and training.run_name == "2024" and training.report_to == ["none"]
    assert lora.lora_target_modules == ["all-linear"]


@pytest.mark.parametrize(
    "config_type, values, message",
    [
        (TrainingConfig, {"eval_strategy": "step"}, '--eval_strategy must be one of no, steps, epoch, got "step".'),
        (
            TrainingConfig,
            {"report_to": ["tensorbord"]},
            '--report_to must be one of none, all, tensorboard, wandb, trackio, mlflow, got ["tensorbord"].',
        ),
        (TrainingConfig, {"learning_rate": "1e-4"}, '--learning_rate must be a number, got "1e-4".'),
        (LoraConfig, {"use_peft": "yes"}, '--use_peft must be true or false, got "yes".'),
    ],
)
def test_the_python_api_refuses_what_the_command_line_refuses(config_type, values, message):
    with pytest.raises(ConfigError) as error:
        config_type(**values)
    assert str(error.value) == message


# ----------------------------------------------------------------------------- 5. integer flags' ranges


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pad_to_multiple_of", "2048"], "--pad_to_multiple_of must be from 1 to --max_length (1024), got 2048."),
        (["--dataset_num_proc", "100000"], "--dataset_num_proc must be from 1 to 256, got 100000."),
        (["--seed", str(2**70)], "--seed must be a whole number that fits in 64 bits"),
    ],
)
def test_an_absurd_integer_flag_gives_its_range(flags, message, tiny_dir, tmp_path, capsys, no_model):
    error = refused(train_flags(tiny_dir, tmp_path, data_file_of(tiny_dir), *flags), capsys)
    assert message in error, error


# ----------------------------------------------------------------------------- 6. splits left empty


def test_every_example_dropped_is_refused_before_the_model_loads(tiny_dir, tmp_path, capsys, no_model):
    flags = ["--max_length", "4", "--assistant_only_loss", "--max_steps", "-1", "--num_train_epochs", "1"]
    error = refused(train_flags(tiny_dir, tmp_path, data_file_of(tiny_dir), *flags), capsys)
    assert error == (
        "error: data (train): every example was dropped (10 every trained token was past max_length), so there is "
        "nothing to train on: raise --max_length (4), or shorten the prompts."
    )
    assert not list(tmp_path.rglob("*.safetensors"))  # no untrained model saved (the old code saved one)


def test_an_eval_split_left_empty_is_refused_when_evaluation_is_asked(tiny_dir, tmp_path, capsys, no_model):
    folder = tmp_path / "data"
    folder.mkdir()
    write_conversations(folder / "train.jsonl")
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Ok."}]}
    (folder / "test.jsonl").write_text(json.dumps(long_prompt) + "\n")
    flags = ["--max_length", "64", "--assistant_only_loss", "--eval_strategy", "steps"]
    error = refused(train_flags(tiny_dir, tmp_path, folder, *flags), capsys)
    assert error.startswith("error: data (eval): every example was dropped (1 every trained token was past max_length)")


# ----------------------------------------------------------------------------- 7. folders


def test_a_folder_run_reads_gzipped_files_and_says_which_files_it_read(tiny_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    write_conversations(folder / "a.jsonl")
    (folder / "b.jsonl.gz").write_bytes(gzip.compress((folder / "a.jsonl").read_bytes()))
    (folder / "README.md").write_text("About this data.\n")
    monkeypatch.setattr(minisft.machinery.loop, "load_model", load_model_refused)
    with pytest.raises(ModelLoaded):  # past the data: its lines are printed
        main(train_flags(tiny_dir, tmp_path, folder))
    err = capsys.readouterr().err
    assert f"data: read 2 files from {folder}: a.jsonl, b.jsonl.gz (train); left out: README.md (not .jsonl" in err
    assert "data (train): 20 examples" in err  # the gzipped file's ten too


def test_a_damaged_gz_file_is_one_line(tiny_dir, tmp_path, capsys, no_model):
    data = tmp_path / "data.jsonl.gz"
    data.write_bytes(gzip.compress(data_file_of(tiny_dir).read_bytes())[:100])  # cut short
    error = refused(train_flags(tiny_dir, tmp_path, data), capsys)
    assert error.startswith(f"error: {data}: not a readable gzip file"), error


# ----------------------------------------------------------------------------- 8. notes on absurd but legal settings


def test_a_lora_rank_above_the_layers_rank_is_noted(tokenizer):
    printed = io.StringIO()
    console = Console(file=printed, width=400)
    lora = LoraConfig(use_peft=True, lora_r=100, lora_target_modules=["all-linear"])
    attach_lora(tiny_model(tokenizer), lora, console)
    note, lora_line = printed.getvalue().splitlines()
    assert note.startswith("note: --lora_r 100 exceeds every targeted layer's rank (32, 64): the adapters hold 204,800")
    assert note.endswith("full fine-tuning of the targeted layers would train fewer (73,728)")
    assert lora_line.startswith("LoRA on 14 Linear layers")
    printed.truncate(0)
    attach_lora(tiny_model(tokenizer), LoraConfig(use_peft=True, lora_r=8, lora_target_modules=["all-linear"]), console)
    assert "note:" not in printed.getvalue()


# ----------------------------------------------------------------------------- 9. commands to paste


def test_the_chat_command_quotes_the_output_folder(tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "my run's output"
    monkeypatch.setattr(minisft.train, "train", lambda config, console: TrainResult(output_dir, 1, {}))
    monkeypatch.setattr(minisft.train, "print_summary", lambda output_dir, console: None)
    main([])  # the demo: it trains (asking its probes), then says how to chat with the result
    err = capsys.readouterr().err
    assert f"Chat with it: python -m minisft.chat --model_name_or_path {shlex.quote(str(output_dir))}\n" in err
    assert shlex.split(err.split("Chat with it: ")[1].splitlines()[0])[-1] == str(output_dir)


# ----------------------------------------------------------------------------- 10. Ctrl-C outside the steps


@pytest.mark.parametrize("during", ["load_and_prepare", "load_model"])
def test_ctrl_c_before_the_steps_is_one_word_and_status_130(during, tiny_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minisft.machinery.loop, during, interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run(main, train_flags(tiny_dir, tmp_path, data_file_of(tiny_dir)))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted\n") or err == "interrupted\n", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
