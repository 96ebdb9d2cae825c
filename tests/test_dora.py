"""DoRA (--use_dora) parity with peft: adapters that load both ways with the same logits, the same gradients, merging,
a 4-bit base, training and resuming.

minisft's DoRA forward does peft's float32 operations in peft's order, f = m / ‖W + s·B A‖ then
W x + (f − 1)·W x + f·(B A x)·s; the one difference is how B A is formed for the norm (peft runs
B(A(I)) and transposes, minisft multiplies B @ A), which is the same sums of the same products, so
the comparisons with peft are exact (torch.equal), measured so here. Merging against not merging
rounds differently and has a bound beside it.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from minisft.machinery.config import LoraConfig
from minisft.machinery.loop import train
from minisft.machinery.models import four_bit_quantization, load_model, tiny_model
from minisft.machinery.peft_files import load_adapter, save_adapter
from minisft.sft.lora import (
    LoraLinear,
    LoraSettings,
    inject_lora,
    lora_layers,
    merge_lora,
    merged_model,
    unmerge_lora,
)

from .tiny_runs import input_ids, logits_of, quiet, relative_diff, run_config

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=True)
# Merged f·(W + s·B A) x against unmerged W x + (f − 1)·W x + f·s·B (A x), in max|a−b|/max|b|: float32 rounding,
# measured 2.7e-7 merged and 2.7e-7 after a merge/unmerge round trip, so 3e-6 leaves a tenfold margin (plain LoRA's
# worst case in tests/test_lora.py, rslora on q k v o, is 3.0e-6). DoRA left out (plain LoRA, same A and B) moves
# the logits by 0.82 of their size, and the base model is 0.52 away: far outside it.
MERGE_RTOL = 3e-6


def peft_config(settings: LoraSettings):
    return peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_dora=settings.use_dora,
        task_type="CAUSAL_LM",
    )


def randomize(model, seed: int = 1) -> None:
    """Nonzero B and a magnitude off the initial norm: otherwise DoRA is the base model and nothing is compared.
    Works on minisft's and peft's models alike (parameter names, sorted)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))


def minisft_dora(tokenizer, settings: LoraSettings = SETTINGS):
    model = tiny_model(tokenizer)
    inject_lora(model, settings)
    randomize(model)
    return model


# ----------------------------------------------------------------------------- adapters both ways


def test_minisft_dora_adapter_loads_in_peft_with_the_same_logits(tokenizer, tmp_path):
    model = minisft_dora(tokenizer)
    save_adapter(model, tmp_path, SETTINGS, None)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    # peft's saved key: no .weight after lora_magnitude_vector; one per adapted layer (14 Linears but the head).
    magnitudes = [key for key in saved if key.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 14

    reference = quiet(peft.PeftModel.from_pretrained, tiny_model(tokenizer), tmp_path)
    ids = input_ids(tokenizer)
    assert torch.equal(logits_of(model, ids), logits_of(reference, ids))


def test_peft_dora_adapter_loads_in_minisft_with_the_same_logits(tokenizer, tmp_path):
    reference = quiet(peft.get_peft_model, tiny_model(tokenizer), peft_config(SETTINGS))
    randomize(reference)
    reference.save_pretrained(tmp_path)

    model = tiny_model(tokenizer)
    settings = load_adapter(model, tmp_path)
    assert settings.use_dora
    ids = input_ids(tokenizer)
    assert torch.equal(logits_of(model, ids), logits_of(reference, ids))


def test_dropout_and_bias_and_gradients_match_peft_in_training():
    """One Linear with a bias, in train mode with dropout: peft then feeds dropout(x) to W as well (without the
    bias), and the norm carries no gradient (the gradients would differ if it did). The same seed draws the same
    dropout mask in both."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    mini = LoraLinear(copy_of(base), r=4, scale=2.0, dropout=0.3, use_dora=True)
    reference = quiet(
        peft.get_peft_model,
        nn.Sequential(copy_of(base)),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"], use_dora=True),
    )
    layer = reference.base_model.model[0]
    with torch.no_grad():
        layer.lora_A.default.weight.copy_(mini.lora_A.weight)
    for module in (mini, layer):
        randomize(module)
    x = torch.randn(3, 5, 16)
    mini.train(), reference.train()
    torch.manual_seed(7)
    ours = mini(x)
    torch.manual_seed(7)
    theirs = reference(x)
    assert torch.equal(ours, theirs)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for name, peft_name in [
        ("lora_A.weight", "lora_A.default.weight"),
        ("lora_B.weight", "lora_B.default.weight"),
        ("lora_magnitude_vector", "lora_magnitude_vector.default.weight"),
    ]:
        gradient, peft_gradient = mini.get_parameter(name).grad, layer.get_parameter(peft_name).grad
        assert gradient.abs().sum() > 0, name
        assert torch.equal(gradient, peft_gradient), name
    # In eval mode dropout(x) is x, and peft takes W x from the base's output less its bias.
    mini.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(mini(x), reference(x))


def copy_of(module: nn.Module) -> nn.Module:
    copy = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    copy.load_state_dict(module.state_dict())
    return copy


def test_gradients_reach_a_b_and_the_magnitude(tokenizer):
    model = tiny_model(tokenizer)
    report = inject_lora(model, SETTINGS)
    layers = lora_layers(model)
    assert all(layer.lora_magnitude_vector.requires_grad for layer in layers.values())
    # 14 layers: A and B as in LoRA, plus one magnitude per output row.
    plain = tiny_model(tokenizer)
    plain_report = inject_lora(plain, LoraSettings(**{**vars(SETTINGS), "use_dora": False}))
    assert report.trainable - plain_report.trainable == sum(layer.base.out_features for layer in layers.values())

    ids = input_ids(tokenizer)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, layer in layers.items():  # B starts at zero, so A's gradient is zero at step 0: B first
        assert layer.lora_B.weight.grad.abs().sum() > 0, name
        assert layer.lora_magnitude_vector.grad.abs().sum() > 0, name
    model.zero_grad()
    randomize(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.lora_A.weight.grad.abs().sum() > 0 for layer in layers.values())


# ----------------------------------------------------------------------------- merging


def test_merge_unmerge_and_merged_model_with_dora(tokenizer, tmp_path):
    model = minisft_dora(tokenizer)
    ids = input_ids(tokenizer)
    adapted = logits_of(model, ids)

    merged = logits_of(merged_model(model), ids)
    assert relative_diff(merged, adapted) <= MERGE_RTOL
    plain = merged_model(model)
    plain.save_pretrained(tmp_path)
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path), ids), merged)

    # peft's merge_and_unload of the same adapter: the same merged weights, bit for bit.
    save_adapter(model, tmp_path / "adapter", SETTINGS, None)
    reference = quiet(peft.PeftModel.from_pretrained, tiny_model(tokenizer), tmp_path / "adapter")
    peft_merged = quiet(reference.merge_and_unload)
    for name in lora_layers(model):
        assert torch.equal(plain.get_submodule(name).weight, peft_merged.get_submodule(name).weight), name

    merge_lora(model)
    assert torch.equal(logits_of(model, ids), merged)
    unmerge_lora(model)
    assert relative_diff(logits_of(model, ids), adapted) <= MERGE_RTOL


def test_without_dora_the_logits_differ_beyond_the_tolerance(tokenizer):
    """The negative control for the tolerances above: the same A and B as plain LoRA."""
    dora = minisft_dora(tokenizer)
    lora = minisft_dora(tokenizer, LoraSettings(**{**vars(SETTINGS), "use_dora": False}))
    ids = input_ids(tokenizer)
    assert relative_diff(logits_of(lora, ids), logits_of(dora, ids)) > 100 * MERGE_RTOL


# ----------------------------------------------------------------------------- a 4-bit base


def test_dora_over_a_4bit_base_matches_peft(tokenizer, tmp_path):
    """peft takes the norm of the dequantized weight; so does minisft."""
    tiny_model(tokenizer).save_pretrained(tmp_path / "base")
    quantization = four_bit_quantization(torch.float32)
    model = quiet(load_model, str(tmp_path / "base"), quantization_config=quantization)
    inject_lora(model, SETTINGS)
    randomize(model)
    save_adapter(model, tmp_path / "adapter", SETTINGS, None)
    base = quiet(load_model, str(tmp_path / "base"), quantization_config=quantization)
    reference = quiet(peft.PeftModel.from_pretrained, base, tmp_path / "adapter")
    ids = input_ids(tokenizer)
    assert torch.equal(logits_of(model, ids), logits_of(reference, ids))


# ----------------------------------------------------------------------------- training


def test_a_dora_run_writes_use_dora_and_resumes_exactly(tiny_dir, tmp_path):
    """Two steps, a checkpoint, two more: the same adapter as four steps at once, magnitudes included."""
    lora = LoraConfig(use_peft=True, use_dora=True, lora_r=4, lora_dropout=0.1)
    flags = dict(max_steps=4, per_device_train_batch_size=4, save_steps=2)
    train(run_config(tiny_dir, tmp_path / "whole", lora=lora, **flags))
    config = json.loads((tmp_path / "whole" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    at_two = load_file(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors")
    magnitudes = [key for key in whole if key.endswith(".lora_magnitude_vector")]
    assert magnitudes and all(not torch.equal(whole[key], at_two[key]) for key in magnitudes)  # they train

    resume = str(tmp_path / "whole" / "checkpoint-2")
    train(run_config(tiny_dir, tmp_path / "parts", lora=lora, resume_from_checkpoint=resume, **flags))
    parts = load_file(tmp_path / "parts" / "adapter_model.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[key], parts[key]) for key in whole)
