"""Packing with and without attention boundaries: what `--neat_packing false` does, on the demo data.

A packed row holds several examples. minisft keeps them apart (minisft/sft/attention.py): a token sees only its
own example, so an example computes inside a row exactly what it computes alone. `--neat_packing false` takes the
boundaries away: the row is one sequence, as in TRL's wrapped packing, and each example sees the ones packed
before it. This script shows both sides:

1. the contamination: the loss of one demo answer, its example alone and packed behind a rephrasing of the same
   question with the same answer (train.jsonl lines 3 and 4), with and without boundaries;
2. the same data trained both ways (same seed, same rows, same steps): each run's last train loss, and its
   held-out loss, measured on the eval split unpacked (--eval_packing false), so both runs are measured alike.
   On the embedded model, without boundaries the train loss fell further (0.81 against 1.51: answers copied
   from the example before) and the held-out loss less far (1.45 against 1.31, from 4.42 before training).

    python examples/05_packing_boundaries.py          # the embedded SmolLM2-135M-Instruct: ~4 CPU-minutes
    python examples/05_packing_boundaries.py --model_name_or_path DIR --max_steps 2     # any flag overrides
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from minisft.machinery.cli import demo_dataset_path, parse_flags, run
from minisft.machinery.config import RunConfig
from minisft.machinery.loop import train
from minisft.machinery.models import load_model, load_tokenizer
from minisft.sft.attention import use_sdpa_by_example
from minisft.sft.batches import collate
from minisft.sft.chat_template import format_batch, resolve_eos_token
from minisft.sft.examples import normalize_rows
from minisft.sft.labels import IGNORE_INDEX, example_labels, plan_masks
from minisft.sft.packing import make_row
from minisft.train import CONFIG_TYPES

FLAGS = [
    "--model_name_or_path", "smollm2-135m-instruct",
    "--dataset_name", str(demo_dataset_path()),  # 12 conversations to train on, 3 held-out rephrasings
    "--packing", "--max_length", "256", "--eval_packing", "false",
    "--per_device_train_batch_size", "1", "--max_steps", "6",  # a row a step: the 3 rows twice
    "--learning_rate", "1e-4", "--logging_steps", "1", "--save_steps", "0",
    "--eval_strategy", "steps", "--eval_steps", "6", "--eval_on_start",
]  # fmt: skip


def answer_losses(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """The loss of each trained token of one example (its answer), from the example's logits."""
    losses = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX, reduction="none")
    return losses[torch.tensor(labels[1:]) != IGNORE_INDEX]


def contamination(model_name: str, console: Console) -> None:
    """Two rephrasings of one question with the same answer (train.jsonl lines 3 and 4), packed in one row."""
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name).eval()
    use_sdpa_by_example(model)  # as a run does: one causal sdpa per example of a packed row
    lines = (demo_dataset_path() / "train.jsonl").read_text(encoding="utf-8").splitlines()
    examples = normalize_rows((f"train.jsonl line {number}", json.loads(lines[number - 1])) for number in (3, 4))
    plan = plan_masks(
        "conversational", {"messages"}, tokenizer, completion_only_loss=None, assistant_only_loss=True,
        response_template=None, instruction_template=None,
    )  # fmt: skip
    formatted = format_batch(examples, tokenizer, resolve_eos_token(tokenizer, None))
    (first, first_labels), (second, second_labels) = [(f.input_ids, example_labels(f, plan)[0]) for f in formatted]
    row = make_row([(first, first_labels), (second, second_labels)])
    questions = " then ".join(repr(example["messages"][0]["content"]) for example in examples)
    console.print(f"{questions}, both answered {examples[1]['messages'][1]['content']!r}", highlight=False)
    with torch.no_grad():
        alone = answer_losses(model(input_ids=torch.tensor([second])).logits[0], second_labels)
        console.print(f"the second answer's loss, the example alone:     {alone.mean():.4f}", highlight=False)
        for boundaries in (True, False):
            batch = collate([row], model, tokenizer.pad_token_id, False, None, torch.device("cpu"), boundaries)
            packed = answer_losses(model(**batch["inputs"]).logits[0, len(first) :], second_labels)
            console.print(
                f"packed {'with' if boundaries else 'without'} boundaries:{'   ' if boundaries else ''} "
                f"{packed.mean():.4f} (largest per-token difference from alone: {(packed - alone).abs().max():.2g})",
                highlight=False,
            )
    console.print(
        "Without boundaries the second example can read the answer in the first: a trained model copies it, and "
        "its loss says it knows the fact.",
        highlight=False,
    )


def train_both_ways(flags: list[str], console: Console) -> dict[str, list[dict]]:
    """Each run's metrics records: the same flags, once with and once without boundaries."""
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, neat in (("with boundaries", "true"), ("without boundaries", "false")):
            output_dir = Path(folder) / name.replace(" ", "_")
            argv = [*flags, "--neat_packing", neat, "--output_dir", str(output_dir)]
            console.rule(f"[bold]trained {name}")
            train(RunConfig(*parse_flags(CONFIG_TYPES, argv, "minisft.train", "")), console)
            lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            runs[name] = [json.loads(line) for line in lines]
    return runs


def main(argv: list[str]) -> None:
    console = Console()
    flags = FLAGS + argv  # argparse keeps the last value of a flag given twice: argv wins
    console.rule("[bold]1. the contamination: one example, alone and packed behind another")
    model = parse_flags(CONFIG_TYPES, flags, "minisft.train", "")[0].model_name_or_path  # the ModelConfig's
    contamination(model, console)
    console.rule("[bold]2. the same data trained both ways")
    runs = train_both_ways(flags, console)
    console.rule("[bold]what each run's losses say")
    evals = [record["eval_loss"] for record in runs["with boundaries"] if "eval_loss" in record]
    console.print(f"held-out loss before training: {evals[0]:.4f}", highlight=False)
    for name, records in runs.items():
        train_loss = [record["loss"] for record in records if "loss" in record][-1]
        held_out = [record["eval_loss"] for record in records if "eval_loss" in record][-1]
        console.print(
            f"trained {name}: last train loss {train_loss:.4f}, held-out loss {held_out:.4f}", highlight=False
        )
    console.print(
        "The train loss counts what the packed examples read from each other; the held-out loss asks each question "
        "alone (the eval split unpacked), as the model will be asked.",
        highlight=False,
    )


if __name__ == "__main__":
    run(main, sys.argv[1:])
