"""Training with torchrun: 2 gloo processes on the CPU take the steps that 1 process takes with the same global batch.

Each test starts `torchrun --standalone --nproc_per_node 2 -m minisft.train` on the tiny model, and compares with
one process running minisft.machinery.loop.train in this test process. 13 examples and 8 per step: the second
step of each epoch has 5 examples, fewer micro-batches than 2 processes × 2 accumulation steps, so one process pads
its share with a weight-0 micro-batch (DataParallel.mine).

Tolerances: the processes sum the same token losses in another order (each its own micro-batches, then the
gradient all-reduce), so the weights differ by float32 rounding, amplified a little by AdamW for gradients near
zero: measured 1.2e-7 max |a - b| after 5 steps at lr 1e-3 (an earlier measurement, other versions: 2.8e-6; a step
moves a weight by up to 1e-3). WEIGHT_ATOL = 2e-5 is 7× the larger figure and 50× below one step; the negative
control shows that other examples per step land 230× beyond it (4.6e-3). The logged loss is a float32 sum of ~200
token losses per micro-batch, of micro-batches of other shapes on the two sides: measured 1.2e-7 relative, and
each side's sum may round by up to ~log2(200) · 2^-24 ≈ 5e-7, so LOSS_RTOL is 2e-6 (16× the measured figure;
other examples per step: 1.7e-4 to 1e-3). The gradient norm: see the test.
"""

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from minisft.machinery.checkpoint import CheckpointError, batch_for_processes, read_trainer_state
from minisft.machinery.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PackingConfig,
    RunConfig,
    TrainingConfig,
)
from minisft.machinery.loop import train
from minisft.machinery.models import tiny_model
from minisft.machinery.peft_files import ADAPTER_WEIGHTS

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
    return " ".join(result.stderr.split())


def one_process(workspace: Path, output_dir: Path, **overrides) -> str:
    """The reference: one process, per-device batch 4 = 2 processes × 2. Returns what the run printed."""
    training = {**FLAGS, "per_device_train_batch_size": 4, "save_steps": 0, **overrides}
    lora = {name: training.pop(name) for name in ("use_peft", "lora_dropout", "load_in_4bit") if name in training}
    console = Console(record=True, width=200, file=io.StringIO())
    train(
        RunConfig(
            model=ModelConfig(model_name_or_path=str(workspace / "model")),
            data=DataConfig(dataset_name=str(workspace / "data.jsonl")),
            packing=PackingConfig(),
            lora=LoraConfig(**lora),
            training=TrainingConfig(output_dir=str(output_dir), **training),
        ),
        console,
    )
    return " ".join(console.export_text().split())


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def largest_difference(a: Path, b: Path, weights: str = "model.safetensors") -> float:
    first, second = load_file(a / weights), load_file(b / weights)
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def largest_relative_difference(a: Path, b: Path) -> float:
    """max over the adapter's tensors of max |a - b| / max |b|."""
    first, second = load_file(a / ADAPTER_WEIGHTS), load_file(b / ADAPTER_WEIGHTS)
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max() / second[name].abs().max()) for name in first)


def bit_equal(a: Path, b: Path, weights: str = "model.safetensors") -> bool:
    first, second = load_file(a / weights), load_file(b / weights)
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


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


def test_compiled_layers_under_ddp_take_the_steps_of_one(workspace, reference):
    """--torch_compile under torchrun: DDP's gradient hooks sit on the parameters, outside the compiled layers, so two
    processes of compiled layers train what one eager process trains, within the eager comparison's bounds."""
    output_dir = workspace / "ddp_compiled"
    printed = torchrun(workspace, output_dir, "--save_steps=0", "--torch_compile")
    assert "× 2 processes (DDP)" in printed and "torch.compile (default mode)" in printed
    difference = largest_difference(output_dir, reference)
    assert difference <= WEIGHT_ATOL, difference
    for mine, theirs in zip(metrics(output_dir), metrics(reference), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)


def test_other_examples_per_step_would_be_visible(workspace, reference):
    """The negative control: the same run over another order of the examples (what processes taking the wrong
    shares of a step would do) ends far beyond WEIGHT_ATOL, so the comparison above can fail."""
    one_process(workspace, workspace / "reordered", seed=8)
    assert largest_difference(workspace / "reordered", reference) > 10 * WEIGHT_ATOL


def test_checkpoint_of_two_processes_resumes_with_two_or_one(workspace):
    """DDP: a checkpoint of 2 processes continues on 2 bit for bit, and on 1 with the global batch kept (per-process
    batch 2, accumulation 2 → 4): the same examples per step, summed in another order (WEIGHT_ATOL)."""
    whole, parts = workspace / "whole", workspace / "parts"
    torchrun(workspace, whole, "--save_steps=3")
    assert (whole / "checkpoint-3" / "rng_state_0.pt").is_file() and (
        whole / "checkpoint-3" / "rng_state_1.pt"
    ).is_file()
    torchrun(workspace, parts, f"--resume_from_checkpoint={whole / 'checkpoint-3'}", "--save_steps=0")
    assert bit_equal(whole, parts)
    assert [record["loss"] for record in metrics(parts)] == [record["loss"] for record in metrics(whole)][3:]

    single = workspace / "single"
    words = one_process(
        workspace, single, per_device_train_batch_size=2, resume_from_checkpoint=str(whole / "checkpoint-3")
    )
    assert "--per_device_train_batch_size 2 × --gradient_accumulation_steps 4 keeps its global batch of 8" in words
    assert largest_difference(single, whole) <= WEIGHT_ATOL
    assert [record["step"] for record in metrics(single)] == [4, 5]
    for mine, theirs in zip(metrics(single), metrics(whole)[3:]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
        assert mine["num_tokens"] == theirs["num_tokens"]


def test_global_batch_that_cannot_be_split_is_refused(workspace):
    """A checkpoint of global batch 2 × 2 × 2 = 8 cannot continue on 3 processes: one line, naming the batch."""
    whole = workspace / "whole"  # written by the test above
    if not (whole / "checkpoint-3").is_dir():
        torchrun(workspace, whole, "--save_steps=3")
    with pytest.raises(CheckpointError, match="global batch of 8, which 3 processes cannot split"):
        batch_for_processes(whole / "checkpoint-3", read_trainer_state(whole / "checkpoint-3"), 2, 2, world_size=3)
    assert batch_for_processes(whole / "checkpoint-3", read_trainer_state(whole / "checkpoint-3"), 2, 2, 4)[:2] == (
        2,
        1,
    )


@pytest.fixture(scope="module")
def lora_reference(workspace):
    """One process, LoRA without dropout (dropout's random masks differ with the number of processes)."""
    one_process(workspace, workspace / "lora-one", use_peft=True, lora_dropout=0.0)
    return workspace / "lora-one"


LORA_FLAGS = ("--use_peft", "--lora_dropout=0")


def test_fsdp_lora_trains_the_adapter_of_one_process_and_peft_loads_it(workspace, lora_reference):
    """FSDP2 over a LoRA model (frozen base and trained A, B in the same layers): the adapter gathered to rank 0
    equals one process's with the same global batch, relative 1e-4 (measured 3.5e-6 after 5 steps: float32 sums in
    another order; another order of the examples: 2.0), and peft loads it."""
    output_dir = workspace / "fsdp-lora"
    torchrun(workspace, output_dir, "--fsdp", *LORA_FLAGS, "--save_steps=3", "--merge_lora")
    assert largest_relative_difference(output_dir, lora_reference) <= 1e-4
    saved = load_file(output_dir / ADAPTER_WEIGHTS)
    assert all(saved[name].abs().max() > 0 for name in saved if "lora_B" in name)  # B starts at 0: it trained

    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    loaded = peft.PeftModel.from_pretrained(base, output_dir)
    state = loaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name.replace(".weight", ".default.weight")], tensor)
    assert (output_dir / "merged" / "model.safetensors").is_file()  # merged into a freshly loaded base on rank 0


def test_fsdp_qlora_trains_the_adapter_of_one_process(workspace):
    """QLoRA under FSDP2: the 4-bit codes are sharded like any weight (bitsandbytes keeps each layer's quantization
    state on its module, so the gathered codes dequantize again). The adapter equals one QLoRA process's, relative
    1e-4 (measured 1.3e-6); QLoRA against LoRA over the float base differs entirely (measured 2.0)."""
    output_dir, reference = workspace / "fsdp-qlora", workspace / "qlora-one"
    torchrun(workspace, output_dir, "--fsdp", *LORA_FLAGS, "--load_in_4bit", "--save_steps=0")
    one_process(workspace, reference, use_peft=True, lora_dropout=0.0, load_in_4bit=True)
    assert largest_relative_difference(output_dir, reference) <= 1e-4


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_checkpoint_resumes_on_two_bit_for_bit_and_on_one(workspace, lora_reference, mode):
    """An FSDP checkpoint is sharded (torch.distributed.checkpoint: each process writes its own shards): resumed
    on 2 processes the run ends bit-equal to the uninterrupted one; on 1 process (DCP reshards into the whole
    model, and accumulation 2 → 4 keeps the global batch) within the tolerance of one against two processes."""
    lora = mode == "lora"
    flags, weights = (LORA_FLAGS, ADAPTER_WEIGHTS) if lora else ((), "model.safetensors")
    whole = workspace / ("fsdp-lora" if lora else "fsdp-whole")
    if not (whole / "checkpoint-3").is_dir():
        torchrun(workspace, whole, "--fsdp", *flags, "--save_steps=3")
    checkpoint = whole / "checkpoint-3"
    assert (checkpoint / "sharded" / ".metadata").is_file()
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2  # one file of shards per process
    assert not (checkpoint / weights).exists()  # no whole copy gathered on rank 0

    again = workspace / f"fsdp-{mode}-again"
    torchrun(workspace, again, "--fsdp", *flags, "--save_steps=0", f"--resume_from_checkpoint={checkpoint}")
    assert bit_equal(whole, again, weights)

    single = workspace / f"fsdp-{mode}-single"
    words = one_process(
        workspace, single, per_device_train_batch_size=2, resume_from_checkpoint=str(checkpoint),
        **({"use_peft": True, "lora_dropout": 0.0} if lora else {}),
    )  # fmt: skip
    assert "resuming on 1 processes a checkpoint of 2" in words and "--gradient_accumulation_steps 4" in words
    assert [record["step"] for record in metrics(single)] == [4, 5]
    if lora:
        assert largest_relative_difference(single, whole) <= 1e-4
    else:
        assert largest_difference(single, whole) <= WEIGHT_ATOL


class RunsCode:
    """What a hostile .metadata could hold: unpickling it calls Path.touch (any callable would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_sharded_checkpoint_naming_code_is_refused_unrun(workspace, tmp_path):
    """DCP unpickles its .metadata with plain pickle: minisft unpickles it first with only DCP's classes allowed."""
    whole = workspace / "fsdp-whole"
    if not (whole / "checkpoint-3").is_dir():
        torchrun(workspace, whole, "--fsdp", "--save_steps=3")
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(whole / "checkpoint-3", checkpoint)
    marker = tmp_path / "ran"
    (checkpoint / "sharded" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    # Whoever can write .metadata can rewrite the checksums' listing too (machinery/checkpoint.py): here, drop its line.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["files"]["sharded/.metadata"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"sharded is damaged: .metadata is truncated or unreadable \(it names"):
        one_process(workspace, tmp_path / "out", per_device_train_batch_size=2, resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


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


@pytest.mark.parametrize("optim", ["adamw_8bit", "adafactor"])
def test_optimizers_that_take_whole_tensors_are_refused_under_fsdp(workspace, optim):
    """bitsandbytes' kernels have no DTensor rule and Adafactor adds whole tensors to shards (both fail mid-step,
    measured): refused before any work."""
    with pytest.raises(ConfigError, match=f"--optim {optim} does not run on FSDP's sharded weights"):
        one_process(workspace, workspace / "refused", fsdp=True, optim=optim)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(workspace, mode):
    """SIGTERM to rank 1 alone: its stop request travels in the step's all-reduce, so rank 0 stops before the same
    step, they write one checkpoint together (under FSDP each its shards), and torchrun reports rank 0's exit
    status 75. Resumed with --resume_from_checkpoint true, the run ends with the weights of an uninterrupted one,
    bit for bit."""
    steps, sharding = "--max_steps=10", ["--fsdp"] if mode == "fsdp" else []
    torchrun(workspace, workspace / f"uninterrupted-{mode}", steps, "--save_steps=0", *sharding)
    output_dir = workspace / f"sigterm-{mode}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "minisft.train",
        "--model_name_or_path", str(workspace / "model"), "--dataset_name", str(workspace / "data.jsonl"),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2",
        *[f"--{name}={value}" for name, value in FLAGS.items()],
        steps, "--save_steps=1000", *sharding,
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

    assert (output_dir / stopped[0] / "sharded").is_dir() == (mode == "fsdp")

    torchrun(workspace, output_dir, steps, "--save_steps=0", "--resume_from_checkpoint=true", *sharding)
    assert bit_equal(workspace / f"uninterrupted-{mode}", output_dir)
    assert [record["loss"] for record in metrics(output_dir)] == [
        record["loss"] for record in metrics(workspace / f"uninterrupted-{mode}")
    ]


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with this RANK (Linux: from /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for child in children:
        environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} among {children}")
