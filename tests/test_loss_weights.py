"""Per-example weights and --loss_normalization, checked against the formula computed directly.

    token   (default)  loss = Σ_e w_e Σ_{t∈e} CE_t / Σ_e w_e |trained(e)|
    sample             loss = Σ_e w_e · mean_{t∈e} CE_t / Σ_e w_e

The direct computation runs each example alone through the model (model(input_ids).logits, then
F.cross_entropy per token) and weighs the token losses by hand. minisft computes the same through its
batches (padded, packed rows, padding-free), its chunked head and its step's denominator counted
before collating: float32 sums in another order. Measured on the tiny model: loss 1.0e-7 relative,
gradients 1.1e-6 (max |a - b| / max |b| per tensor); LOSS_RTOL and GRAD_RTOL are ~10× those. Ignoring
the weights, or taking sample for token, moves the gradients by 0.31 to 0.70 (the negative controls
below), 3e4× beyond GRAD_RTOL.
"""

import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig
from minisft.machinery.loop import train
from minisft.machinery.models import tiny_model
from minisft.machinery.prepare import load_and_prepare, prepare_dataset
from minisft.sft.attention import use_sdpa_by_example
from minisft.sft.batches import collate, count_weighted_tokens
from minisft.sft.examples import DataError, normalize_example
from minisft.sft.optim import build_optimizer, build_schedule
from minisft.sft.packing import pack
from minisft.sft.step import train_step

from .tiny_runs import CONVERSATIONS, refused_train

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5
WEIGHTS = [0.5, 2, 1, 3, 0.25, 1.5, 1, 2, 0.75, 1]


def conversation_rows(weights=WEIGHTS) -> list[dict]:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CONVERSATIONS
    ]
    return [row if weight is None else {**row, "weight": weight} for row, weight in zip(rows, weights)]


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    """The ten conversations, prepared (answers trained), each with its weight."""
    prepared = prepare_dataset(conversation_rows(), tokenizer, DataConfig(assistant_only_loss=True)).examples
    return list(prepared)


def direct(tokenizer, examples: list[dict], per_sample: bool) -> tuple[float, list[torch.Tensor]]:
    """The formula, example by example on the model's own logits: the loss and its gradients."""
    model = tiny_model(tokenizer)
    numerator, denominator = 0.0, 0.0
    for example in examples:
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].float()
        targets = torch.tensor(example["labels"][1:])
        token_losses = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
        trained, weight = int((targets != -100).sum()), example.get("weight", 1.0)
        numerator = numerator + weight * token_losses.sum() / (trained if per_sample else 1)
        denominator += weight if per_sample else weight * trained
    loss = numerator / denominator
    loss.backward()
    return loss.item(), [parameter.grad.clone() for parameter in model.parameters()]


def minisft_step(tokenizer, micro_batches, per_sample: bool, padding_free: bool = False) -> tuple[float, list]:
    """train_step's loss over these micro-batches, and the gradients it hands the optimizer (no clipping)."""
    model = tiny_model(tokenizer)
    if padding_free or "seq_lengths" in micro_batches[0][0]:
        use_sdpa_by_example(model)
    optimizer = build_optimizer(model, "adamw_torch", 1e-3, 0.0)
    gradients = []
    optimizer.register_step_pre_hook(lambda *unused: gradients.extend(p.grad.clone() for p in model.parameters()))
    collate_units = functools.partial(
        collate, model=model, pad_token_id=tokenizer.pad_token_id, padding_free=padding_free, pad_to_multiple_of=None,
        device=torch.device("cpu"), per_sample=per_sample,
    )  # fmt: skip
    step_weight = sum(count_weighted_tokens(units, per_sample)[1] for units in micro_batches)
    schedule = build_schedule(optimizer, "linear", 0, 2)
    loss = train_step(model, micro_batches, step_weight, collate_units, optimizer, schedule, 0.0)[0]
    return loss, gradients


def relative_gap(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, reference, strict=True))


def layouts(examples: list[dict]) -> dict:
    """The same examples as a run batches them: (micro-batches, padding_free)."""
    return {
        "padded": ([examples], False),
        "packed": ([list(pack(examples, 64).rows)], False),
        "padding_free": ([examples], True),
        "accumulated": ([examples[0:3], examples[3:5], examples[5:8], examples[8:]], False),
    }


@pytest.mark.parametrize("normalization", ["token", "sample"])
@pytest.mark.parametrize("layout", ["padded", "packed", "padding_free", "accumulated"])
def test_the_step_is_the_formula(tokenizer, examples, normalization, layout):
    per_sample = normalization == "sample"
    expected_loss, expected_gradients = direct(tokenizer, examples, per_sample)
    micro_batches, padding_free = layouts(examples)[layout]
    loss, gradients = minisft_step(tokenizer, micro_batches, per_sample, padding_free)
    assert loss == pytest.approx(expected_loss, rel=LOSS_RTOL)
    assert relative_gap(gradients, expected_gradients) <= GRAD_RTOL


def test_the_formula_tells_weights_and_normalisations_apart(tokenizer, examples):
    """The negative controls: what the step would give with the weights ignored, or the other normalisation."""
    _, token_gradients = direct(tokenizer, examples, per_sample=False)
    unweighted = [{key: value for key, value in example.items() if key != "weight"} for example in examples]
    assert relative_gap(minisft_step(tokenizer, [unweighted], False)[1], token_gradients) > 1e4 * GRAD_RTOL
    assert relative_gap(minisft_step(tokenizer, [examples], True)[1], token_gradients) > 1e4 * GRAD_RTOL


@pytest.mark.parametrize("layout", ["padded", "packed", "padding_free"])
def test_weight_one_everywhere_is_bit_equal_to_no_weights(tokenizer, examples, layout):
    """The weighted path (every ω 1) against the plain one: the same loss and gradients, bit for bit."""
    ones = [{**example, "weight": 1.0} for example in examples]
    plain = [{key: value for key, value in example.items() if key != "weight"} for example in examples]
    (weighted_batches, padding_free), (plain_batches, _) = layouts(ones)[layout], layouts(plain)[layout]
    model = tiny_model(tokenizer)
    use_sdpa_by_example(model)
    collated = collate(weighted_batches[0], model, tokenizer.pad_token_id, padding_free, None, torch.device("cpu"))
    assert torch.equal(collated["weights"], (collated["labels"] != -100).float())  # the weighted path, every ω 1
    weighted_loss, weighted_gradients = minisft_step(tokenizer, weighted_batches, False, padding_free)
    plain_loss, plain_gradients = minisft_step(tokenizer, plain_batches, False, padding_free)
    assert weighted_loss == plain_loss
    assert all(torch.equal(a, b) for a, b in zip(weighted_gradients, plain_gradients, strict=True))


@pytest.mark.parametrize("normalization", ["token", "sample"])
@pytest.mark.parametrize("layout", ["padded", "packed", "padding_free"])
def test_weight_zero_in_a_batch_equals_leaving_the_example_out(tokenizer, examples, normalization, layout):
    """The same loss (measured: equal) and gradients (measured 4.5e-7: the batch has another shape) as without it.
    A run never batches one: preparation drops it (the test below)."""
    with_zero = [dict(example) for example in examples]
    with_zero[3]["weight"] = 0.0
    without = with_zero[:3] + with_zero[4:]
    (zero_batches, padding_free), (without_batches, _) = layouts(with_zero)[layout], layouts(without)[layout]
    zero_loss, zero_gradients = minisft_step(tokenizer, zero_batches, normalization == "sample", padding_free)
    loss, gradients = minisft_step(tokenizer, without_batches, normalization == "sample", padding_free)
    assert zero_loss == pytest.approx(loss, rel=LOSS_RTOL)
    assert relative_gap(zero_gradients, gradients) <= GRAD_RTOL
    counted = [dict(example, weight=1.0) if not example["weight"] else example for example in with_zero]
    assert relative_gap(minisft_step(tokenizer, layouts(counted)[layout][0], False, padding_free)[1], gradients) > 0.1


# ----------------------------------------------------------------------------- rows, files and runs


def test_a_row_weight_is_the_examples_and_a_message_weight_stays_the_messages():
    row = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}],
        "weight": 2.5,
    }
    example = normalize_example(row, "data.jsonl line 4")
    assert example["weight"] == 2.5
    assert example["messages"][1]["weight"] == 0  # the turn's own switch (labels.py), untouched
    assert "weight" not in normalize_example({"text": "plain", "weight": None}, "data.jsonl line 5")  # null: none
    assert normalize_example({"text": "a CSV cell", "weight": "0.5"}, "data.csv line 2")["weight"] == 0.5


@pytest.mark.parametrize("bad", [-1, -0.5, "heavy", True, float("nan"), float("inf"), [1], {"w": 1}, 10**400])
def test_a_bad_weight_is_refused_naming_its_row(bad):
    with pytest.raises(DataError, match=r"^data.jsonl line 7: 'weight' is .*; an example's weight is a finite number"):
        normalize_example({"text": "some text", "weight": bad}, "data.jsonl line 7")


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_bad_weight_stops_the_run_with_its_file_and_line(tiny_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "data.jsonl", conversation_rows([1, 1, -2, *[1] * 7]))
    line, _ = refused_train(["--model_name_or_path", tiny_dir, "--dataset_name", str(data), "--output_dir",
                             str(tmp_path / "out"), "--max_steps", "1"], capsys)  # fmt: skip
    assert line == (f"error: {data} line 3: 'weight' is -2; an example's weight is a finite number ≥ 0 (1 if left out)")


def test_every_example_of_weight_zero_is_refused(tiny_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "data.jsonl", conversation_rows([0] * 10))
    line, _ = refused_train(["--model_name_or_path", tiny_dir, "--dataset_name", str(data), "--output_dir",
                             str(tmp_path / "out"), "--max_steps", "1"], capsys)  # fmt: skip
    assert "every example was dropped (10 of weight 0)" in line
    assert "give some examples a weight above 0" in line


def test_preparation_keeps_the_weights_and_drops_weight_zero_from_training(tokenizer, tmp_path):
    """Kept in the cache beside the tokens; a changed weight is another preparation (the file's content keys it);
    a training row of weight 0 is dropped and counted, an eval row keeps weight 1 (eval_loss is per token)."""
    cache_dir, data = str(tmp_path / "cache"), tmp_path / "data.jsonl"
    write_rows(data, conversation_rows([2, 0, *[1] * 7, 0.5]))
    config = DataConfig(dataset_name=str(data), cache_dir=cache_dir, dataset_test_split="test")
    first = load_and_prepare(str(data), tokenizer, config)
    assert first.train.stats.examples == 9 and first.train.stats.drop_reasons == {"of weight 0": 1}
    assert list(first.train.examples.weights) == [2, *[1] * 7, 0.5]
    assert first.train.examples[0]["weight"] == 2.0
    again = load_and_prepare(str(data), tokenizer, config)
    assert "reused" in again.cache_note and list(again.train.examples.weights) == list(first.train.examples.weights)
    write_rows(data, conversation_rows([3, 0, *[1] * 7, 0.5]))
    changed = load_and_prepare(str(data), tokenizer, config)
    assert "reused" not in changed.cache_note and changed.train.examples.weights[0] == 3
    write_rows(data, conversation_rows([None] * 10))
    assert load_and_prepare(str(data), tokenizer, config).train.examples.weights is None  # all 1: the plain path
    write_rows(data, conversation_rows([0.5] * 10))
    held_out = load_and_prepare(str(data), tokenizer, DataConfig(eval_split_size=0.5, cache_dir=cache_dir))
    assert held_out.eval.examples.weights is None and list(held_out.train.examples.weights) == [0.5] * 5


def run_config(tiny_dir, data, output_dir, packing=None, **training) -> RunConfig:
    flags = dict(output_dir=str(output_dir), max_steps=1, learning_rate=1e-3, logging_steps=1, save_steps=0)
    return RunConfig(
        model=ModelConfig(model_name_or_path=tiny_dir),
        data=DataConfig(dataset_name=str(data), max_length=256, assistant_only_loss=True),
        packing=packing or PackingConfig(),
        lora=LoraConfig(),
        training=TrainingConfig(**{**flags, **training}),
    )


def run(config: RunConfig):
    return train(config, Console(file=io.StringIO()))


@pytest.mark.parametrize("normalization", ["token", "sample"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_runs_first_step_logs_the_formula(tiny_dir, tokenizer, examples, tmp_path, normalization, packed):
    """The loop's denominator (Σ ω over the step, counted before collating) in a run: one step over every example,
    its logged loss against the formula on the model as loaded."""
    data = write_rows(tmp_path / "data.jsonl", conversation_rows())
    packing = PackingConfig(packing=True) if packed else None
    config = run_config(tiny_dir, data, tmp_path / "out", packing, per_device_train_batch_size=10,
                        loss_normalization=normalization)  # fmt: skip
    logged = run(config).history[0]["loss"]
    expected, _ = direct(tokenizer, examples, normalization == "sample")
    assert logged == pytest.approx(expected, rel=LOSS_RTOL)
    other, _ = direct(tokenizer, examples, normalization != "sample")
    assert abs(other - expected) > 100 * LOSS_RTOL * expected  # the other normalisation is told apart


def test_eval_loss_stays_the_per_token_loss(tiny_dir, tmp_path):
    """Weights and sample normalisation are training's: eval_loss counts every token once, bit for bit the same."""
    weighted = write_rows(tmp_path / "weighted.jsonl", conversation_rows())
    plain = write_rows(tmp_path / "plain.jsonl", conversation_rows([None] * 10))
    flags = dict(eval_on_start=True, eval_strategy="steps", eval_steps=1, per_device_train_batch_size=5)
    first = run(replace_data(run_config(tiny_dir, weighted, tmp_path / "a", loss_normalization="sample", **flags)))
    second = run(replace_data(run_config(tiny_dir, plain, tmp_path / "b", **flags)))
    assert first.history[0]["eval_loss"] == second.history[0]["eval_loss"]  # before any step: the same model
    assert first.history[1]["loss"] != second.history[1]["loss"]  # while training differs


def replace_data(config: RunConfig) -> RunConfig:
    """Half the rows held out for evaluation."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, eval_split_size=0.5))


# ----------------------------------------------------------------------------- two processes


def test_two_processes_take_the_weighted_steps_of_one(tiny_dir, tmp_path):
    """torchrun with 2 gloo processes on the CPU (2 × batch 2 × accumulation 2) against one process (batch 4 ×
    accumulation 2), sample normalisation over weighted rows. 13 rows: the last step of each epoch leaves one
    process a weight-0 repeat (DataParallel.mine). Bounds as tests/test_distributed.py measured them for unweighted
    runs (float32 sums in another order): weights 2e-5 absolute, losses 2e-6 relative; measured here 8.6e-8 and
    1.1e-7 after 4 steps, while the same run without weights ends 4.9e-3 away."""
    rows = conversation_rows() + conversation_rows([4, 0.5, 2])[:3]
    data = write_rows(tmp_path / "data.jsonl", rows)
    flags = dict(max_steps=4, learning_rate=1e-3, gradient_accumulation_steps=2, seed=7)
    one = tmp_path / "one"
    run(run_config(tiny_dir, data, one, per_device_train_batch_size=4, loss_normalization="sample", **flags))
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minisft.train",
        "--model_name_or_path", tiny_dir, "--dataset_name", str(data), "--output_dir", str(two), "--max_length=256",
        "--assistant_only_loss", "--per_device_train_batch_size=2", "--loss_normalization=sample", "--save_steps=0",
        "--logging_steps=1", *[f"--{name}={value}" for name, value in flags.items()],
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ours, reference = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert max(float((ours[name] - reference[name]).abs().max()) for name in ours) <= 2e-5
    losses = [json.loads(line)["loss"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(expected, rel=2e-6) and len(losses) == 4
    unweighted = tmp_path / "unweighted"  # the negative control: the same run without weights ends far away
    run(
        run_config(
            tiny_dir,
            write_rows(
                tmp_path / "plain.jsonl",
                [{key: value for key, value in row.items() if key != "weight"} for row in rows],
            ),
            unweighted,
            per_device_train_batch_size=4,
            **flags,
        )
    )
    other = load_file(unweighted / "model.safetensors")
    assert max(float((other[name] - reference[name]).abs().max()) for name in other) > 10 * 2e-5
