"""`python -m minisft.chat` and machinery/generate.py, on a tiny random model: one prompt, a session, adapters."""

import json

import pytest
import torch

import minisft.chat
import minisft.machinery.generate as generate_module
from minisft.chat import main
from minisft.machinery.cli import run
from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainingConfig
from minisft.machinery.generate import generate, load_for_chat
from minisft.machinery.loop import train
from minisft.machinery.models import load_model
from minisft.machinery.peft_files import load_adapter

HELLO = [[{"role": "user", "content": "hello"}]]


def test_one_prompt_streams_the_greedy_answer(chatty_dir, capsys):
    model, tokenizer = load_for_chat(chatty_dir)
    expected = generate(model, tokenizer, HELLO, max_new_tokens=8)[0]
    assert expected.strip()
    main(["--model_name_or_path", chatty_dir, "--max_new_tokens", "8", "hello"])
    assert capsys.readouterr().out.strip() == expected


def test_sampling_differs_from_greedy_and_follows_the_seed(chatty_dir):
    model, tokenizer = load_for_chat(chatty_dir)
    greedy = generate(model, tokenizer, HELLO, max_new_tokens=8)
    assert generate(model, tokenizer, HELLO, max_new_tokens=8) == greedy
    torch.manual_seed(0)
    sampled = generate(model, tokenizer, HELLO, max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    assert generate(model, tokenizer, HELLO, max_new_tokens=8, temperature=1.0, top_p=0.9) == sampled
    # A random model's next-token distribution is nearly flat over 49k tokens: sampling leaves greedy's path.
    assert sampled != greedy


def test_batched_answers_equal_one_at_a_time(chatty_dir):
    model, tokenizer = load_for_chat(chatty_dir)
    conversations = [[{"role": "user", "content": text}] for text in ("hi", "a much longer question than that")]
    batched = generate(model, tokenizer, conversations, max_new_tokens=6)
    assert batched == [
        generate(model, tokenizer, [conversation], max_new_tokens=6)[0] for conversation in conversations
    ]


def test_a_session_keeps_the_conversation(chatty_dir, monkeypatch, capsys):
    typed = iter(["hello", "and again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    seen = []

    def recording_generate(model, tokenizer, conversations, *args, **kwargs):
        seen.append([message["role"] for message in conversations[0]])
        return generate(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(minisft.chat, "generate", recording_generate)
    main(["--model_name_or_path", chatty_dir, "--max_new_tokens", "4", "--system_prompt", "Be brief."])
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"]]
    assert "empty line or Ctrl-D ends the session" in capsys.readouterr().err


def test_an_adapter_folder_loads_its_base_with_the_adapter(chatty_dir, tmp_path):
    output_dir = tmp_path / "adapter"
    train(
        RunConfig(
            model=ModelConfig(model_name_or_path=chatty_dir),
            data=DataConfig(max_length=128),
            lora=LoraConfig(use_peft=True, lora_r=4, lora_target_modules=["all-linear"]),
            training=TrainingConfig(output_dir=str(output_dir), max_steps=3, learning_rate=1e-2, save_steps=0),
        )
    )
    merged, tokenizer = load_for_chat(str(output_dir))
    reference = load_model(chatty_dir).eval()
    base_logits = reference(torch.tensor([[1, 2, 3, 4]])).logits
    load_adapter(reference, output_dir)  # the unmerged path: W x + B A x · scale
    reference.eval()  # the injected LoRA dropout too
    inputs = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected, got = reference(inputs).logits, merged(inputs).logits
    # Merged (W + B A · scale) x against W x + B (A x) · scale: float32 rounding, measured 2.5e-7 max|a-b|/max|b|.
    # The adapter moved the logits by 1.0 of their largest value (measured), 1e5× the bound.
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert (got - base_logits).abs().max() > 0.1 * scale  # the adapter changed the model


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (["--model_name_or_path", "/no/such/folder"], "--model_name_or_path /no/such/folder: no such folder"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(main, flags + ["hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_adapter_of_the_embedded_model_trained_elsewhere_loads_it_by_its_alias(tmp_path, monkeypatch):
    """An adapter records the embedded model as its converted folder (peft needs a path); where that folder is not
    (another machine, another cache), chat loads the embedded model by its alias, which converts it here."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    recorded = "/elsewhere/cache/smollm2-135m-instruct"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": recorded}))
    asked = []

    class Loaded(Exception):
        pass

    def load_model_spy(name, trust_remote_code=False):
        asked.append(name)
        raise Loaded

    monkeypatch.setattr(generate_module, "load_model", load_model_spy)
    with pytest.raises(Loaded):
        load_for_chat(str(adapter))
    assert asked == ["smollm2-135m-instruct"]
