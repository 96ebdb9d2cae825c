"""A resume is what it claims: the checkpoint's files are the ones written, its trainer state is whole, and it goes on
from the base it was trained from. Each test damages the files of a real tiny run, or resumes it over another base,
and expects one line naming what is wrong, before anything is loaded or trained.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from minisft.machinery.checkpoint import (
    STATE_FILE,
    CheckpointError,
    base_identity,
    check_base_model,
    read_trainer_state,
)
from minisft.machinery.cli import run
from minisft.machinery.config import LoraConfig
from minisft.machinery.loop import train
from minisft.machinery.models import load_model, tiny_model
from minisft.machinery.reporting import MetricsError
from minisft.train import main

from .tiny_runs import data_file_of, metrics, run_config, write_conversations

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = dict(max_steps=3, per_device_train_batch_size=4, save_steps=1)  # checkpoint-1 and checkpoint-2
LORA = dict(use_peft=True, lora_r=4, lora_dropout=0.0)


@pytest.fixture(scope="module")
def full_run(tiny_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("full")
    train(run_config(tiny_dir, output_dir, **FLAGS))
    return output_dir


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lora")
    train(run_config(tiny_dir, output_dir, lora=LoraConfig(**LORA), **FLAGS))
    return output_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def resume(model_dir, output_dir, lora: bool = False, **flags):
    lora_config = LoraConfig(**LORA) if lora else None
    return train(run_config(model_dir, output_dir, lora=lora_config, resume_from_checkpoint="true", **FLAGS | flags))


def refusal(model_dir, output_dir, lora: bool = False, **flags) -> str:
    with pytest.raises(CheckpointError) as error:
        resume(model_dir, output_dir, lora, **flags)
    assert "\n" not in str(error.value)
    return str(error.value)


def flip_a_byte(path: Path, at: float = 0.75) -> None:
    """One byte of tensor data changed (past the headers): the file still loads, with one wrong number."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def model_folder(tokenizer, folder: Path, seed: int = 0, **config) -> str:
    """A tiny model (seed 0 is tiny_dir's weights) with some config fields changed, its tokenizer, and the ten
    conversations beside it, as tiny_dir has them."""
    model = tiny_model(tokenizer, seed=seed)
    for name, value in config.items():
        setattr(model.config, name, value)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    write_conversations(data_file_of(folder / "model"))
    return str(folder / "model")


# ----------------------------------------------------------------------------- the files


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt"])
def test_a_flipped_byte_is_refused_by_name_before_anything_loads(tiny_dir, tmp_path, full_run, file):
    """The old code loaded the flipped weights or AdamW state and trained on (a loss of 1e28 from the optimizer)."""
    output_dir = copy_of(full_run, tmp_path)
    flip_a_byte(output_dir / "checkpoint-2" / file)
    message = refusal(tiny_dir, output_dir)
    assert message.startswith(f"{output_dir / 'checkpoint-2'} is damaged: {file} is not the file that was written")
    assert "sha256" in message and f"--resume_from_checkpoint {output_dir / 'checkpoint-1'}" in message
    assert not (output_dir / "checkpoint-3").exists() and [r["step"] for r in metrics(output_dir)] == [1, 2, 3]


def test_a_flipped_adapter_byte_is_refused(tiny_dir, tmp_path, lora_run):
    output_dir = copy_of(lora_run, tmp_path)
    flip_a_byte(output_dir / "checkpoint-2" / "adapter_model.safetensors", at=0.9)
    assert "adapter_model.safetensors is not the file that was written" in refusal(tiny_dir, output_dir, lora=True)


@pytest.mark.parametrize(
    "file, damage, words",
    [
        ("rng_state.pt", lambda path: path.write_bytes(path.read_bytes()[:-8]), "bytes of the 10,473 written"),
        ("config.json", Path.unlink, "it has no config.json, which was written with it"),
        ("scheduler.pt", lambda path: path.write_bytes(path.read_bytes() + b"\0"), "and was written with 1,453"),
    ],
    ids=["cut-short", "deleted", "grown"],
)
def test_a_file_of_another_size_or_missing_is_refused(tiny_dir, tmp_path, full_run, file, damage, words):
    output_dir = copy_of(full_run, tmp_path)
    damage(output_dir / "checkpoint-2" / file)
    message = refusal(tiny_dir, output_dir)
    assert message.startswith(f"{output_dir / 'checkpoint-2'} is damaged: ") and words in message


def test_the_refusal_is_one_line_exit_2_on_the_command_line(tiny_dir, tmp_path, full_run, capsys):
    output_dir = copy_of(full_run, tmp_path)
    flip_a_byte(output_dir / "checkpoint-2" / "optimizer.pt")
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir)), "--max_length", "256"]
    flags += ["--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "4"]
    with pytest.raises(SystemExit) as exit_info:
        run(main, [*flags, "--save_steps", "1", "--resume_from_checkpoint", "true"])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "checkpoint-2 is damaged: optimizer.pt is not the file that was written" in err


def test_a_checkpoint_without_checksums_still_resumes(tiny_dir, tmp_path, full_run):
    """Written before checksums were recorded: resumed as before, its files unchecked."""
    output_dir = copy_of(full_run, tmp_path)
    state_file = output_dir / "checkpoint-2" / STATE_FILE
    state = json.loads(state_file.read_text())
    assert set(state["files"]) == {
        "config.json", "generation_config.json", "model.safetensors", "optimizer.pt", "rng_state.pt", "scheduler.pt"
    }  # fmt: skip
    del state["files"], state["base_model"]
    state_file.write_text(json.dumps(state))
    assert resume(tiny_dir, output_dir, max_steps=4).steps == 4


# ----------------------------------------------------------------------------- the trainer state


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda state: state | {"step": "2"}, 'has step "2", where a whole number ≥ 0 belongs'),
        (lambda state: state | {"step": 2.5}, "has step 2.5, where a whole number ≥ 0 belongs"),
        (lambda state: {key: value for key, value in state.items() if key != "step"}, f"{STATE_FILE} holds no step"),
        (lambda state: state | {"data_order": [4, 42]}, "has data_order [4, 42], where an object"),
        (lambda state: state | {"world_size": 0}, "has world_size 0, where a whole number ≥ 1 belongs"),
        (lambda state: state | {"num_tokens": None}, "has num_tokens null, where a whole number ≥ 0 belongs"),
        (lambda state: state | {"files": ["model.safetensors"]}, "has files"),
        (lambda state: [state], f"{STATE_FILE} holds no step"),
    ],
    ids=[
        "step-text",
        "step-fraction",
        "no-step",
        "data_order-list",
        "world_size-0",
        "num_tokens-null",
        "files",
        "list",
    ],
)
def test_a_hand_edited_trainer_state_is_one_line_naming_it(tiny_dir, tmp_path, full_run, edit, words):
    """The old code went on with these until a computation with them failed: a traceback."""
    output_dir = copy_of(full_run, tmp_path)
    state_file = output_dir / "checkpoint-2" / STATE_FILE
    state_file.write_text(json.dumps(edit(json.loads(state_file.read_text()))))
    message = refusal(tiny_dir, output_dir)
    assert message.startswith(f"{output_dir / 'checkpoint-2'} is damaged: ") and STATE_FILE in message
    assert words in message and f"--resume_from_checkpoint {output_dir / 'checkpoint-1'}" in message


def test_a_torn_trainer_state_is_refused_at_any_cut(full_run):
    """Cut anywhere (an interrupted copy), the state is refused by name. (The old code refused these too: JSON cut
    short never parses. This test keeps it so, now that the state is checked field by field after parsing.)"""
    directory = full_run / "checkpoint-2"
    whole = (directory / STATE_FILE).read_bytes()
    torn = directory.parent / "torn"
    shutil.copytree(directory, torn / "checkpoint-2")
    cuts = sorted({*range(0, len(whole) - 1, 7), len(whole) - 2})
    for cut in cuts:
        (torn / "checkpoint-2" / STATE_FILE).write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=f"checkpoint-2 is damaged: {STATE_FILE}"):
            read_trainer_state(torn / "checkpoint-2")
    # The state's own last byte is its newline: without it the state is whole.
    (torn / "checkpoint-2" / STATE_FILE).write_bytes(whole[:-1])
    assert read_trainer_state(torn / "checkpoint-2")["step"] == 2
    shutil.rmtree(torn)


# ----------------------------------------------------------------------------- the base model


@pytest.fixture(scope="module")
def other_bases(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    return {
        "weights": model_folder(tokenizer, folder / "weights", seed=1),  # the same config, other weights
        # The same weights and shapes, another config: the old code loaded the checkpoint's tensors into it.
        "config": model_folder(tokenizer, folder / "config", rms_norm_eps=1e-3),
        "copy": model_folder(tokenizer, folder / "copy"),  # tiny_dir's model in another folder: the same base
    }


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("other", ["weights", "config"])
def test_a_resume_over_another_base_is_refused_naming_both(
    tiny_dir, tmp_path, full_run, lora_run, other_bases, lora, other
):
    output_dir = copy_of(lora_run if lora else full_run, tmp_path)
    message = refusal(other_bases[other], output_dir, lora=lora, ignore_data_order_mismatch=True)
    assert message.startswith(f"{output_dir / 'checkpoint-2'} was trained from {tiny_dir} (config ")
    assert f"this run loads {other_bases[other]} (config " in message
    assert message.endswith(f": resume with --model_name_or_path {tiny_dir}.")
    differs = (
        "whose weights differ" if other == "weights" else "whose config differs (rms_norm_eps 1e-06 there, 0.001 here)"
    )
    assert differs in message

    # The same base from another folder resumes; so does a checkpoint from before the base was recorded.
    if other == "weights":
        assert resume(other_bases["copy"], output_dir, lora=lora).steps == 3
        state_file = output_dir / "checkpoint-2" / STATE_FILE
        state = json.loads(state_file.read_text())
        del state["base_model"], state["files"]  # the files' list (its trainer state is edited) and the base
        state_file.write_text(json.dumps(state))
        assert resume(other_bases[other], output_dir, lora=lora).steps == 3


def test_the_base_identity_tells_a_dtype_and_a_4bit_load_apart(tiny_dir):
    """Computed on the base as loaded: the same model loaded the same way is the same base, bit for bit,
    in 4 bits too; the same model loaded otherwise is told apart by its dtypes."""
    from minisft.machinery.models import four_bit_quantization

    def four_bit():
        quantization = four_bit_quantization(torch.float32, "nf4", False, "uint8", torch.device("cpu"))
        return load_model(tiny_dir, quantization_config=quantization)

    full, half, quantized = load_model(tiny_dir), load_model(tiny_dir, dtype=torch.bfloat16), four_bit()
    identities = [base_identity(model, tiny_dir) for model in (full, half, quantized, four_bit())]
    assert [identity["dtypes"] for identity in identities] == [
        "float32",
        "bfloat16",
        "float32, uint8",
        "float32, uint8",
    ]
    assert len({identity["weights_sha256"] for identity in identities}) == 3  # the two 4-bit loads agree
    assert len({identity["config_sha256"] for identity in identities}) == 1  # the quantization is not the config


def test_a_base_changed_in_its_own_folder_is_told_so(tokenizer, tmp_path):
    then = base_identity(tiny_model(tokenizer, seed=0), "models/base")
    with pytest.raises(CheckpointError) as error:
        check_base_model(
            tmp_path / "checkpoint-4", {"base_model": then}, base_identity(tiny_model(tokenizer, seed=1), "models/base")
        )
    assert str(error.value).endswith(
        "whose weights differ: models/base has changed since: resume over the model it was then, or start a new run."
    )


def test_a_resume_over_the_base_loaded_otherwise_is_refused(tiny_dir, tmp_path, lora_run):
    output_dir = copy_of(lora_run, tmp_path)
    with pytest.raises(CheckpointError) as error:
        config = run_config(tiny_dir, output_dir, lora=LoraConfig(**LORA), resume_from_checkpoint="true", **FLAGS)
        config.model.dtype = "bfloat16"
        train(config)
    message = str(error.value)
    assert "loaded as bfloat16 where the checkpoint's base was float32" in message
    assert message.endswith(": resume with the --dtype and --load_in_4bit it was trained with.")


# ----------------------------------------------------------------------------- metrics.jsonl


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_note(tiny_dir, tmp_path, full_run, capsys):
    """A run killed while appending to metrics.jsonl leaves a line without its newline; the resume drops it."""
    output_dir = copy_of(full_run, tmp_path)
    with open(output_dir / "metrics.jsonl", "a") as file:
        file.write('{"step": 4, "epoch": 1.2, "loss": 1.')
    resume(tiny_dir, output_dir, max_steps=4)
    err = " ".join(capsys.readouterr().err.split())
    assert f"{output_dir / 'metrics.jsonl'} line 4: dropped, 36 bytes without a newline" in err
    assert [record["step"] for record in metrics(output_dir)] == [1, 2, 3, 4]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tiny_dir, tmp_path, full_run):
    output_dir = copy_of(full_run, tmp_path)
    lines = (output_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (output_dir / "metrics.jsonl").write_text(lines[0] + '{"step": 2, "loss": \n' + lines[2])
    with pytest.raises(MetricsError, match=r"metrics.jsonl line 2: not valid JSON \(Expecting value at column 21\)"):
        resume(tiny_dir, output_dir, max_steps=4)
