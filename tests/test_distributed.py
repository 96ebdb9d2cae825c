"""Training with torchrun: 2 gloo processes on the CPU take the steps that 1 process takes with the same global batch.

Each test starts `torchrun --standalone --nproc_per_node 2 -m minisft.train` on the tiny model, and compares with
one process running minisft.loop.train in this test process. 13 examples and 8 per step: the second step of each
epoch has 5 examples, fewer micro-batches than 2 processes × 2 accumulation steps, so one process pads its share
with a weight-0 micro-batch (loop.share_of).

Tolerance: the processes sum the same token losses in another order (each its own micro-batches, then the gradient
all-reduce), so the weights differ by float32 rounding, amplified a little by AdamW for gradients near zero:
measured 2.8e-6 max |a - b| after 5 steps at lr 1e-3 (a step moves a weight by up to 1e-3). WEIGHT_ATOL = 2e-5
is 7× that and 50× below one step; the negative control shows that other examples per step land far beyond it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minisft.checkpoint import CheckpointError
from minisft.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, TrainingConfig
from minisft.loop import RunConfig, train
from minisft.models import tiny_model

WEIGHT_ATOL = 2e-5
LOSS_RTOL = 1e-6
STEPS = 5
FLAGS = dict(max_steps=STEPS, learning_rate=1e-3, logging_steps=1, gradient_accumulation_steps=2, seed=7)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("distributed")
    tiny_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {index}: " + "why " * (index % 7)},
                {"role": "assistant", "content": "Because. " * (1 + index % 5)},
            ]
        }
        for index in range(13)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root


def torchrun(workspace: Path, output_dir: Path, *flags: str):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "minisft.train",
        "--model_name_or_path", str(workspace / "model"), "--dataset_name", str(workspace / "data.jsonl"),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2",
        *[f"--{name}={value}" for name, value in FLAGS.items()],
        *flags,
    ]  # fmt: skip
    # One thread per process: two processes on two cores.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def one_process(workspace: Path, output_dir: Path, **overrides) -> None:
    """The reference: one process, per-device batch 4 = 2 processes × 2."""
    training = {**FLAGS, "per_device_train_batch_size": 4, "save_steps": 0, **overrides}
    seed = training.pop("seed")
    train(
        RunConfig(
            model=ModelConfig(model_name_or_path=str(workspace / "model")),
            data=DataConfig(dataset_name=str(workspace / "data.jsonl"), seed=seed),
            packing=PackingConfig(),
            lora=LoraConfig(),
            training=TrainingConfig(output_dir=str(output_dir), **training),
        )
    )


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def largest_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max()) for name in first)


@pytest.fixture(scope="module")
def reference(workspace):
    one_process(workspace, workspace / "one")
    return workspace / "one"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_take_the_steps_of_one(workspace, reference, mode):
    output_dir = workspace / mode
    torchrun(workspace, output_dir, "--save_steps=0", *(["--fsdp"] if mode == "fsdp" else []))
    difference = largest_difference(output_dir, reference)
    assert difference <= WEIGHT_ATOL, difference
    moved = largest_difference(reference, workspace / "model")
    assert moved > 50 * WEIGHT_ATOL, "the weights must have moved far beyond the tolerance"
    ours, expected = metrics(output_dir), metrics(reference)
    # Only rank 0 writes: one line per step, not one per process.
    assert [record["step"] for record in ours] == list(range(1, STEPS + 1))
    for mine, theirs in zip(ours, expected):
        assert mine["num_tokens"] == theirs["num_tokens"]  # every trained token counted once, over both processes
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
        # Under FSDP, clip_grad_norm_ adds up the shards' float32 squared norms itself: measured up to 3e-5 relative
        # off, while every parameter's gradient equals the one-process gradient to 1e-7 (the weights show it).
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4 if mode == "fsdp" else 1e-6)


def test_other_examples_per_step_would_be_visible(workspace, reference):
    """The negative control: the same run over another order of the examples (what processes taking the wrong
    shares of a step would do) ends far beyond WEIGHT_ATOL, so the comparison above can fail."""
    one_process(workspace, workspace / "reordered", seed=8)
    assert largest_difference(workspace / "reordered", reference) > 10 * WEIGHT_ATOL


def test_checkpoint_of_two_processes_resumes_with_two(workspace):
    whole, parts = workspace / "whole", workspace / "parts"
    torchrun(workspace, whole, "--save_steps=3")
    assert (whole / "checkpoint-3" / "rng_state_0.pt").is_file() and (
        whole / "checkpoint-3" / "rng_state_1.pt"
    ).is_file()
    torchrun(workspace, parts, f"--resume_from_checkpoint={whole / 'checkpoint-3'}", "--save_steps=0")
    first, second = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert [record["loss"] for record in metrics(parts)] == [record["loss"] for record in metrics(whole)][3:]

    # One process cannot continue it: the data order and random states are per process.
    with pytest.raises(CheckpointError, match="saved by 2 processes"):
        one_process(workspace, workspace / "single", resume_from_checkpoint=str(whole / "checkpoint-3"))


def test_fsdp_needs_torchrun(workspace):
    """--fsdp in a plain `python -m minisft.train`: one clear line, exit status 2."""
    command = [
        sys.executable, "-m", "minisft.train", "--fsdp", "--save_steps=0", "--max_steps=1",
        "--model_name_or_path", str(workspace / "model"), "--dataset_name", str(workspace / "data.jsonl"),
        "--output_dir", str(workspace / "alone"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--fsdp shards the model across processes" in result.stderr and "Traceback" not in result.stderr
