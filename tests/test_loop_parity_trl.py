"""Parity of minisft's training loop with TRL 1.16's SFTTrainer: same data, same settings, same weights after.

The setting: the tiny 2-layer Llama of `minisft.machinery.models.tiny_model` in fp32 with dropout 0, eight text examples
of unequal lengths, every optimizer step covering the whole dataset (so the order in which either side draws
the examples cannot matter), 10 steps, 2 warmup steps then a linear decay, peak learning rate 1e-3, gradient
clipping at 1.0, bf16 off. Every TRL setting that differs from minisft's default or changes the numbers is
spelled out in `trl_settings`: TRL defaults to gradient checkpointing and bf16, transformers may pick a fused
AdamW. TRL trains through its fused LM head (chunked log-probabilities; `loss_type="nll"`, its default); the
loss is Σ token losses / trained tokens of the whole step on both sides (transformers' `num_items_in_batch`).

What "equal" means here, and why it is not 1e-5 elementwise (measured, single CPU thread):
- Before any update, both sides compute the same loss and gradients to float32 rounding: the first step's
  loss agrees to ~1e-7 relative and every gradient tensor to ~3e-7 relative (max |a-b| / max |b|), the same
  distance as between TRL's fused head and transformers' plain `ForCausalLMLoss` on the same batch.
- After 10 AdamW steps, those ~1e-7 roundings are amplified for the few weights whose gradient is near zero:
  Adam moves every weight by ~lr · m/√v whatever the gradient's size, so the sign of a rounding error decides
  the step. TRL against *itself*, with its fused head swapped for transformers' plain loss (a
  `compute_loss_func`: the same maths, other roundings), ends 4.5e-5 to 7e-5 apart in max |a-b| / max |b|
  and 2.7e-6 in Frobenius norm; minisft against TRL ends 3e-5 to 1.7e-4 and 2e-6 to 7e-6 (per run, below;
  with torch 2.13, transformers 5.24, TRL 1.16 the worst run, gradient accumulation, is 1.6e-4 and 6.3e-6).
So each tensor is checked on two criteria, both several times the measured noise and both far below what a
real difference makes:
- Frobenius  ‖a - b‖ / ‖b‖                ≤ FROBENIUS_RTOL (4e-5): the whole tensor, where rounding averages
  out. Decaying the norm weights with --weight_decay 0.1 (a wrong no-decay group) moves them by 5e-4 (that is
  Σ lr_t · 0.1 over the 10 steps, measured 4.9e-4), a warmup off by one step or a loss normalised per
  micro-batch by 1e-3 or more. The tolerance sits between: 6× the worst noise and 12× below weight decay, as
  far from both as that 80× window allows.
- elementwise max |a - b| / max |b|       ≤ MAX_ABS_RTOL (2e-3): the worst single weight, 12× the worst noise
  measured. No analytic bound helps here: a weight whose near-zero gradient rounds to the other sign takes
  its Adam step (up to lr = 1e-3) the other way, 2e-3 from its twin, 3e-2 of a max |b| ≈ 0.07. This one still
  sees an embedding row trained on one side only (up to Σ lr = 5e-3 on entries of max |b| ≈ 0.1: 5e-2).
and the weights must have moved: ‖trained - initial‖ / ‖initial‖ ≥ 1e-3 for every trained tensor.
The per-step logs (loss, grad_norm, learning_rate) are compared at LOG_RTOL (1e-5): they are reductions
over the whole model, where the amplified elements do not show (measured at most 1.5e-7 for the loss, 5.4e-7
for the gradient norm, 0 for the learning rate: 18× below).

Runs: full fine-tuning with adamw_torch (weight decay 0 and 0.1), with adamw_8bit, gradient accumulation of
4 micro-batches of unequal lengths, bfd packing (TRL: padding-free rows with its own position_ids), and
LoRA continued from the same saved adapter. Negative controls show that weight decay, decaying the norm weights
too, the 8-bit states and packing without boundaries each move the weights well past the tolerances.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the parity tests compare against TRL: pip install 'minisft[test]'")
pytest.importorskip("peft", reason="the LoRA parity test builds the reference adapter with peft")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import minisft.machinery.loop  # noqa: E402
import minisft.sft.batches  # noqa: E402
import minisft.sft.optim  # noqa: E402
from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig  # noqa: E402
from minisft.machinery.loop import train  # noqa: E402
from minisft.machinery.models import load_tokenizer, tiny_model  # noqa: E402
from minisft.machinery.prepare import prepare_dataset  # noqa: E402
from tests.trl_reference import trl_train  # noqa: E402

FROBENIUS_RTOL = 4e-5
MAX_ABS_RTOL = 2e-3
MOVED_AT_LEAST = 1e-3
LOG_RTOL = 1e-5

# Eight examples of 3 to 11 tokens (EOS included): unequal lengths, so batches carry padding.
TEXTS = [
    "Hi.",
    "The cat sat.",
    "Paris is in France.",
    "Weights move a little.",
    "One two three four five six seven eight.",
    "A short one",
    "Gradients add up over micro-batches.",
    "Packing keeps examples apart with boundaries.",
]
EXAMPLES = [{"text": text} for text in TEXTS]
MAX_LENGTH = 512  # no example is truncated; packing puts all eight in one row

# The settings both sides share, under their common names (minisft uses TRL's / transformers' flag names).
SHARED = dict(
    learning_rate=1e-3,
    max_steps=10,
    warmup_steps=2,
    lr_scheduler_type="linear",
    weight_decay=0.0,
    max_grad_norm=1.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    optim="adamw_torch",
    per_device_train_batch_size=len(EXAMPLES),
    gradient_accumulation_steps=1,
    logging_steps=1,
)
SEED = 42


def trl_settings(**shared) -> dict:
    """SFTConfig for a run: the shared settings, and every TRL default that would change the numbers, undone."""
    return dict(
        **shared,
        seed=SEED,
        max_length=MAX_LENGTH,
        bf16=False,  # TRL's default: True where fp16 is not set
        fp16=False,
        gradient_checkpointing=False,  # TRL's default: True
        loss_type="nll",  # TRL's default, spelled out: plain token-mean NLL through its fused LM head
        completion_only_loss=None,  # text data: every token is trained, as minisft
        assistant_only_loss=False,
        shuffle_dataset=False,
        save_strategy="no",
        eval_strategy="no",
        average_tokens_across_devices=True,  # one process: num_items_in_batch is this process's own count
    )


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    weights: dict[str, torch.Tensor]  # trained tensors by name (the full model, or the adapter in peft's keys)
    logs: list[dict]  # per optimizer step: loss, grad_norm, learning_rate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module's runs: on 2 cores shared with other work, two threads spin against
    each other (measured: TRL's 10 steps took 15 s with two threads, 2 s with one). Both sides run alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_bitsandbytes_overrides():
    """bitsandbytes keeps per-parameter optimizer overrides in a process-wide singleton, keyed by (group, index)
    as well as by id(): transformers' Trainer registers one for the embedding (see the 8-bit tests), which would
    then apply to the *next* 8-bit optimizer built in this process, minisft's included. Start and end clean."""
    try:
        from bitsandbytes.optim import GlobalOptimManager
    except ImportError:
        yield
        return
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


class Workspace:
    """The base model and data on disk, and each run's result, computed once per module (runs are shared)."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = load_tokenizer("smollm2-135m-instruct")
        self.model_dir = root / "model"
        base = tiny_model(self.tokenizer)
        base.save_pretrained(self.model_dir)
        self.tokenizer.save_pretrained(self.model_dir)
        self.data = root / "data.jsonl"
        self.data.write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES), encoding="utf-8")
        self.initial = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}
        self.runs: dict[tuple, Run] = {}
        self.trl_datasets: dict[tuple, object] = {}

    def base_model(self):
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, attn_implementation="sdpa")

    def minisft(self, packing: bool = False, lora_adapter: Path | None = None, label: str = "", **overrides) -> Run:
        """minisft's run; `label` tells apart runs whose code a test has patched."""
        key = ("minisft", packing, lora_adapter, label, tuple(sorted(overrides.items())))
        if key not in self.runs:
            output_dir = self.root / f"minisft-{len(self.runs)}"
            config = RunConfig(
                model=ModelConfig(
                    model_name_or_path=str(self.model_dir), torch_dtype="float32", attn_implementation="sdpa"
                ),
                data=DataConfig(dataset_name=str(self.data), max_length=MAX_LENGTH),
                packing=PackingConfig(packing=packing, packing_strategy="bfd"),
                lora=LoraConfig(
                    use_peft=lora_adapter is not None, lora_adapter=str(lora_adapter) if lora_adapter else None
                ),
                training=TrainingConfig(
                    output_dir=str(output_dir),
                    seed=SEED,
                    bf16=False,
                    gradient_checkpointing=False,
                    save_steps=0,
                    **{**SHARED, **overrides},
                ),
            )
            result = train(config)
            assert result.steps == SHARED["max_steps"]
            if lora_adapter is None:
                model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
                weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
            else:
                weights = load_file(output_dir / "adapter_model.safetensors")
            logs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
            self.runs[key] = Run(weights, [log for log in logs if "loss" in log])
        return self.runs[key]

    def trl(self, packing: bool = False, lora_adapter: Path | None = None, **overrides) -> Run:
        key = ("trl", packing, lora_adapter, tuple(sorted(overrides.items())))
        if key not in self.runs:
            model = self.base_model()
            if lora_adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, lora_adapter, is_trainable=True)
            settings = trl_settings(**{**SHARED, **overrides})
            if packing:
                settings.update(packing=True, packing_strategy="bfd")
            trainer = trl_train(model, EXAMPLES, self.tokenizer, self.root / f"trl-{len(self.runs)}", **settings)
            assert trainer.state.global_step == SHARED["max_steps"]
            if lora_adapter is None:
                weights = {name: tensor.detach() for name, tensor in trainer.model.state_dict().items()}
            else:
                from peft import get_peft_model_state_dict

                weights = {name: tensor.detach() for name, tensor in get_peft_model_state_dict(trainer.model).items()}
            logs = [log for log in trainer.state.log_history if "loss" in log]
            self.runs[key] = Run(weights, logs)
            self.trl_datasets[key] = trainer.train_dataset
        return self.runs[key]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("loop-parity"))


# ----------------------------------------------------------------------------- comparisons


def differences(ours: dict, theirs: dict) -> dict[str, tuple[float, float]]:
    """Per tensor: (‖a - b‖ / ‖b‖, max |a - b| / max |b|)."""
    assert ours.keys() == theirs.keys(), f"different tensors: {sorted(ours.keys() ^ theirs.keys())[:6]}"
    result = {}
    for name, expected in theirs.items():
        actual, expected = ours[name].float(), expected.float()
        difference = actual - expected
        result[name] = (
            float(difference.norm() / expected.norm()),
            float(difference.abs().max() / expected.abs().max()),
        )
    return result


def assert_weights_close(
    ours: dict, theirs: dict, what: str, frobenius_rtol: float = FROBENIUS_RTOL, max_abs_rtol: float = MAX_ABS_RTOL
) -> dict[str, tuple[float, float]]:
    found = differences(ours, theirs)
    worst_frobenius = max(found.items(), key=lambda item: item[1][0])
    worst_max = max(found.items(), key=lambda item: item[1][1])
    print(
        f"{what}: worst ‖a-b‖/‖b‖ {worst_frobenius[1][0]:.2e} ({worst_frobenius[0]}), "
        f"worst max|a-b|/max|b| {worst_max[1][1]:.2e} ({worst_max[0]})"
    )
    failing = {name: found[name] for name in found if found[name][0] > frobenius_rtol or found[name][1] > max_abs_rtol}
    assert not failing, (
        f"{what}: weights differ beyond ‖a-b‖/‖b‖ ≤ {frobenius_rtol:g} and max|a-b|/max|b| ≤ {max_abs_rtol:g}:\n"
        + "\n".join(f"  {name}: {frobenius:.2e}, {largest:.2e}" for name, (frobenius, largest) in failing.items())
    )
    return found


def assert_moved(trained: dict, initial: dict, what: str) -> None:
    """Every trained tensor moved well beyond the tolerances: the comparison is not of two untrained models."""
    for name, tensor in trained.items():
        moved = float((tensor - initial[name]).norm() / initial[name].norm())
        assert moved >= MOVED_AT_LEAST, f"{what}: {name} moved only {moved:.1e} relative; the test would prove nothing"


def assert_logs_close(ours: list[dict], theirs: list[dict], what: str) -> None:
    """The per-step loss, gradient norm (before clipping) and learning rate of the 10 steps."""
    assert [log["step"] for log in ours] == list(range(1, SHARED["max_steps"] + 1)), f"{what}: minisft's logged steps"
    assert len(theirs) == SHARED["max_steps"], f"{what}: TRL logged {len(theirs)} steps"
    for key in ("loss", "grad_norm", "learning_rate"):
        mine, reference = [log[key] for log in ours], [log[key] for log in theirs]
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine, reference))
        print(f"{what}: {key} worst relative difference {worst:.1e}")
        assert all(math.isclose(a, b, rel_tol=LOG_RTOL, abs_tol=1e-12) for a, b in zip(mine, reference)), (
            f"{what}: per-step {key} differ beyond {LOG_RTOL:g} relative:\n  minisft {mine}\n  TRL     {reference}"
        )


def not_decayed(name: str) -> bool:
    return "norm" in name


# ----------------------------------------------------------------------------- the data both sides train on


def test_both_sides_train_on_the_same_tokens(workspace):
    """minisft's prepared examples are TRL's train_dataset rows, token for token, labels included (every token)."""
    ours = prepare_dataset(
        [{**example, "origin": f"parity:{index}"} for index, example in enumerate(EXAMPLES)],
        workspace.tokenizer,
        DataConfig(max_length=MAX_LENGTH),
    ).examples
    workspace.trl()  # the full fine-tuning run, shared with the tests below
    theirs = workspace.trl_datasets[("trl", False, None, ())]
    assert [example["input_ids"] for example in ours] == [list(ids) for ids in theirs["input_ids"]]
    assert [example["labels"] for example in ours] == [list(labels) for labels in theirs["labels"]]
    assert all(example["labels"] == example["input_ids"] for example in ours), "text data: every token is trained"
    lengths = [len(example["input_ids"]) for example in ours]
    assert len(set(lengths)) >= 6, f"the examples should have unequal lengths: {lengths}"


# ----------------------------------------------------------------------------- 1. full fine-tuning, AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_full_finetuning_adamw_torch(workspace, weight_decay):
    """Full fine-tuning: minisft's final model equals TRL's trained model, and the per-step logs agree.

    With weight decay 0.1 this also checks the no-decay groups (norm weights, biases: transformers'
    get_decay_parameter_names): decaying the norm weights would move them by ~5e-4, 12× FROBENIUS_RTOL.
    """
    ours, theirs = workspace.minisft(weight_decay=weight_decay), workspace.trl(weight_decay=weight_decay)
    assert_moved(theirs.weights, workspace.initial, "TRL")
    assert_weights_close(ours.weights, theirs.weights, f"adamw_torch, weight decay {weight_decay}")
    assert_logs_close(ours.logs, theirs.logs, f"adamw_torch, weight decay {weight_decay}")


def test_weight_decay_is_visible_at_these_tolerances(workspace, monkeypatch):
    """The negative controls: weight decay 0.1 against 0.0 fails the comparison on every decayed matrix, so the
    tolerances see a missing or wrong decay; a run that decays the norm weights too (no no-decay group) fails it
    on every norm weight, so they see a wrong no-decay group; and minisft's own run leaves the norms undecayed."""
    with_decay, reference = workspace.minisft(weight_decay=0.1), workspace.trl(weight_decay=0.1)
    found = differences(with_decay.weights, workspace.trl(weight_decay=0.0).weights)
    decayed = {name: value for name, value in found.items() if not not_decayed(name)}
    assert decayed and min(frobenius for frobenius, _ in decayed.values()) > 10 * FROBENIUS_RTOL, decayed

    def one_group(model, weight_decay):  # every trainable parameter decayed, the norm weights included
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    monkeypatch.setattr(minisft.sft.optim, "parameter_groups", one_group)
    wrong = differences(workspace.minisft(weight_decay=0.1, label="norm weights decayed").weights, reference.weights)
    right = differences(with_decay.weights, reference.weights)
    norms = [name for name in found if not_decayed(name)]
    assert len(norms) == 5, norms  # input_layernorm and post_attention_layernorm of 2 layers, the final norm
    # Measured: decayed, each norm weight ends 5.0e-4 from TRL's (12× FROBENIUS_RTOL; Σ lr_t · 0.1 over the 10
    # steps, the norm weights being ~1); minisft's ends at most 2.4e-8 from it.
    for name in norms:
        assert wrong[name][0] > 10 * FROBENIUS_RTOL, (name, wrong[name])
        assert right[name][0] <= FROBENIUS_RTOL, (name, right[name])


# ----------------------------------------------------------------------------- 2. full fine-tuning, AdamW 8-bit


# 8-bit states round m and v to one of 256 codes per block. A ~1e-7 rounding difference in a gradient can move a
# state across a code boundary, a jump of up to 1/256 of its block's scale, which shows in that weight's update
# from then on. Measured: minisft against TRL ends 6.6e-5 apart in the worst ‖a-b‖/‖b‖ (2.4e-6 median) and 1.3e-3
# in max|a-b|/max|b|; the same run with 32-bit states is 3.7e-3 / 1.6e-2 away, and keeping the embedding's state in
# 8 bits (transformers keeps it in 32) is 1e-2 away on the embedding (re-measured with torch 2.13, transformers
# 5.24, bitsandbytes 0.50: 6.65e-5 and 1.27e-3; 3.7e-3; 1.05e-2). So the 8-bit tolerances are these, with
# Frobenius the deciding one: 4.5× the measured noise and 12× below the 32-bit states (the 55× window between
# them allows no more on both sides); max|a-b|/max|b| at 8× its measured noise (1.6× below the 32-bit states').
FROBENIUS_RTOL_8BIT = 3e-4
MAX_ABS_RTOL_8BIT = 1e-2


def test_full_finetuning_adamw_8bit(workspace):
    """adamw_8bit on both sides: bitsandbytes' 8-bit AdamW (TRL: AdamW with optim_bits=8; minisft: AdamW8bit, the
    same class and kernels), with the embedding's state in 32 bits on both sides (transformers' Trainer and
    minisft.sft.optim register it with bitsandbytes' manager)."""
    ours, theirs = workspace.minisft(optim="adamw_8bit"), workspace.trl(optim="adamw_8bit")
    assert_moved(theirs.weights, workspace.initial, "TRL")
    assert_weights_close(ours.weights, theirs.weights, "adamw_8bit", FROBENIUS_RTOL_8BIT, MAX_ABS_RTOL_8BIT)
    assert_logs_close(ours.logs, theirs.logs, "adamw_8bit")


def test_8bit_states_are_visible_at_these_tolerances(workspace, monkeypatch):
    """The negative controls: the 8-bit run is far from the 32-bit one, and so is an 8-bit run that keeps the
    embedding's state in 8 bits, so the comparison above sees both the optimizer and its embedding exception."""
    eight_bit = workspace.minisft(optim="adamw_8bit")
    found = differences(eight_bit.weights, workspace.trl().weights)
    assert max(frobenius for frobenius, _ in found.values()) > 10 * FROBENIUS_RTOL_8BIT, found

    from bitsandbytes.optim import GlobalOptimManager

    def no_exception(model):  # forget earlier overrides, register none
        GlobalOptimManager.get_instance().initialize()

    monkeypatch.setattr(minisft.sft.optim, "keep_embedding_state_in_32_bits", no_exception)
    all_8_bit = workspace.minisft(optim="adamw_8bit", label="embedding state in 8 bits")
    found = differences(all_8_bit.weights, workspace.trl(optim="adamw_8bit").weights)
    assert found["model.embed_tokens.weight"][0] > 10 * FROBENIUS_RTOL_8BIT, found["model.embed_tokens.weight"]


# ----------------------------------------------------------------------------- 3. gradient accumulation


def test_gradient_accumulation_of_unequal_micro_batches(workspace):
    """4 micro-batches of 2 examples (3 to 11 tokens: each micro-batch has another number of trained tokens) per
    step on both sides; the step's loss is normalised by the trained tokens of all four."""
    split = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4)
    ours, theirs = workspace.minisft(**split), workspace.trl(**split)
    assert_moved(theirs.weights, workspace.initial, "TRL")
    assert_weights_close(ours.weights, theirs.weights, "gradient accumulation 4")
    assert_logs_close(ours.logs, theirs.logs, "gradient accumulation 4")
    # And it is the same step as the whole batch at once, on minisft's side.
    assert_weights_close(ours.weights, workspace.minisft().weights, "minisft: accumulation 4 against batch 8")


# ----------------------------------------------------------------------------- 4. packing


def test_packing_bfd_agrees_with_unpacked_and_with_trl(workspace):
    """All eight examples in one bfd row: minisft packed (block-diagonal mask, restarted positions), minisft
    unpacked (padded batch) and TRL packed (bfd, padding-free) end at the same weights. Were the examples to see
    each other inside the row, the packed run would differ from the unpacked one."""
    packed, unpacked, theirs = workspace.minisft(packing=True), workspace.minisft(), workspace.trl(packing=True)
    trl_rows = workspace.trl_datasets[("trl", True, None, ())]
    assert len(trl_rows) == 1, "TRL should pack all eight examples into one row"
    assert_moved(theirs.weights, workspace.initial, "TRL")
    assert_weights_close(packed.weights, theirs.weights, "packed: minisft against TRL")
    assert_weights_close(packed.weights, unpacked.weights, "minisft: packed against unpacked")
    assert_logs_close(packed.logs, theirs.logs, "packed")


def test_packing_without_boundaries_is_visible_at_these_tolerances(workspace, monkeypatch):
    """The negative control: the same packed row under a plain causal mask (positions still restart, but the
    examples see each other) ends far from the unpacked run."""
    from minisft.sft.attention import block_causal_mask

    def plain_causal(batch, model):
        one_document = torch.zeros_like(batch["document_ids"])
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": block_causal_mask(one_document),
        }
        return inputs, batch["labels"]

    monkeypatch.setattr(minisft.sft.batches, "packed_inputs", plain_causal)
    leaky = workspace.minisft(packing=True, label="no boundaries")
    found = differences(leaky.weights, workspace.minisft().weights)
    assert max(frobenius for frobenius, _ in found.values()) > 10 * FROBENIUS_RTOL


# ----------------------------------------------------------------------------- 5. LoRA


@pytest.fixture(scope="module")
def saved_adapter(workspace):
    """A peft adapter on q/k/v/o with non-zero B (a trained adapter, not a fresh one), dropout 0, saved once."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(
        workspace.base_model(),
        PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    path = workspace.root / "adapter"
    model.save_pretrained(path)
    return path


def test_lora_from_the_same_adapter(workspace, saved_adapter):
    """LoRA training continued from one saved adapter: minisft's adapter after 10 steps equals peft's under TRL."""
    initial = load_file(saved_adapter / "adapter_model.safetensors")
    ours, theirs = workspace.minisft(lora_adapter=saved_adapter), workspace.trl(lora_adapter=saved_adapter)
    assert_moved(theirs.weights, initial, "TRL")
    assert_weights_close(ours.weights, theirs.weights, "LoRA")
    assert_logs_close(ours.logs, theirs.logs, "LoRA")
