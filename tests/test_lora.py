"""LoRA parity with peft on the tiny Llama (fp32 unless stated): the same trainable parameters,
the same logits for the same A and B, adapters that load both ways, merging, gradients, a bf16
base under fp32 LoRA weights, and clear errors.

peft is the reference: every parity test builds the same tiny model twice (same seed, same base
weights), wraps one with `peft.get_peft_model` and the other with minisft's `inject_lora`, and
compares numbers computed by both. minisft's LoRA forward, merge and adapter files do what peft's do,
the same float32 operations in the same order on the same values, so those comparisons are exact
(torch.equal). Only merging against not merging, (W + s·B A) x against W x + s·B (A x), rounds
differently; those comparisons have bounds, measured or derived, beside them.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from minisft.machinery.models import tiny_model
from minisft.machinery.peft_files import load_adapter, save_adapter
from minisft.sft.lora import LoraError, LoraLinear, LoraSettings, inject_lora, merge_lora, merged_model, unmerge_lora

from .tiny_runs import input_ids, logits_of, max_diff, quiet, relative_diff

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

PEFT_PREFIX = "base_model.model."


# One row per targeting rule: (id, LoraSettings keyword arguments). r and alpha differ from
# each other so that a scale of alpha/r versus alpha/sqrt(r) shows in the numbers.
CONFIGS = [
    ("q_v", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    ("default_targets", dict(r=4, alpha=8, target_modules=None)),
    ("all_linear", dict(r=4, alpha=8, target_modules="all-linear")),
    ("regex_q_k", dict(r=4, alpha=8, target_modules=r".*\.(q|k)_proj")),
    (
        "full_names",
        dict(r=2, alpha=3, target_modules=["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]),
    ),
    ("save_lm_head", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("save_embed", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])),
    ("rslora", dict(r=16, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True)),
]
CONFIG_IDS = [name for name, _ in CONFIGS]
CONFIG_KWARGS = [kwargs for _, kwargs in CONFIGS]


def settings_of(kwargs) -> LoraSettings:
    return LoraSettings(
        r=kwargs["r"],
        alpha=kwargs["alpha"],
        dropout=kwargs.get("dropout", 0.0),
        target_modules=kwargs["target_modules"],
        modules_to_save=list(kwargs.get("modules_to_save", [])),
        use_rslora=kwargs.get("use_rslora", False),
    )


def peft_config_of(kwargs):
    return peft.LoraConfig(
        r=kwargs["r"],
        lora_alpha=kwargs["alpha"],
        lora_dropout=kwargs.get("dropout", 0.0),
        target_modules=kwargs["target_modules"],
        modules_to_save=kwargs.get("modules_to_save") or None,
        use_rslora=kwargs.get("use_rslora", False),
        task_type="CAUSAL_LM",
    )


def peft_model(tokenizer, kwargs, **model_kwargs):
    return quiet(peft.get_peft_model, tiny_model(tokenizer, **model_kwargs), peft_config_of(kwargs))


def minisft_model(tokenizer, kwargs, **model_kwargs):
    model = tiny_model(tokenizer, **model_kwargs)
    report = inject_lora(model, settings_of(kwargs))
    return model, report


def minisft_name(peft_name: str) -> str:
    """peft's in-memory parameter name -> minisft's (the base model's own name + .lora_A/.lora_B)."""
    assert peft_name.startswith(PEFT_PREFIX), peft_name
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def trainable(model) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def peft_trainable(model) -> dict[str, nn.Parameter]:
    """peft's trainable parameters under minisft's names."""
    return {minisft_name(name): parameter for name, parameter in trainable(model).items()}


def randomize_and_copy(peft_wrapped, mini, seed=0):
    """Random non-zero values into peft's trainable tensors (B too: it is zero at init), copied into minisft's."""
    generator = torch.Generator().manual_seed(seed)
    source = peft_trainable(peft_wrapped)
    target = trainable(mini)
    assert source.keys() == target.keys()
    with torch.no_grad():
        for name, parameter in source.items():
            if ".lora_" in name:
                values = torch.randn(parameter.shape, generator=generator) * 0.2
            else:  # a modules_to_save copy: move it away from the base weights it was copied from
                values = parameter + torch.randn(parameter.shape, generator=generator) * 0.05
            parameter.copy_(values)
            target[name].copy_(values)


# Merged (W + s·B A) x against unmerged W x + s·B (A x) logits, and logits after a merge/unmerge round trip, in
# max|a-b|/max|b|: float32 rounding, worst measured 3.0e-6 merged and 1.2e-6 round trip (rslora: r = 16 on q k v o,
# where |W + ΔW| is ~15× |W|; 4.5e-7 and 3.8e-7 for q_v), so 10× and 25× below this. The adapters merged here
# move the logits by 0.9 to 1.6 of their largest value (measured), 3e4× this bound.
MERGE_RTOL = 3e-5


# ----------------------------------------------------------------------------- which parameters train


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS, ids=CONFIG_IDS)
def test_trainable_parameters_match_peft_one_to_one(tokenizer, kwargs):
    mini, report = minisft_model(tokenizer, kwargs)
    wrapped = peft_model(tokenizer, kwargs)

    mini_names = trainable(mini)
    peft_names = trainable(wrapped)
    mapped = {minisft_name(name): name for name in peft_names}
    assert len(mapped) == len(peft_names), "the name map must be one-to-one"
    assert set(mini_names) == set(mapped)
    for name, parameter in mini_names.items():
        assert parameter.shape == peft_names[mapped[name]].shape, name

    peft_trainable_count, peft_total = wrapped.get_nb_trainable_parameters()
    assert report.trainable == peft_trainable_count == sum(p.numel() for p in mini_names.values())
    assert report.total == peft_total
    targeted = {name.removeprefix(PEFT_PREFIX) for name in wrapped.base_model.targeted_module_names}
    assert set(report.targeted) == targeted
    assert all(isinstance(mini.get_submodule(name), LoraLinear) for name in report.targeted)


def test_all_linear_leaves_the_output_head_alone(tokenizer):
    mini, report = minisft_model(tokenizer, dict(r=4, alpha=8, target_modules="all-linear"))
    assert len(report.targeted) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert "lm_head" not in report.targeted
    assert type(mini.lm_head) is nn.Linear


def test_lora_layer_structure_and_init_like_peft(tokenizer):
    kwargs = dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    mini, _ = minisft_model(tokenizer, kwargs)
    layer = mini.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    assert type(layer.base) is nn.Linear and not layer.base.weight.requires_grad
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_A.bias is None
    assert layer.lora_B.weight.shape == (64, 8) and layer.lora_B.bias is None
    assert layer.scaling == 2.0  # alpha / r = 16 / 8, exact in floating point
    # peft's default init: A Kaiming-uniform with a=sqrt(5), bound 1/sqrt(in_features); B zero.
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    assert layer.lora_A.weight.abs().max() <= 1 / 64**0.5
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    peft_layer = peft_model(tokenizer, kwargs).base_model.model.model.layers[0].self_attn.q_proj
    assert peft_layer.scaling["default"] == layer.scaling

    rs, _ = minisft_model(tokenizer, dict(r=16, alpha=8, target_modules=["q_proj"], use_rslora=True))
    peft_rs = peft_model(tokenizer, dict(r=16, alpha=8, target_modules=["q_proj"], use_rslora=True))
    assert rs.model.layers[0].self_attn.q_proj.scaling == 8 / 16**0.5 == 2.0  # alpha / sqrt(r), exact
    assert peft_rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS, ids=CONFIG_IDS)
def test_logits_equal_peft_for_the_same_a_and_b(tokenizer, kwargs):
    mini, _ = minisft_model(tokenizer, kwargs)
    wrapped = peft_model(tokenizer, kwargs)
    ids = input_ids(tokenizer)
    base = logits_of(tiny_model(tokenizer), ids)
    randomize_and_copy(wrapped, mini)

    expected = logits_of(wrapped, ids)
    actual = logits_of(mini, ids)
    assert torch.equal(actual, expected)  # peft's LoRA forward, the same operations in the same order
    # The comparison means something only if the adapter moved the logits (measured: by 0.54 to 2.2).
    assert max_diff(actual, base) > 1e-2


def test_dropout_is_off_in_eval_and_on_in_train(tokenizer):
    kwargs = dict(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"])
    mini, _ = minisft_model(tokenizer, kwargs)
    wrapped = peft_model(tokenizer, kwargs)
    randomize_and_copy(wrapped, mini)
    ids = input_ids(tokenizer)
    assert torch.equal(logits_of(mini, ids), logits_of(wrapped, ids))
    mini.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert max_diff(mini(input_ids=ids).logits, logits_of(wrapped, ids)) > 1e-3


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS, ids=CONFIG_IDS)
def test_at_init_the_adapted_model_is_the_base_model(tokenizer, kwargs):
    ids = input_ids(tokenizer)
    base = logits_of(tiny_model(tokenizer), ids)
    mini, _ = minisft_model(tokenizer, kwargs)
    assert torch.equal(logits_of(mini, ids), base)
    assert torch.equal(logits_of(peft_model(tokenizer, kwargs), ids), base)


# ----------------------------------------------------------------------------- adapter files


def peft_saved(wrapped, directory):
    quiet(wrapped.save_pretrained, directory)
    return load_file(directory / "adapter_model.safetensors"), json.loads(
        (directory / "adapter_config.json").read_text()
    )


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS, ids=CONFIG_IDS)
def test_minisft_adapter_files_are_peft_files(tokenizer, kwargs, tmp_path):
    settings = settings_of(kwargs)
    mini, _ = minisft_model(tokenizer, kwargs)
    wrapped = peft_model(tokenizer, kwargs)
    randomize_and_copy(wrapped, mini)
    save_adapter(mini, tmp_path / "minisft", settings, base_model_name_or_path="some/base")
    peft_tensors, peft_config = peft_saved(wrapped, tmp_path / "peft")

    config = json.loads((tmp_path / "minisft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == kwargs["r"]
    assert config["lora_alpha"] == kwargs["alpha"]
    assert config["use_rslora"] == kwargs.get("use_rslora", False)
    assert config["base_model_name_or_path"] == "some/base"
    assert (config.get("modules_to_save") or None) == (peft_config["modules_to_save"] or None)
    # peft writes names as a list (all-linear expanded to full names) and a regex as a string; minisft may
    # write "all-linear" itself. Whatever it writes must select, by peft's own rules, the modules it targeted.
    if isinstance(peft_config["target_modules"], str):
        assert config["target_modules"] == peft_config["target_modules"]
    reread = dict(kwargs, target_modules=config["target_modules"])
    targeted_by_peft = peft_model(tokenizer, reread).base_model.targeted_module_names
    assert {name.removeprefix(PEFT_PREFIX) for name in targeted_by_peft} == set(mini_targets(mini))

    tensors = load_file(tmp_path / "minisft" / "adapter_model.safetensors")
    assert set(tensors) == set(peft_tensors)
    for key, tensor in tensors.items():
        assert tensor.shape == peft_tensors[key].shape, key
        assert tensor.dtype == peft_tensors[key].dtype == torch.float32, key
        assert torch.equal(tensor, peft_tensors[key]), key  # the same values were copied in
        if ".lora_A." in key:
            assert tensor.shape[0] == kwargs["r"]
        elif ".lora_B." in key:
            assert tensor.shape[1] == kwargs["r"]
    layer = mini.model.layers[1].self_attn.q_proj if "model.layers.1.self_attn.q_proj" in mini_targets(mini) else None
    if layer is not None:
        prefix = PEFT_PREFIX + "model.layers.1.self_attn.q_proj"
        assert tensors[prefix + ".lora_A.weight"].shape == (kwargs["r"], layer.base.in_features)
        assert tensors[prefix + ".lora_B.weight"].shape == (layer.base.out_features, kwargs["r"])


def mini_targets(model):
    return [name for name, module in model.named_modules() if isinstance(module, LoraLinear)]


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS, ids=CONFIG_IDS)
def test_minisft_adapter_loads_in_peft(tokenizer, kwargs, tmp_path):
    mini, _ = minisft_model(tokenizer, kwargs)
    reference = peft_model(tokenizer, kwargs)
    randomize_and_copy(reference, mini)  # only to get non-zero B and a moved modules_to_save copy
    save_adapter(mini, tmp_path, settings_of(kwargs), base_model_name_or_path="some/base")

    loaded = quiet(peft.PeftModel.from_pretrained, tiny_model(tokenizer), tmp_path)
    targeted = {name.removeprefix(PEFT_PREFIX) for name in loaded.base_model.targeted_module_names}
    assert targeted == set(mini_targets(mini))  # no extra LoRA layers (they would load as B = 0, unnoticed)
    ids = input_ids(tokenizer)
    assert torch.equal(logits_of(loaded, ids), logits_of(mini, ids))
    assert max_diff(logits_of(loaded, ids), logits_of(tiny_model(tokenizer), ids)) > 1e-2


@pytest.mark.parametrize("kwargs", CONFIG_KWARGS, ids=CONFIG_IDS)
def test_peft_adapter_loads_in_minisft(tokenizer, kwargs, tmp_path):
    wrapped = peft_model(tokenizer, kwargs)
    mini_for_values, _ = minisft_model(tokenizer, kwargs)
    randomize_and_copy(wrapped, mini_for_values)
    quiet(wrapped.save_pretrained, tmp_path)

    fresh = tiny_model(tokenizer)
    settings = load_adapter(fresh, tmp_path)
    assert settings.r == kwargs["r"] and settings.alpha == kwargs["alpha"]
    assert settings.use_rslora == kwargs.get("use_rslora", False)
    assert list(settings.modules_to_save or []) == list(kwargs.get("modules_to_save", []))
    assert set(mini_targets(fresh)) == {
        name.removeprefix(PEFT_PREFIX) for name in wrapped.base_model.targeted_module_names
    }
    ids = input_ids(tokenizer)
    assert torch.equal(logits_of(fresh, ids), logits_of(wrapped, ids))
    # The loaded model trains the same parameters as peft's.
    assert set(trainable(fresh)) == set(peft_trainable(wrapped))


ROUND_TRIPS = [
    (
        "all_linear_lm_head_rslora",
        dict(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"], use_rslora=True),
    ),
    ("regex_q_k", CONFIGS[3][1]),
    ("full_names", CONFIGS[4][1]),
]


@pytest.mark.parametrize("kwargs", [k for _, k in ROUND_TRIPS], ids=[n for n, _ in ROUND_TRIPS])
def test_adapter_round_trip_in_minisft(tokenizer, tmp_path, kwargs):
    settings = settings_of(kwargs)
    mini, _ = minisft_model(tokenizer, kwargs)
    randomize_and_copy(peft_model(tokenizer, kwargs), mini)
    save_adapter(mini, tmp_path, settings, base_model_name_or_path="some/base")
    fresh = tiny_model(tokenizer)
    loaded = load_adapter(fresh, tmp_path)
    assert (loaded.r, loaded.alpha, loaded.use_rslora) == (settings.r, settings.alpha, settings.use_rslora)
    assert list(loaded.modules_to_save) == settings.modules_to_save
    assert mini_targets(fresh) == mini_targets(mini)
    ids = input_ids(tokenizer)
    assert max_diff(logits_of(fresh, ids), logits_of(mini, ids)) == 0.0


# ----------------------------------------------------------------------------- merging


MERGE_CONFIGS = [CONFIGS[0], CONFIGS[2], CONFIGS[5], CONFIGS[7]]


@pytest.mark.parametrize("kwargs", [k for _, k in MERGE_CONFIGS], ids=[n for n, _ in MERGE_CONFIGS])
def test_merge_unmerge_and_merged_model(tokenizer, kwargs, tmp_path):
    mini, _ = minisft_model(tokenizer, kwargs)
    wrapped = peft_model(tokenizer, kwargs)
    randomize_and_copy(wrapped, mini)
    ids = input_ids(tokenizer)
    adapted = logits_of(mini, ids)
    targets = mini_targets(mini)
    original = {name: mini.get_submodule(name).base.weight.detach().clone() for name in targets}

    merge_lora(mini)
    assert relative_diff(logits_of(mini, ids), adapted) <= MERGE_RTOL
    merged_weights = {name: mini.get_submodule(name).base.weight.detach().clone() for name in targets}
    assert any(max_diff(merged_weights[name], original[name]) > 1e-3 for name in targets)
    unmerge_lora(mini)
    for name in targets:
        # W + ΔW, then − ΔW (ΔW recomputed bit for bit): two float32 roundings, each at most 2^-24 of its result,
        # so |W' − W| ≤ 2^-24 (|W + ΔW| + |W'|) element by element (measured: up to 0.99 of that bound). An
        # unmerge that left ΔW in would be off by |ΔW|: 0.87 to 1.8 at the largest here.
        # The bound is taken in float64 with a (1 + 2^-24) factor: |W + ΔW| is at most (1 + 2^-24) |fl(W + ΔW)|.
        restored = mini.get_submodule(name).base.weight.double()
        bound = 2**-24 * (1 + 2**-24) * (merged_weights[name].double().abs() + restored.abs())
        assert ((restored - original[name].double()).abs() <= bound).all(), name
    assert relative_diff(logits_of(mini, ids), adapted) <= MERGE_RTOL

    # peft's merge_and_unload for the same A and B gives the same weights: W + (B A) · scale, as minisft computes it.
    peft_merged = quiet(wrapped.merge_and_unload)
    for name in targets:
        assert torch.equal(merged_weights[name], peft_merged.get_submodule(name).weight), name

    before = logits_of(mini, ids)  # after the round trip: not bit for bit `adapted`
    plain = merged_model(mini)
    assert type(plain) is type(tiny_model(tokenizer))
    assert not any(isinstance(module, LoraLinear) for module in plain.modules())
    assert not any("lora" in name.lower() for name, _ in plain.named_parameters())
    assert all(type(plain.get_submodule(name)) is nn.Linear for name in targets)
    merged = logits_of(plain, ids)
    assert relative_diff(merged, adapted) <= MERGE_RTOL
    assert torch.equal(merged, logits_of(peft_merged, ids))
    # merged_model leaves the adapted model as it was: unmerged, and computing exactly what it computed before.
    assert not getattr(mini.get_submodule(targets[0]), "merged", False)
    assert torch.equal(logits_of(mini, ids), before)
    assert set(plain.state_dict()) == set(peft_merged.state_dict())

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits_of(reloaded, ids), merged)  # float32 weights saved and read back as they were


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "kwargs", [CONFIGS[0][1], CONFIGS[5][1], CONFIGS[6][1]], ids=["q_v", "save_lm_head", "save_embed"]
)
def test_only_lora_and_modules_to_save_get_gradients(tokenizer, kwargs):
    mini, _ = minisft_model(tokenizer, kwargs)
    wrapped = peft_model(tokenizer, kwargs)  # at init: B = 0 in both, the same A copied over
    with torch.no_grad():
        for name, parameter in peft_trainable(wrapped).items():
            trainable(mini)[name].copy_(parameter)
    ids = input_ids(tokenizer)
    for model in (mini, wrapped):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()

    mini_trainable = trainable(mini)
    expected = set(peft_trainable(wrapped))
    assert set(mini_trainable) == expected
    for name, parameter in mini.named_parameters():
        if name in expected:
            assert parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    peft_grads = {name: parameter.grad for name, parameter in peft_trainable(wrapped).items()}
    for name, parameter in mini_trainable.items():
        if ".lora_B." in name:
            assert parameter.grad.abs().max() > 0, name
        if ".lora_A." in name:  # B = 0 at init: nothing flows back to A yet, in peft as here
            assert torch.count_nonzero(parameter.grad) == 0, name
        assert torch.equal(parameter.grad, peft_grads[name]), name  # the same forward, so the same backward
    # A frozen base under LoRA really is frozen.
    assert mini.model.layers[0].self_attn.q_proj.base.weight.grad is None


# ----------------------------------------------------------------------------- bf16 base, fp32 LoRA


def test_bf16_base_with_fp32_lora_weights(tokenizer):
    kwargs = dict(r=8, alpha=16, target_modules="all-linear")
    reference, _ = minisft_model(tokenizer, kwargs)  # all fp32
    mini = tiny_model(tokenizer).to(torch.bfloat16)
    inject_lora(mini, settings_of(kwargs))
    wrapped = quiet(peft.get_peft_model, tiny_model(tokenizer).to(torch.bfloat16), peft_config_of(kwargs))

    lora_parameters = trainable(mini)
    assert lora_parameters and all(p.dtype == torch.float32 for p in lora_parameters.values())
    assert all(p.dtype == torch.bfloat16 for n, p in mini.named_parameters() if n not in lora_parameters)
    peft_parameters = peft_trainable(wrapped)
    assert set(peft_parameters) == set(lora_parameters)
    assert all(p.dtype == torch.float32 for p in peft_parameters.values())  # peft's autocast_adapter_dtype
    # The same A and B in all three, of a size a trained adapter has (B A · scale comparable to W, ~0.05).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainable(reference).items():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            lora_parameters[name].copy_(parameter)
            peft_parameters[name].copy_(parameter)

    ids = input_ids(tokenizer)
    actual = logits_of(mini, ids)
    assert actual.dtype == torch.bfloat16
    expected = logits_of(reference, ids)
    peft_bf16 = logits_of(wrapped, ids)
    assert peft_bf16.dtype == torch.bfloat16
    base_fp32 = logits_of(tiny_model(tokenizer), ids)
    base_bf16_error = max_diff(logits_of(tiny_model(tokenizer).to(torch.bfloat16), ids), base_fp32)
    # bf16 keeps 8 significant bits: each rounding (weights, activations, every matmul output) is off by up to
    # 2^-9 ≈ 0.2% relative. On these logits (|max| ≈ 1) the base model alone already moves by ~0.005 from fp32,
    # and so does peft with the same fp32 LoRA on the same bf16 base. minisft may differ from fp32 by at most
    # twice the larger of those two (and 0.02 absolute), far below what the adapter itself changes.
    # Measured: minisft 5.4e-3 from fp32, peft 5.1e-3, the base alone 5.4e-3 (so the bound is 1.1e-2, 2× the
    # error, a bound set by the same run's own bf16 noise); the adapter moves the fp32 logits by 0.70, 130×.
    error = max_diff(actual, expected)
    peft_error = max_diff(peft_bf16, expected)
    assert error <= min(0.02, 2 * max(base_bf16_error, peft_error)), (error, peft_error, base_bf16_error)
    assert max_diff(expected, base_fp32) > 20 * error
    # minisft rounds the update to bf16 before adding it, peft adds in fp32 and rounds once: a bf16 ulp
    # or so per layer output, which stays within the same bf16 noise (measured 5.9e-3; by the triangle
    # inequality at most error + peft_error, 1.05e-2 here).
    assert max_diff(actual, peft_bf16) <= 0.02

    # A backward pass works and gives fp32 gradients to the fp32 LoRA weights.
    mini.train()
    mini(input_ids=ids, labels=ids).loss.backward()
    for name, parameter in lora_parameters.items():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("targets", [["query"], r".*\.query_proj"], ids=["name", "regex"])
def test_a_target_matching_nothing_is_an_error_listing_linear_names(tokenizer, targets):
    with pytest.raises(LoraError) as error:
        inject_lora(tiny_model(tokenizer), LoraSettings(r=4, alpha=8, target_modules=targets))
    message = str(error.value)
    assert "q_proj" in message and "lm_head" in message and "down_proj" in message
    # peft refuses it too.
    with pytest.raises(ValueError):
        peft_model(tokenizer, dict(r=4, alpha=8, target_modules=targets))


@pytest.mark.parametrize(
    "r, alpha, word",
    [(0, 8, "rank"), (-2, 8, "rank"), (4, 0, "alpha"), (4, -8, "alpha"), (4, -0.5, "alpha")],
    ids=["r=0", "r<0", "alpha=0", "alpha<0", "alpha=-0.5"],
)
def test_bad_rank_or_alpha_is_an_error(tokenizer, r, alpha, word):
    model = tiny_model(tokenizer)
    with pytest.raises(LoraError) as error:
        inject_lora(model, LoraSettings(r=r, alpha=alpha, target_modules=["q_proj"]))
    message = str(error.value)
    assert re.search(word, message), message
    assert str(r if word == "rank" else alpha) in message, message
    # Nothing was changed before the error.
    assert not any(isinstance(module, LoraLinear) for module in model.modules())


@pytest.mark.parametrize("saved_by", ["minisft", "peft"])
def test_adapter_for_another_base_is_an_error_naming_the_module(tokenizer, tmp_path, saved_by):
    kwargs = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    small = dict(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    if saved_by == "minisft":
        other, _ = minisft_model(tokenizer, kwargs, **small)
        save_adapter(other, tmp_path, settings_of(kwargs), base_model_name_or_path="other/base")
    else:
        quiet(peft_model(tokenizer, kwargs, **small).save_pretrained, tmp_path)
    with pytest.raises(LoraError, match=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"):
        load_adapter(tiny_model(tokenizer), tmp_path)
    # peft refuses it too (a size mismatch from load_state_dict).
    with pytest.raises(RuntimeError, match="size mismatch"):
        quiet(peft.PeftModel.from_pretrained, tiny_model(tokenizer), tmp_path)


@pytest.mark.parametrize(
    "settings, refused",
    [
        (dict(dropout=0.0), False),
        (dict(dropout=0.1), True),  # dropout on the head's LoRA input cannot be folded into one matrix
        (dict(dropout=0.0, use_dora=True), True),  # nor can DoRA's per-row magnitude
    ],
)
def test_lora_on_the_head_is_checked_when_the_run_is_set_up(tokenizer, settings, refused):
    from minisft.errors import UserError
    from minisft.sft.loss import check_head

    model = tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    inject_lora(model, LoraSettings(r=4, alpha=8, target_modules=["lm_head"], **settings))
    if refused:
        with pytest.raises(UserError, match="LoRA on the output head needs --lora_dropout 0 and no --use_dora"):
            check_head(model)
    else:
        check_head(model)
