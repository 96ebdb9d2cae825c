"""benchmarks/packing_throughput.py runs end to end and reports every figure: a check that it works, not a timing.

The run is as small as the script allows (2 steps of 2 short conversations, one repetition, three of the six
modes: each mode is a process that imports torch, and TRL's also transformers' Trainer), so the figures themselves
mean nothing here; what is checked is that the modes ran, that each mode's JSON carries every figure and its ratio
to TRL packed, that minisft's and TRL's bfd end at the same held-out loss, and that the targets were judged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the benchmark runs TRL's SFTTrainer beside minisft")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "packing_throughput.py"
FIGURES = (
    "trained_tokens_per_second",
    "slot_efficiency",
    "step_seconds",
    "first_step_seconds",
    "trained_tokens_per_step",
    "peak_memory_mb",
    "preparation_seconds",
    "final_loss",
    "mfu",
)


def test_benchmark_reports_every_figure_for_every_mode(tmp_path):
    output = tmp_path / "result"
    quick = ["--steps", "2", "--examples_per_step", "2", "--micro_batch_size", "2", "--repeats", "1"]
    quick += ["--held_out", "1", "--max_length", "128", "--output", str(output)]
    quick += ["--modes", "minisft_padded", "minisft_bfd", "trl_packed", "minisft_bfd_compiled", "minisft_bfd_mmap"]
    completed = subprocess.run([sys.executable, str(SCRIPT), *quick], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "trained tok/s" in completed.stdout

    record = json.loads(output.with_suffix(".json").read_text())
    modes = record["modes"]
    assert set(modes) == {"minisft_padded", "minisft_bfd", "trl_packed", "minisft_bfd_compiled", "minisft_bfd_mmap"}
    for mode, entry in modes.items():
        assert set(entry["median"]) == set(FIGURES), mode
        assert set(entry["ratio_to_trl_packed"]) == set(FIGURES), mode
        assert all(value > 0 for value in entry["median"].values()), (mode, entry["median"])
    assert modes["trl_packed"]["ratio_to_trl_packed"]["trained_tokens_per_second"] == 1.0
    # Both bfd packers make rows of the same examples and both sides train on all of them (in their own order):
    # the held-out loss moves from ~10.8 (untrained, ln 49152) to 9.89, and lands at the same place. Measured: the
    # two bfd runs end at the same float32 loss, and minisft padded (the same examples in other batches, so other
    # roundings) 1.0e-7 relative from them; 1e-4 is 1000× that and 900× below what training moved the loss.
    packed = [modes[mode]["median"]["final_loss"] for mode in ("minisft_bfd", "trl_packed")]
    assert packed[0] == pytest.approx(packed[1], rel=1e-4)
    # The variants: another allocator runs the same arithmetic (bit-equal); compiled layers sum in their own order
    # (tests/test_torch_compile.py measures that bound).
    assert modes["minisft_bfd_mmap"]["median"]["final_loss"] == packed[0]
    assert modes["minisft_bfd_compiled"]["median"]["final_loss"] == pytest.approx(packed[0], rel=1e-6)
    assert len(record["targets"]) == 4  # speed-ups over padded and over TRL, memory, MFU
    assert record["versions"]["trl"]


def test_lora_mode_reports_every_figure_and_both_sides_train_the_same_adapters(tmp_path):
    """--peft lora: minisft's injector against TRL + peft, from the same initial adapter to the same held-out loss."""
    output = tmp_path / "lora"
    quick = ["--steps", "2", "--examples_per_step", "2", "--repeats", "1", "--held_out", "1", "--max_length", "128"]
    quick += ["--peft", "lora", "--output", str(output), "--modes", "minisft_bfd", "trl_packed"]
    completed = subprocess.run([sys.executable, str(SCRIPT), *quick], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "LoRA r 16, alpha 32, on all-linear" in completed.stdout

    record = json.loads(output.with_suffix(".json").read_text())
    modes = record["modes"]
    assert set(modes) == {"minisft_bfd", "trl_packed"}
    for mode, entry in modes.items():
        assert set(entry["median"]) == set(FIGURES), mode
        assert set(entry["ratio_to_trl_packed"]) == set(FIGURES), mode
        assert all(value > 0 for value in entry["median"].values()), (mode, entry["median"])
    # r 16 on the tiny model's 7 Linear layers × 4: 16 × (512 + 384 + 384 + 512 + 3 × 1280) × 4.
    assert record["adapter_parameters"] == 360_448
    assert len(record["initial_adapter"]) == 1  # both workers' initial adapters have one digest: equal bit for bit
    # Measured: both end at the same float32 loss (10.466080), which two LoRA steps moved from 10.8863 (the run at
    # --learning_rate 0). 1e-4 relative is 0.001, 400× below that move.
    losses = [modes[mode]["median"]["final_loss"] for mode in ("minisft_bfd", "trl_packed")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert [target["target"] for target in record["targets"]] == [
        "minisft LoRA (bfd) / TRL + peft (packed), tokens/s",
        "peak memory minisft LoRA (bfd) / TRL + peft (packed)",
    ]


def test_lora_flops_count_is_what_a_lora_step_computes(tiny):
    """The docstring's count for a frozen base (4N + 6P, less layer 0's q, k, v input gradients, + the frozen head
    4 × vocab × hidden) against torch's own count of a minisft LoRA step's matmuls, attention aside (its CPU kernel
    is not counted by FlopCounterMode, so both sides leave it out).

    Measured (300 tokens): the count is 0.06% above torch's (layer 0's q, k, v A matrices, whose input gradient
    autograd also skips, and the norms' weights, which are not matmuls); 6N and 6 × vocab × hidden, the full
    fine-tune's count, would be ~50% above.
    """
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.step import model_losses

    benchmark = load_benchmark()
    settings = SimpleNamespace(lora_r=16, lora_alpha=32, lora_target_modules=["all-linear"], seed=0)
    use_sdpa_by_example(tiny)
    benchmark.minisft_lora(tiny, settings)
    adapters = benchmark.adapter_parameters(tiny.config, settings)
    assert adapters == sum(parameter.numel() for parameter in tiny.parameters() if parameter.requires_grad)

    length = 300
    ids = torch.randint(0, tiny.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "labels": ids.clone()}
    with FlopCounterMode(display=False) as counter:
        model_losses(tiny, batch).loss_sum.backward()
    # The model's matmuls only: not the attention kernel (should torch ever count it), nor the loss's one bmm, the
    # entropy metric's per-token dot product (2 × vocab per token: a metric, not model work).
    matmuls = {"aten.mm", "aten.addmm"}
    measured = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if str(op) in matmuls)
    config = tiny.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * length**2
    counted = benchmark.peft_flops_per_trained_token(config, [length], adapters) * (length - 1) - attention
    assert counted == pytest.approx(measured, rel=5e-3)


def load_benchmark():
    sys.path.insert(0, str(SCRIPT.parent))
    import packing_throughput

    return packing_throughput


def test_torchtune_modes_train_the_tokens_minisft_trains():
    """torchtune's samples (the HF chat template, labels = tokens) are minisft's prepared examples, token for token.

    Needs no torchtune: the samples are made before it sees them. Conversations of 1 to 3 exchanges, one cut by
    max_length, so truncation is checked too.
    """
    from minisft.machinery.config import DataConfig
    from minisft.machinery.models import load_tokenizer
    from minisft.machinery.prepare import prepare_dataset

    benchmark = load_benchmark()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    conversations = benchmark.synthetic_conversations(6, seed=0)
    max_length = 128
    samples = benchmark.torchtune_samples(conversations, tokenizer, max_length)
    examples = prepare_dataset(conversations, tokenizer, DataConfig(max_length=max_length)).examples
    assert [sample["tokens"] for sample in samples] == [example["input_ids"] for example in examples]
    assert [sample["labels"] for sample in samples] == [example["labels"] for example in examples]
    assert max(len(sample["tokens"]) for sample in samples) == max_length  # at least one was truncated


def test_torchtune_modes_are_skipped_with_the_reason_when_it_does_not_import():
    benchmark = load_benchmark()
    _, version, reason = benchmark.torchtune_environment("/nonexistent-torchtune-folder")
    if version:
        pytest.skip(f"torchtune {version} is importable in this environment itself")
    assert "torchtune does not import" in reason and "No module named" in reason
