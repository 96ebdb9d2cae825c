"""QLoRA: the frozen base quantized to 4 bits by bitsandbytes as it loads (Linear4bit, which runs on the CPU since
bitsandbytes 0.49), LoRA in float32 on top."""

import json

import bitsandbytes
import pytest
import torch
from transformers import AutoModelForCausalLM

from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig
from minisft.machinery.loop import train
from minisft.machinery.models import four_bit_quantization, load_model, tiny_model
from minisft.sft.lora import LoraError, LoraSettings, inject_lora


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-for-4bit")
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_4bit(folder, **settings):
    return load_model(str(folder), quantization_config=four_bit_quantization(torch.float32, **settings))


def test_base_linears_are_quantized_as_they_load_and_stay_close(tokenizer, tiny_folder):
    full = tiny_model(tokenizer)  # the weights saved in tiny_folder
    quantized = load_4bit(tiny_folder)

    linears = [name for name, module in full.named_modules() if isinstance(module, torch.nn.Linear)]
    four_bit = [name for name, module in quantized.named_modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]
    assert len(four_bit) == len(linears) - 1 and "lm_head" not in four_bit  # every Linear but the head
    weight = quantized.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4"  # stored as packed 4-bit codes
    # The codes are exactly those bitsandbytes makes of the saved float weight: quantizing on the way in loses nothing
    # beyond the 4-bit rounding itself.
    saved = full.model.layers[0].mlp.up_proj.weight.data
    direct = bitsandbytes.nn.Params4bit(saved, requires_grad=False, compress_statistics=False, quant_type="nf4")
    direct = direct.to("cpu")  # quantized as it moves to the device
    assert torch.equal(weight.data, direct.data) and torch.equal(weight.quant_state.absmax, direct.quant_state.absmax)

    ids = torch.tensor([tokenizer("The lighthouse on Vellmar Island is teal.")["input_ids"]])
    reference = logits(full, ids)
    error = (logits(quantized, ids) - reference).abs().max()
    # 16 levels per weight move the logits (measured: 0.089), but far less than another seed's weights do (1.12;
    # seeds 1 to 5: 1.09 to 1.23): the 4-bit model is still this model. The bound, 0.28, is 3× the error; that
    # error is nf4 rounding of the weights, fixed by the weights, not float32 noise (~1e-7 here).
    other = (logits(tiny_model(tokenizer, seed=1), ids) - reference).abs().max()
    assert 0 < error < other / 4, (error, other)


def test_quant_type_nesting_and_storage_reach_bitsandbytes(tiny_folder):
    model = load_4bit(tiny_folder, quant_type="fp4", nested=True, storage="bfloat16")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.quant_state.quant_type == "fp4"
    assert weight.quant_state.nested  # the blocks' scales are themselves quantized
    assert weight.dtype == torch.bfloat16  # the packed codes, two per byte, viewed as bf16 for FSDP


def test_only_lora_weights_train_over_a_4bit_base(tokenizer, tiny_folder):
    model = load_4bit(tiny_folder)
    inject_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    ids = torch.tensor([tokenizer("Only the adapter learns.")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    with_gradients = [name for name, parameter in model.named_parameters() if parameter.grad is not None]
    assert with_gradients and all(".lora_A." in name or ".lora_B." in name for name in with_gradients)
    assert len(with_gradients) == 2 * 14  # A and B of the 14 quantized Linears
    assert all(
        parameter.grad.dtype == torch.float32
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    )


def test_qlora_run_writes_adapter_and_full_precision_merge(tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]}] * 4
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    output_dir = tmp_path / "out"
    result = train(
        RunConfig(
            model=ModelConfig(model_name_or_path=str(model_dir)),
            data=DataConfig(dataset_name=str(data)),
            packing=PackingConfig(),
            lora=LoraConfig(use_peft=True, load_in_4bit=True, lora_dropout=0.0, lora_r=4, merge_lora=True),
            training=TrainingConfig(output_dir=str(output_dir), max_steps=3, learning_rate=1e-2, save_steps=0),
        )
    )
    losses = [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (output_dir / "adapter_model.safetensors").is_file()
    # The merge goes into the full-precision base (a 4-bit base cannot take the update exactly): an ordinary model.
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_unsupported_device_is_a_clear_error(tiny_folder, monkeypatch):
    def unsupported(self, *args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.nn.Params4bit, "to", unsupported)
    with pytest.raises(LoraError, match="bitsandbytes cannot quantize to 4 bits on cpu: no 4-bit kernel"):
        load_4bit(tiny_folder)
