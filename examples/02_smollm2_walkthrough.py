"""The second seed's walkthrough (the Hugging Face course page on SFT), run with minisft.

The page fine-tunes SmolLM2-135M with TRL's SFTTrainer, packs its examples, evaluates on a
held-out split, and teaches how to read the curves. Here is the same run as minisft flags: the
names are SFTConfig's, so each line maps to the page's code. Two things differ: the data is
minisft's demo data (smoltalk needs the hub), and the numbers are sized for a CPU.

    SFTConfig(                                      python -m minisft.train
        max_steps=1000,                                 --max_steps 24
        per_device_train_batch_size=4,                  --per_device_train_batch_size 1   (a packed row holds ~4)
        learning_rate=5e-5,                             --learning_rate 5e-5
        logging_steps=10,                               --logging_steps 2
        save_steps=100,                                 --save_steps 12
        eval_strategy="steps", eval_steps=50,           --eval_strategy steps --eval_steps 6
        packing=True)                                   --packing --max_length 256

Then what the page says to watch: the summary's curves and warning signs, the PNG of loss, eval
loss, learning rate and gradient norm, and the model's actual answers to the held-out prompts.

    python examples/02_smollm2_walkthrough.py [FLAGS]        # any minisft.train flag overrides, e.g. --max_steps 4
"""

import argparse
import sys

from rich.console import Console

from minisft.errors import UserError
from minisft.machinery.cli import demo_dataset_path, run
from minisft.machinery.data_files import load_splits
from minisft.machinery.generate import generate, load_for_chat
from minisft.plot import plot
from minisft.train import main as train_main

OUTPUT_DIR = "outputs/smollm2-walkthrough"
FLAGS = [
    "--model_name_or_path", "smollm2-135m-instruct",
    "--dataset_name", str(demo_dataset_path()),  # its test split is the eval split
    "--packing", "--max_length", "256",
    "--max_steps", "24",
    "--per_device_train_batch_size", "1",
    "--learning_rate", "5e-5",
    "--logging_steps", "2",
    "--save_steps", "12",
    "--eval_strategy", "steps", "--eval_steps", "6",
    "--output_dir", OUTPUT_DIR, "--overwrite_output_dir",
]  # fmt: skip


def main(argv: list[str]) -> None:
    console = Console()
    flags = FLAGS + argv  # argparse keeps the last value of a flag given twice: argv wins
    output_dir = flag_value(flags, "--output_dir")

    console.rule("[bold]training (minisft/machinery/loop.py), then the summary (minisft/summary.py)")
    train_main(flags)

    console.rule("[bold]the curves as a PNG (minisft/plot.py)")
    try:
        console.print(f"wrote {plot(output_dir)}")
    except UserError as error:  # matplotlib is an optional extra
        console.print(str(error))

    console.rule("[bold]the answers to the held-out prompts: the curves are not the whole story")
    model, tokenizer = load_for_chat(output_dir)
    held_out = load_splits(demo_dataset_path()).eval
    prompts = [example["messages"][:-1] for example in held_out]
    for example, answer in zip(held_out, generate(model, tokenizer, prompts, max_new_tokens=32)):
        console.print(
            f"{example['messages'][-2]['content']}\n  expected: {example['messages'][-1]['content']}\n"
            f"  answered: {answer}",
            highlight=False,
        )


def flag_value(flags: list[str], name: str) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(name)
    return getattr(parser.parse_known_args(flags)[0], name.removeprefix("--"))


if __name__ == "__main__":
    run(main, sys.argv[1:])
