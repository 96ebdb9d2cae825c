"""Helpers (not fixtures) for tests that run the training loop on a tiny model: its data, config and outputs.

The fixture that builds the model folder, `tiny_dir`, is in conftest.py; these are the plain functions the
loop and checkpoint tests share.
"""

import json
from pathlib import Path

from safetensors.torch import load_file

from minisft.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, TrainingConfig
from minisft.loop import RunConfig

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
