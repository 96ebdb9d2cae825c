"""Models: the embedded SmolLM2 (GGUF → cached HF folder), tiny random models, and clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from minisft.machinery.models import (
    ModelSourceError,
    embedded_gguf_path,
    embedded_model_dir,
    load_model,
    load_tokenizer,
    tiny_model,
)


def test_tiny_model_covers_the_tokenizer_and_runs(tokenizer):
    model = tiny_model(tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer("Hello world")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    # Same seed, same weights: tests can rebuild the same model.
    assert torch.equal(tiny_model(tokenizer).lm_head.weight, model.lm_head.weight)


def test_embedded_cache_is_a_plain_hf_folder(tokenizer):
    folder = embedded_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_embedded_model_answers_like_smollm2(tokenizer):
    model = load_model("smollm2-135m-instruct")
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    # from_pretrained on the cached folder directly: it is a normal HF model.
    assert isinstance(AutoModelForCausalLM.from_pretrained(embedded_model_dir()), type(model))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_conversion_equals_transformers_gguf_loader():
    """The cached folder holds exactly the weights from_pretrained(gguf_file=...) gives (which needs accelerate)."""
    pytest.importorskip("accelerate", reason="transformers' own GGUF loader needs accelerate (a test extra via TRL)")
    gguf = embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = load_model("smollm2-135m-instruct")
    expected, found = reference.state_dict(), ours.state_dict()
    assert set(found) == set(expected)
    # The same dequantization of the same bytes: bit-exact, q/k un-permutation included.
    assert all(torch.equal(found[name], expected[name]) for name in expected)
    # The config too, but for what saving records (architectures, the path) and the GGUF marker minisft drops.
    ignored = {"architectures": None, "_name_or_path": None, "quantization_config": None}
    assert ours.config.to_dict() | ignored == reference.config.to_dict() | ignored


def test_unknown_model_is_a_clear_error(tmp_path):
    # A path that does not exist is not taken for a hub id: the message says both, in one line.
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelSourceError) as error:
        load_tokenizer(missing)
    assert str(error.value).startswith(f"--model_name_or_path {missing}: no such folder, and not a hub id either")
    assert "Repo id" not in str(error.value) and "\n" not in str(error.value)
    # A folder that exists but holds no model says so.
    with pytest.raises(ModelSourceError, match="the folder has no loadable tokenizer"):
        load_tokenizer(str(tmp_path))
