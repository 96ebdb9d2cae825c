"""Training with torchrun: 2 gloo processes on the CPU take the steps that 1 process takes with the same global batch.

Each test starts `torchrun --standalone --nproc_per_node 2 -m minisft.train` on the tiny model, and compares with
one process running minisft.loop.train in this test process. 13 examples and 8 per step: the second step of each
epoch has 5 examples, fewer micro-batches than 2 processes × 2 accumulation steps, so one process pads its share
with a weight-0 micro-batch (DataParallel.mine).

Tolerances: the processes sum the same token losses in another order (each its own micro-batches, then the
gradient all-reduce), so the weights differ by float32 rounding, amplified a little by AdamW for gradients near
zero: measured 1.2e-7 max |a - b| after 5 steps at lr 1e-3 (an earlier measurement, other versions: 2.8e-6; a step
moves a weight by up to 1e-3). WEIGHT_ATOL = 2e-5 is 7× the larger figure and 50× below one step; the negative
control shows that other examples per step land 230× beyond it (4.6e-3). The logged loss is a float32 sum of ~200
token losses per micro-batch, of micro-batches of other shapes on the two sides: measured 1.2e-7 relative, and
each side's sum may round by up to ~log2(200) · 2^-24 ≈ 5e-7, so LOSS_RTOL is 2e-6 (16× the measured figure;
other examples per step: 1.7e-4 to 1e-3). The gradient norm: see the test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minisft.checkpoint import CheckpointError
from minisft.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, TrainingConfig
from minisft.loop import RunConfig, train
from minisft.models import tiny_model

WEIGHT_ATOL = 2e-5
LOSS_RTOL = 2e-6
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
        # The norm is a float32 sum of squares over the whole model, 3.1M of them in the embedding's gradient, and
        # torch's float32 norm of that many is itself 5e-5 to 7e-5 off the float64 value (measured, one process).
        # DDP takes it over the same full tensors as one process, so the errors match: measured 8.3e-8 relative.
        # FSDP adds up the norms of each process's shard: another float32 summation, measured up to 6.4e-5 relative
        # off one process (growing over the 5 steps), with every gradient within 6e-7 of one process's. The bounds
        # are 12× and 15× those; half the embedding's gradient left out or counted twice moves the norm by 18% or
        # 15% (measured), other examples per step move it by 2e-3 to 2e-2.
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3 if mode == "fsdp" else 1e-6)


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


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(workspace):
    """SIGTERM to rank 1 alone: its stop request travels in the step's all-reduce, so rank 0 stops before the same
    step, they write one checkpoint together, and torchrun reports rank 0's exit status 75. Resumed with
    --resume_from_checkpoint true, the run ends with the weights of an uninterrupted one, bit for bit."""
    steps = "--max_steps=10"
    torchrun(workspace, workspace / "uninterrupted", steps, "--save_steps=0")
    output_dir = workspace / "sigterm"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "minisft.train",
        "--model_name_or_path", str(workspace / "model"), "--dataset_name", str(workspace / "data.jsonl"),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2",
        *[f"--{name}={value}" for name, value in FLAGS.items()],
        steps, "--save_steps=1000",
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (output_dir / "metrics.jsonl").is_file() or not (output_dir / "metrics.jsonl").read_text().strip():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run never logged its first step"
        time.sleep(0.02)
    os.kill(worker_of_rank(launcher.pid, 1), signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)

    words = " ".join(stderr.split())
    assert "exitcode: 75" in words  # rank 0, stopped; torchrun itself reports a failure
    stopped = [path.name for path in output_dir.glob("checkpoint-*")]
    assert len(stopped) == 1, stderr[-3000:]
    step = int(stopped[0].removeprefix("checkpoint-"))
    assert 1 <= step < 10 and [record["step"] for record in metrics(output_dir)] == list(range(1, step + 1))
    assert {path.name for path in (output_dir / stopped[0]).glob("rng_state_*.pt")} == {
        "rng_state_0.pt",
        "rng_state_1.pt",
    }
    assert f"a stop request: stopped after step {step}" in words  # rank 0 got no signal itself

    torchrun(workspace, output_dir, steps, "--save_steps=0", "--resume_from_checkpoint=true")
    first = load_file(workspace / "uninterrupted" / "model.safetensors")
    second = load_file(output_dir / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert [record["loss"] for record in metrics(output_dir)] == [
        record["loss"] for record in metrics(workspace / "uninterrupted")
    ]


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with this RANK (Linux: from /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for child in children:
        environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} among {children}")
