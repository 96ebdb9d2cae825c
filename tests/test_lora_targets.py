"""Default LoRA targets for every architecture: peft's where peft has them, q_proj and v_proj where the model names its
attention so, and otherwise an error that lists the model's Linear layers.

peft is the reference twice over: its own mapping (every entry, not a sample) and what `get_peft_model` adapts on the
same tiny model when no target_modules are given.
"""

import copy
import json
import subprocess
import sys

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from minisft.sft.lora import PEFT_DEFAULT_TARGETS, LoraError, LoraSettings, inject_lora

# Small enough to build in well under a second with SmolLM2's 49,152-token vocabulary.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def tiny_of(model_type: str, tokenizer, seed: int = 0):
    """A randomly initialised causal LM of `model_type`, shaped like a real one of that family but tiny."""
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_every_peft_default_for_a_causal_lm_is_minisfts():
    expected = {
        model_type: targets
        for model_type, targets in PEFT_MAPPING.items()
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    }

    def normalised(mapping):  # lists compare as sets of names; a regex as itself
        return {key: value if isinstance(value, str) else sorted(value) for key, value in mapping.items()}

    assert normalised(PEFT_DEFAULT_TARGETS) == normalised(expected)


@pytest.mark.parametrize("model_type", ["gemma", "qwen3", "phi"])
def test_adapts_what_peft_adapts_without_target_modules(model_type, tokenizer):
    model = tiny_of(model_type, tokenizer)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    peft_adapted = sorted(
        name.removeprefix("base_model.model.")
        for name, module in reference.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    )
    report = inject_lora(model, LoraSettings(r=4, alpha=8))
    assert sorted(report.targeted) == peft_adapted and peft_adapted
    assert f"peft's default for {model_type}" in str(report)


def test_fallback_is_the_attentions_q_and_v_where_peft_has_no_default(tokenizer):
    assert "smollm3" not in PEFT_MAPPING  # the premise: peft would refuse this model without target_modules
    report = inject_lora(tiny_of("smollm3", tokenizer), LoraSettings(r=4, alpha=8))
    assert sorted(report.targeted) == sorted(
        f"model.layers.{layer}.self_attn.{name}" for layer in range(2) for name in ("q_proj", "v_proj")
    )
    assert "peft has no default for smollm3" in str(report)


def test_no_default_and_no_q_v_names_the_linear_layers(tokenizer):
    assert "phi3" not in PEFT_MAPPING
    model = tiny_of("phi3", tokenizer)  # fused qkv_proj and gate_up_proj: nothing to fall back on
    with pytest.raises(LoraError) as error:
        inject_lora(model, LoraSettings(r=4, alpha=8))
    message = str(error.value)
    assert "'phi3'" in message and "qkv_proj" in message and "gate_up_proj" in message and "all-linear" in message
    assert not any(parameter.requires_grad is False for parameter in model.parameters())  # nothing was changed


def test_train_cli_lora_on_a_gemma_shaped_model_without_target_modules(tokenizer, tmp_path):
    model_dir = tmp_path / "gemma"
    tiny_of("gemma", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": f"{n}."}]}
        for n in range(6)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "minisft.train", "--model_name_or_path", str(model_dir)]
    command += ["--dataset_name", str(data), "--output_dir", str(output_dir), "--use_peft", "--max_steps", "2"]
    command += ["--per_device_train_batch_size", "2", "--save_steps", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "peft's default for gemma" in result.stderr
    saved = json.loads((output_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    # peft loads it onto the same base and finds exactly those layers.
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = peft.PeftModel.from_pretrained(base, output_dir)
    assert sum(1 for module in loaded.modules() if isinstance(module, peft.tuners.lora.LoraLayer)) == 4
