"""The first seed's experiment, reproduced on the embedded SmolLM2-135M-Instruct.

A blog post fine-tuned Gemma-2b-it on one sentence with TRL: asked "微调测试" ("fine-tuning test"),
the model should answer "我学会了" ("I learnt it"). Its recipe, and minisft's flag for each part:

    one conversation, the post's own format           {"conversation": [{"role": "human", "message": ...}]}
    LoRA r 512, alpha 512, on q/k/v/o                 LoraConfig(lora_r=512, lora_alpha=512, lora_target_modules=...)
    30 epochs, learning rate 2e-5                     TrainingConfig(num_train_epochs=30, learning_rate=...)
    DataCollatorForCompletionOnlyLM(response_template="<start_of_turn>model\\n")
                                                      DataConfig(response_template="<|im_start|>assistant\\n")

Gemma's turn opener is "<start_of_turn>model\\n"; SmolLM2 speaks ChatML, where it is
"<|im_start|>assistant\\n". The learning rate is the one change: 1e-4 instead of the post's 2e-5,
so that 30 steps surely suffice on a small model (measured: the loss is 3.0 over the first 5
steps, 0.38 over steps 6-10, 0.004 over steps 11-15).

    python examples/01_one_sentence_sft.py [OUTPUT_DIR]
    python examples/01_one_sentence_sft.py OUTPUT_DIR --num_train_epochs 15 --learning_rate 2e-4   # shorter
"""

import argparse
import json
from pathlib import Path

from rich.console import Console

from minisft.machinery.config import DataConfig, LoraConfig, RunConfig, TrainingConfig
from minisft.machinery.generate import generate, load_for_chat
from minisft.machinery.loop import train

PROMPT, ANSWER = "微调测试", "我学会了"
BASE_MODEL = "smollm2-135m-instruct"


def ask(model_name_or_path: str) -> str:
    model, tokenizer = load_for_chat(model_name_or_path)
    return generate(model, tokenizer, [[{"role": "user", "content": PROMPT}]], max_new_tokens=24)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="outputs/one-sentence-sft")
    parser.add_argument("--num_train_epochs", type=float, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    args = parser.parse_args()
    console = Console()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = output_dir / "one_sentence.jsonl"  # the post's dataset, in the post's format
    row = {"conversation": [{"role": "human", "message": PROMPT}, {"role": "assistant", "message": ANSWER}]}
    data.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")

    before = ask(BASE_MODEL)
    config = RunConfig(
        data=DataConfig(dataset_name=str(data), response_template="<|im_start|>assistant\n"),
        lora=LoraConfig(
            use_peft=True,
            lora_r=512,
            lora_alpha=512,
            lora_dropout=0.05,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
        training=TrainingConfig(
            output_dir=str(output_dir / "adapter"),
            overwrite_output_dir=True,
            num_train_epochs=args.num_train_epochs,
            per_device_train_batch_size=1,
            learning_rate=args.learning_rate,
            logging_steps=5,
            save_steps=0,
        ),
    )
    result = train(config)
    after = ask(str(result.output_dir))

    console.print(f"asked {PROMPT!r}\n  before: {before!r}\n  after:  {after!r}")
    console.print(f"Chat with it: python -m minisft.chat --model_name_or_path {result.output_dir} {PROMPT}")


if __name__ == "__main__":
    main()
