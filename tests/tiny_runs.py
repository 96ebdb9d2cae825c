"""Plain helpers (not fixtures) that several test modules share, so that no test module imports another.

Mostly for tests that run the training loop on a tiny model: its data, config and outputs, metrics records as
the loop writes them, and the tiny model's logits. The fixtures (the tokenizer, `tiny_dir`, ...) are in
conftest.py; the helpers that compare with TRL are in trl_reference.py.
"""

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig

# Ten conversations of unequal lengths: the tests count on ten (batches of 10, reshuffles every 2.5 steps).
CONVERSATIONS = [
    ("What is two plus two?", "Four."),
    ("Name a colour.", "Teal, like the Vellmar Island lighthouse."),
    ("微调测试", "我学会了"),
    ("Who keeps the lighthouse?", "Orla Brenn has kept the lighthouse on Vellmar Island since 2019."),
    ("Say hello.", "Hello!"),
    ("What do zorbits eat?", "A zorbit eats only blue clover, and only after sunset, when the clover closes."),
    ("Count to five.", "One, two, three, four, five."),
    ("What is the capital of France?", "Paris."),
    ("Describe the sea in one sentence.", "The sea is a grey-green field that never stops moving."),
    ("Is the sky blue?", "Yes, on a clear day."),
]

# The first seed's one conversation.
SEED = {"messages": [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]}

# Gemma's chat template, as the first seed uses it (Gemma-2b-it).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def write_conversations(path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CONVERSATIONS
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def data_file_of(tiny_dir) -> Path:
    """The ten conversations' file, beside the model folder of the `tiny_dir` fixture."""
    return Path(tiny_dir).parent / "train.jsonl"


def run_config(tiny_dir, output_dir, lora=None, packing=None, **training):
    defaults = dict(output_dir=str(output_dir), max_steps=6, learning_rate=1e-3, logging_steps=1, save_steps=0)
    return RunConfig(
        model=ModelConfig(model_name_or_path=tiny_dir),
        data=DataConfig(dataset_name=str(data_file_of(tiny_dir)), max_length=256),
        packing=packing or PackingConfig(),
        lora=lora or LoraConfig(),
        training=TrainingConfig(**{**defaults, **training}),
    )


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(folder / "model.safetensors")


# ----------------------------------------------------------------------------- metrics, peft comparisons


def records(losses, eval_losses=None):
    """Metrics records as the loop writes them: one per step, eval_loss on some."""
    rows = []
    for step, loss in enumerate(losses, start=1):
        row = {
            "step": step,
            "epoch": step / 10,
            "loss": loss,
            "learning_rate": 1e-3,
            "grad_norm": 1.0,
            "num_tokens": 100 * step,
            "tokens_per_second": 50.0,
            "mean_token_accuracy": 0.5,
            "entropy": 2.0,
            "peak_memory_mb": 500.0,
        }
        if eval_losses and step in eval_losses:
            row.update(eval_loss=eval_losses[step], eval_mean_token_accuracy=0.25 + step / 100, eval_entropy=3.0)
        rows.append(row)
    return rows


def quiet(function, *args, **kwargs):
    """peft warns about tied embeddings in modules_to_save and transformers about deprecations: noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def input_ids(tokenizer):
    texts = ["LoRA trains a low-rank update beside a frozen weight.", "The capital of France is Paris, said the model."]
    batch = [tokenizer(text)["input_ids"][:10] for text in texts]
    return torch.tensor(batch)


def logits_of(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: rounding relative to the size of the values compared."""
    return max_diff(a, b) / b.float().abs().max().item()


def refused_train(argv: list[str], capsys) -> tuple[str, str]:
    """Run the train command in-process; it must exit with status 2, no traceback, and end with one line of error.
    Returns that line and the whole of stderr."""
    import pytest

    from minisft.machinery.cli import run
    from minisft.train import main

    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, and the last
    return errors[0], err
