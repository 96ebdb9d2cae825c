"""The training loop: it learns, resumes exactly, stops cleanly, and writes loadable outputs."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import minisft.machinery.loop
import minisft.sft.step
from minisft.machinery.config import ConfigError, LoraConfig, PackingConfig, TrainingConfig
from minisft.machinery.loop import TrainingError, train
from minisft.machinery.models import load_tokenizer, tiny_model
from minisft.machinery.prepare import load_and_prepare

from .tiny_runs import metrics, run_config, weights


class ModelWatch:
    """What happens inside the model the loop trains, seen through hooks put on it as the loop loads it."""

    def __init__(self):
        self.layers = 0  # decoder layers
        self.matmul_dtypes: set[torch.dtype] = set()  # of every decoder nn.Linear output, in training forwards
        self.layer_runs = 0  # layer 0's input norm: once per forward pass, twice when the backward recomputes it
        self.saved_bytes: list[int] = []  # per forward pass: the activations the decoder keeps for the backward
        self.hidden_bytes: list[int] = []  # per forward pass: one hidden-state tensor (a layer's input)


def watch_the_model(monkeypatch) -> ModelWatch:
    """Hooks on the model `train` loads. Module hooks on a decoder layer run outside transformers' checkpoint
    (it checkpoints `forward`, not `__call__`), so the layers' saved-tensor count brackets one forward pass;
    a hook on a module inside a layer runs again when the backward recomputes that layer."""
    watch = ModelWatch()
    original = minisft.machinery.loop.load_model

    def load_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        layers = model.model.layers
        watch.layers = len(layers)
        parameters: set[int] = set()
        brackets = []
        saved: dict[int, int] = {}

        def keep(tensor):  # a tensor autograd keeps for the backward: count its storage once, weights aside
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        def enter(module, args):
            if torch.is_grad_enabled():
                parameters.update(p.untyped_storage().data_ptr() for p in model.parameters())
                saved.clear()
                watch.hidden_bytes.append(args[0].numel() * args[0].element_size())
                brackets.append(torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor))
                brackets[-1].__enter__()

        def leave(module, args, output):
            if brackets:
                brackets.pop().__exit__(None, None, None)
                watch.saved_bytes.append(sum(saved.values()))

        def matmul(module, args, output):
            if torch.is_grad_enabled():
                watch.matmul_dtypes.add(output.dtype)

        def layer_run(module, args):
            if torch.is_grad_enabled():
                watch.layer_runs += 1

        layers[0].register_forward_pre_hook(enter)
        layers[-1].register_forward_hook(leave)
        layers[0].input_layernorm.register_forward_pre_hook(layer_run)
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(matmul)
        return model

    monkeypatch.setattr(minisft.machinery.loop, "load_model", load_and_watch)
    return watch


def test_loss_falls_and_outputs_load(tiny_dir, tmp_path):
    result = train(run_config(tiny_dir, tmp_path, max_steps=25, per_device_train_batch_size=10))
    losses = [record["loss"] for record in metrics(tmp_path) if "loss" in record]
    assert len(losses) == 25 and losses[-1] < losses[0] - 1.0
    assert result.steps == 25
    record = metrics(tmp_path)[-1]
    for name in (
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "num_tokens",
        "tokens_per_second",
        "mean_token_accuracy",
        "entropy",
        "peak_memory_mb",
    ):
        assert name in record, name
    records = metrics(tmp_path)
    # Every step trains on all ten conversations (a batch of 10): the same trained tokens each step, summed up.
    per_step = records[0]["num_tokens"]
    assert per_step > 0
    assert [record["num_tokens"] for record in records] == [record["step"] * per_step for record in records]
    # The model learns its ten answers: more next tokens right (measured: 0 at step 1, 0.41 at step 25).
    accuracies = [record["mean_token_accuracy"] for record in records]
    assert all(0.0 <= accuracy <= 1.0 for accuracy in accuracies) and accuracies[-1] >= accuracies[0] + 0.2
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    # The entropy of a distribution over the vocabulary lies in (0, ln V] (measured: 10.79 ≈ ln 49,152, random).
    assert all(0.0 < record["entropy"] <= math.log(model.config.vocab_size) + 1e-4 for record in records)
    assert (tmp_path / "chat_template.jinja").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert torch.equal(model.model.embed_tokens.weight, weights(tmp_path)["model.embed_tokens.weight"])


def test_bf16_autocast_runs_on_cpu(tiny_dir, tmp_path, monkeypatch):
    """--bf16 true: the decoder's matmuls compute in bf16 (on a CPU too, where the default is off), while the
    weights stay fp32 masters; without it they compute in fp32."""
    with monkeypatch.context() as patch:
        watch = watch_the_model(patch)
        train(run_config(tiny_dir, tmp_path / "bf16", max_steps=2, bf16=True))
    assert watch.matmul_dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in metrics(tmp_path / "bf16"))
    # Autocast computes in bf16 but keeps fp32 master weights: the saved model is fp32.
    assert weights(tmp_path / "bf16")["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32

    with monkeypatch.context() as patch:
        watch = watch_the_model(patch)
        train(run_config(tiny_dir, tmp_path / "fp32", max_steps=1))  # the CPU default: no autocast
    assert watch.matmul_dtypes == {torch.float32}


def test_pure_bf16_weights(tiny_dir, tmp_path):
    """--torch_dtype bfloat16 trains the weights in bf16 (as the first seed does) and saves them so."""
    config = run_config(tiny_dir, tmp_path, max_steps=3, per_device_train_batch_size=10)
    config.model.torch_dtype = "bfloat16"
    train(config)
    losses = [record["loss"] for record in metrics(tmp_path)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    saved = weights(tmp_path)["model.layers.0.mlp.up_proj.weight"]
    initial = load_file(f"{tiny_dir}/model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert saved.dtype == torch.bfloat16 and not torch.equal(saved.float(), initial.float())


def test_gradient_checkpointing_changes_memory_not_results(tiny_dir, tmp_path, monkeypatch):
    """--gradient_checkpointing: the decoder keeps only each layer's input for the backward pass, which
    recomputes the rest, and the trained weights are the same bit for bit."""
    flags = dict(max_steps=3, per_device_train_batch_size=10)
    with monkeypatch.context() as patch:
        plain_watch = watch_the_model(patch)
        train(run_config(tiny_dir, tmp_path / "plain", **flags))
    with monkeypatch.context() as patch:
        watch = watch_the_model(patch)
        train(run_config(tiny_dir, tmp_path / "checkpointed", gradient_checkpointing=True, **flags))

    # One forward pass per step (one micro-batch); the checkpointed layer runs again in each backward.
    assert len(plain_watch.saved_bytes) == len(watch.saved_bytes) == 3
    assert plain_watch.layer_runs == 3 and watch.layer_runs == 6
    # What stays in memory between the forward and the backward pass (the activation memory checkpointing
    # saves): checkpointed, at most one hidden-state tensor per layer, the layers' inputs; plain, every
    # intermediate of every layer: q, k, v, attention output, the MLP's wide activations... Measured: exactly
    # one hidden state per layer (291,840 bytes), and 19× that without checkpointing; the test asks for 5×.
    for saved, plain_saved, hidden in zip(watch.saved_bytes, plain_watch.saved_bytes, watch.hidden_bytes):
        assert 0 < saved <= watch.layers * hidden, (saved, hidden)
        assert plain_saved > 5 * saved, (plain_saved, saved)

    plain, checkpointed = weights(tmp_path / "plain"), weights(tmp_path / "checkpointed")
    initial = load_file(f"{tiny_dir}/model.safetensors")
    for name in plain:
        # Recomputing the forward in the backward pass runs the same operations on the same inputs: the same
        # numbers, bit for bit (measured), after weights that moved (by up to 2e-3).
        assert torch.equal(plain[name], checkpointed[name]), name
    assert not torch.equal(plain["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


@pytest.mark.parametrize("split", [(10, 1), (2, 5), (3, 4)])
def test_accumulation_does_not_change_the_step(tiny_dir, tmp_path, split):
    """The same 10 examples per step, split into micro-batches differently: the same weights."""
    batch, accumulation = split
    reference = tmp_path / "reference"
    train(run_config(tiny_dir, reference, max_steps=3, per_device_train_batch_size=10))
    train(
        run_config(
            tiny_dir,
            tmp_path / "split",
            max_steps=3,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
    )
    expected, got = weights(reference), weights(tmp_path / "split")
    if split == (10, 1):  # the reference run again: the same computation, so the same weights bit for bit
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    for name in expected:
        gap = (got[name] - expected[name]).abs()
        # Summing micro-batches in another order rounds the gradient differently (~1e-7 relative).
        # AdamW divides each gradient by its own running RMS, so for a weight whose gradient is
        # almost zero that rounding can move the update by a visible fraction of lr (1e-3): allow
        # 1% of one step, and require such weights to be rare. Measured after 3 steps: at most 4.4e-7
        # (split 2 × 5; 1.6e-7 for 3 × 4), no weight beyond 1e-6 and 5 of 3.2M beyond 1e-7. Normalising
        # each micro-batch by its own tokens instead (split 2 × 5) ends 3.4e-3 away, with 83% of the
        # weights beyond 1e-6 (measured with a patched loop).
        assert gap.max() <= 1e-5, (name, gap.max())
        assert (gap > 1e-6).float().mean() < 1e-5, (name, (gap > 1e-6).sum())


def interrupt_during_step(monkeypatch, step):
    """Make the loop raise KeyboardInterrupt (as Ctrl-C does) in the forward pass of `step` (1-based)."""
    original = minisft.sft.step.model_losses
    calls = {"count": 0}

    def forward(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:  # one micro-batch per step in these runs
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(minisft.sft.step, "model_losses", forward)


@pytest.mark.parametrize("use_peft", [False, True])
def test_stopped_and_resumed_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch, use_peft):
    # LoRA dropout draws random numbers every step: the resumed run must restore the generator too.
    lora = LoraConfig(use_peft=True, lora_dropout=0.1, lora_target_modules=["all-linear"]) if use_peft else None
    # 20 steps of 4 examples: the 10 demo examples are reshuffled every 2.5 steps, so the resumed run must
    # find its place inside an epoch's permutation.
    flags = dict(max_steps=20, per_device_train_batch_size=4, warmup_steps=2)
    train(run_config(tiny_dir, tmp_path / "whole", lora=lora, **flags))

    with monkeypatch.context() as patch:
        interrupt_during_step(patch, 11)
        stopped = train(run_config(tiny_dir, tmp_path / "parts", lora=lora, **flags))
    assert stopped.interrupted and stopped.steps == 10
    assert (tmp_path / "parts" / "checkpoint-10" / "optimizer.pt").is_file()
    resumed = train(run_config(tiny_dir, tmp_path / "parts", lora=lora, resume_from_checkpoint="true", **flags))
    assert resumed.steps == 20

    assert [record["loss"] for record in metrics(tmp_path / "parts")] == [
        record["loss"] for record in metrics(tmp_path / "whole")
    ]
    name = "adapter_model.safetensors" if use_peft else "model.safetensors"
    whole, parts = load_file(tmp_path / "whole" / name), load_file(tmp_path / "parts" / name)
    assert whole.keys() == parts.keys() and all(torch.equal(whole[key], parts[key]) for key in whole)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_dir, tmp_path, monkeypatch):
    original = minisft.sft.step.model_losses
    calls = {"count": 0}

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        calls["count"] += 1
        if calls["count"] == 3:  # the third step's only micro-batch
            losses.loss_sum = losses.loss_sum * float("nan")
        return losses

    monkeypatch.setattr(minisft.sft.step, "model_losses", poisoned)
    with pytest.raises(TrainingError, match="not finite at step 3"):
        train(run_config(tiny_dir, tmp_path, max_steps=6, per_device_train_batch_size=10, save_steps=2))
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-3").exists()


def test_checkpoints_are_pruned_and_loadable(tiny_dir, tmp_path):
    train(run_config(tiny_dir, tmp_path, max_steps=6, per_device_train_batch_size=10, save_steps=2, save_total_limit=1))
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no partial folder left behind
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-4")
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_non_empty_output_dir_is_refused(tiny_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        train(run_config(tiny_dir, tmp_path))
    train(run_config(tiny_dir, tmp_path, max_steps=1, overwrite_output_dir=True))
    # Overwrite trains into the folder; it removes only a previous minisft run's files (tests/test_output_dir.py).
    assert (tmp_path / "keep.txt").read_text() == "precious" and (tmp_path / "model.safetensors").is_file()


def test_lora_run_writes_adapter_and_merged_model(tiny_dir, tmp_path):
    lora = LoraConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, merge_lora=True)
    result = train(
        run_config(
            tiny_dir,
            tmp_path,
            lora=lora,
            max_steps=3,
            per_device_train_batch_size=10,
            packing=PackingConfig(packing=True),
        )
    )
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight)


def test_peft_flags_without_use_peft_are_an_error(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="need --use_peft"):
        train(run_config(tiny_dir, tmp_path, lora=LoraConfig(merge_lora=True)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --fp16 runs (tests/test_loop.py's cuda test)")
def test_fp16_without_a_gpu_is_one_clear_line():
    with pytest.raises(ConfigError, match="--fp16 needs a CUDA GPU, and none is visible here"):
        TrainingConfig(fp16=True)
    with pytest.raises(ConfigError, match="choose one"):
        TrainingConfig(fp16=True, bf16=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA GPU")
def test_fp16_scales_the_loss_and_stays_near_fp32(tiny_dir, tmp_path, monkeypatch):
    scalers = []
    original = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(original(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    fp32 = train(run_config(tiny_dir, tmp_path / "fp32", max_steps=4, bf16=False))
    fp16 = train(run_config(tiny_dir, tmp_path / "fp16", max_steps=4, fp16=True))
    assert scalers[-1].is_enabled() and scalers[-1].get_scale() > 1  # the loss really was scaled up
    first_fp32, first_fp16 = metrics(tmp_path / "fp32")[0]["loss"], metrics(tmp_path / "fp16")[0]["loss"]
    # Not measured yet (no session has had a GPU). fp16 has 10 mantissa bits: a loss of ~10.8 rounds by ~5e-3 per
    # op; 0.05 allows for ten of them, and is far below what a broken unscale would give (gradients 65,536× too
    # large: clipped to max_grad_norm, but pointing wherever the overflowed ones did).
    assert abs(first_fp16 - first_fp32) < 0.05
    assert abs(fp16.metrics["loss"] - fp32.metrics["loss"]) < 0.1


@pytest.mark.parametrize("mode", ["padded", "packed", "padding_free"])
def test_trained_tokens_are_counted_before_collating(tokenizer, mode):
    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.batches import collate
    from minisft.sft.labels import count_trained_tokens, count_trained_tokens_of
    from minisft.sft.packing import pack

    texts = ["a first example", "the second one is a little longer", "three", "and a fourth to pack beside them"]
    examples = [{"input_ids": ids, "labels": ids} for ids in (tokenizer(text)["input_ids"] for text in texts)]
    examples[1]["labels"] = [-100] * 3 + examples[1]["labels"][3:]  # a prompt that is not trained
    units = pack(examples, 16, "bfd").rows if mode == "packed" else examples
    for implementation in ("sdpa", "eager"):
        model = tiny_model(tokenizer, attn_implementation=implementation)
        use_sdpa_by_example(model)
        batch = collate(units, model, tokenizer.pad_token_id, mode == "padding_free", None, torch.device("cpu"))
        assert count_trained_tokens_of(units) == count_trained_tokens(batch["labels"]) > 0


def test_each_micro_batch_is_collated_just_before_its_forward(tiny_dir, tmp_path, monkeypatch):
    events = []
    original_collate, original_losses = minisft.machinery.loop.collate, minisft.sft.step.model_losses
    monkeypatch.setattr(
        minisft.machinery.loop, "collate", lambda *a, **k: events.append("collate") or original_collate(*a, **k)
    )
    monkeypatch.setattr(
        minisft.sft.step, "model_losses", lambda *a, **k: events.append("forward") or original_losses(*a, **k)
    )
    train(
        run_config(
            tiny_dir, tmp_path / "out", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=3
        )
    )
    # Collating all of a step's micro-batches first (as before) would read collate, collate, collate, forward, ...
    assert events == ["collate", "forward"] * 5  # ten conversations in micro-batches of 2: 3 in step 1, 2 in step 2


def step_examples(tokenizer) -> list[dict]:
    """Eight examples of different lengths, one with an untrained prompt: two steps of two micro-batches of two."""
    texts = ["a first example", "the second one is a little longer", "three", "and a fourth one",
             "five is here", "six, six, six and six", "seven", "the eighth and last of them"]  # fmt: skip
    examples = [{"input_ids": ids, "labels": ids} for ids in (tokenizer(text)["input_ids"] for text in texts)]
    examples[1]["labels"] = [-100] * 3 + examples[1]["labels"][3:]
    return examples


def step_parts(tokenizer) -> tuple:
    """A fresh tiny model (always the same weights), its AdamW, a schedule that moves, and its collate function."""
    import functools

    from minisft.sft.batches import collate
    from minisft.sft.optim import build_optimizer, build_schedule

    model = tiny_model(tokenizer)
    optimizer = build_optimizer(model, "adamw_torch", 1e-3, 0.01)
    collate_units = functools.partial(
        collate, model=model, pad_token_id=tokenizer.pad_token_id, padding_free=False, pad_to_multiple_of=None,
        device=torch.device("cpu"),
    )  # fmt: skip
    return model, optimizer, build_schedule(optimizer, "linear", 0, 2), collate_units


def test_one_process_step_equals_the_data_parallel_one_bit_for_bit(tokenizer):
    from minisft.machinery.distributed import Processes, data_parallel
    from minisft.sft.labels import count_trained_tokens_of
    from minisft.sft.step import train_step

    examples = step_examples(tokenizer)
    steps = [[examples[0:2], examples[2:4]], [examples[4:6], examples[6:8]]]  # 2 steps, accumulation 2
    plain, wrapped = step_parts(tokenizer), step_parts(tokenizer)
    start = [parameter.detach().clone() for parameter in plain[0].parameters()]
    parallel = data_parallel(wrapped[0], Processes(), fsdp=False)  # the loop's call before train_step's defaults
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    for micro_batches in steps:
        tokens = count_trained_tokens_of([unit for units in micro_batches for unit in units])
        model, optimizer, schedule, collate_units = plain
        got = train_step(model, micro_batches, tokens, collate_units, optimizer, schedule, 1.0)
        model, optimizer, schedule, collate_units = wrapped
        expected = train_step(
            model, micro_batches, tokens, collate_units, optimizer, schedule, 1.0, weights=[1.0, 1.0],
            parallel=parallel, scaler=disabled,
        )  # fmt: skip
        assert got == expected
    trained, reference = list(plain[0].parameters()), list(wrapped[0].parameters())
    assert all(torch.equal(a, b) for a, b in zip(trained, reference, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(trained, start))  # the steps did move every weight


def step_and_gradients(tokenizer, micro_batches, step_tokens, step_weights) -> tuple:
    """train_step's figures, and the gradients it hands the optimizer (clipped)."""
    from minisft.sft.step import train_step

    model, optimizer, schedule, collate_units = step_parts(tokenizer)
    gradients = []
    optimizer.register_step_pre_hook(
        lambda *unused: gradients.extend(parameter.grad.clone() for parameter in model.parameters())
    )
    figures = train_step(
        model, micro_batches, step_tokens, collate_units, optimizer, schedule, 1.0, weights=step_weights
    )
    return figures, gradients


def test_a_weight_of_zero_leaves_the_micro_batch_out_of_the_step(tokenizer):
    from minisft.sft.labels import count_trained_tokens_of

    examples = step_examples(tokenizer)
    kept, padding = examples[0:2], examples[2:4]
    tokens = count_trained_tokens_of(kept)
    padded, padded_gradients = step_and_gradients(tokenizer, [kept, padding], tokens, [1, 0])
    alone, alone_gradients = step_and_gradients(tokenizer, [kept], tokens, None)
    assert padded == alone  # loss, correct predictions, entropy sum, gradient norm
    assert len(padded_gradients) == len(alone_gradients) > 0
    assert all(torch.equal(a, b) for a, b in zip(padded_gradients, alone_gradients))
    counted, _ = step_and_gradients(tokenizer, [kept, padding], tokens, [1, 1])
    assert counted[0] != alone[0]  # the padding micro-batch would change the step were it counted


TRUNCATED = r"1 truncated to 64 tokens \(\d+ tokens cut\), 0 dropped"
SPLIT = r"1 split over rows \(nothing cut\), 0 dropped"


@pytest.mark.parametrize(
    "packing, said",
    [
        ({}, TRUNCATED + r"\n"),
        ({"padding_free": True}, TRUNCATED + r"\n"),
        ({"packing": True}, TRUNCATED + r"; packed into \d+ rows of 64"),
        ({"packing": True, "packing_strategy": "bfd_split"}, SPLIT + r"; packed into \d+ rows of 64"),
        ({"packing": True, "packing_strategy": "wrapped"}, SPLIT + r"; packed into \d+ rows of 64"),
    ],
    ids=["padded", "padding_free", "bfd", "bfd_split", "wrapped"],
)
def test_what_is_cut_is_said_in_one_line_per_split(tokenizer, tmp_path, packing, said):
    """Preparation alone cuts to max_length (bfd_split and wrapped split over rows instead): each split's one line
    says what was cut or split, and what was dropped, in every mode."""
    from io import StringIO

    from rich.console import Console

    long = " ".join(["word"] * 100)
    rows = [{"text": long}] + [{"text": f"short example {n}"} for n in range(5)]
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = run_config(str(model_dir), tmp_path / "out", max_steps=1, packing=PackingConfig(**packing))
    config.data.dataset_name, config.data.max_length = str(data), 64
    log = StringIO()
    train(config, console=Console(file=log, width=300))
    printed = log.getvalue()
    for split in ("train", "eval"):
        assert re.search(rf"data \({split}\): 6 examples, \d+ trained tokens; {said}", printed), printed


@pytest.mark.parametrize("per_device_eval_batch_size", [1, 3])
def test_evaluation_figures_equal_the_models_own_logits(tiny_dir, tmp_path, per_device_eval_batch_size):
    """eval_loss, eval_mean_token_accuracy and eval_entropy (--eval_on_start: the untrained model) against the
    full logits of the model's own forward pass over each held-out example alone, token-weighted over the split.
    Batched and padded (3) or one by one (1), the figures must be the same."""
    config = run_config(tiny_dir, tmp_path / "out", max_steps=1, eval_on_start=True)
    config.data.eval_split_size = 0.3
    config.training.per_device_eval_batch_size = per_device_eval_batch_size
    train(config)
    logged = metrics(tmp_path / "out")[0]
    assert logged["step"] == 0 and "loss" not in logged

    tokenizer = load_tokenizer(tiny_dir)
    held_out = load_and_prepare(config.data.dataset_name, tokenizer, config.data, config.packing, config.training.seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    loss_sum = correct = entropy_sum = tokens = 0
    with torch.no_grad():
        for example in held_out.eval.examples:
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(example["labels"][1:])
            logits, targets = logits[targets != -100], targets[targets != -100]
            log_probabilities = torch.log_softmax(logits, dim=-1)
            loss_sum += float(torch.nn.functional.nll_loss(log_probabilities, targets, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
            entropy_sum += float(-(log_probabilities.exp() * log_probabilities).sum())
            tokens += len(targets)
    assert len(held_out.eval.examples) == 3 and tokens > 0
    # The loop's float32 head, chunked, against float64 over HF's float32 logits: the same maths in another order
    # and precision, measured at most 1.3e-7 relative (both batch sizes); 1e-5 is ~75× that. The accuracy counts
    # integers: exact.
    assert logged["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert logged["eval_entropy"] == pytest.approx(entropy_sum / tokens, rel=1e-5)
    assert logged["eval_mean_token_accuracy"] == correct / tokens


def test_peak_memory_is_the_runs_own_not_its_launchers():
    """peak_memory_mb (metrics.jsonl's peak_memory_mb on a CPU) of a process started by a larger one: its own peak.
    getrusage's ru_maxrss would report the launcher's, which Linux folds into the child's at exec."""
    if not Path("/proc/self/status").exists():
        pytest.skip("VmHWM is read from /proc (Linux)")
    ballast = torch.ones(2**28)  # 1 GiB, resident in this process while the child runs
    code = "import torch; from minisft.machinery.loop import peak_memory_mb; print(peak_memory_mb(torch.device('cpu')))"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    resident = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
    del ballast
    # The child holds torch and minisft (~400 MB measured); this process holds them, the test suite and the ballast.
    assert 0 < child < resident - 512, (child, resident)
