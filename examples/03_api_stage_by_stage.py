"""SFT stage by stage with minisft's Python API, printing what each stage produces.

    data → format → mask → pack → LoRA → loss → loop

Each stage is one call into one module (the README's "How SFT works inside minisft" walks the
same path). It uses the embedded SmolLM2-135M-Instruct and the demo data that ships with minisft.

    python examples/03_api_stage_by_stage.py [OUTPUT_DIR]       # about a minute on 2 CPU cores
"""

import sys

import torch
from rich.console import Console
from rich.table import Table

from minisft.inspect import render_tokens
from minisft.machinery.cli import demo_dataset_path
from minisft.machinery.config import DataConfig, LoraConfig, PackingConfig, RunConfig, TrainingConfig
from minisft.machinery.data_files import load_splits
from minisft.machinery.loop import train
from minisft.machinery.models import load_model, load_tokenizer
from minisft.machinery.prepare import prepare_dataset
from minisft.sft.attention import packed_inputs, use_sdpa_by_example
from minisft.sft.chat_template import format_example, resolve_eos_token
from minisft.sft.lora import LoraSettings, head_matrix, inject_lora
from minisft.sft.loss import token_losses
from minisft.sft.packing import collate_rows, pack

MODEL = "smollm2-135m-instruct"
console = Console()


def stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def main() -> None:
    output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/api-stage-by-stage"
    tokenizer = load_tokenizer(MODEL)

    stage("1. data (minisft/data.py): any format → canonical examples")
    rows = [  # the first seed's format; ShareGPT's {"conversations": [{"from", "value"}]} would do as well
        {"conversation": [{"role": "human", "message": "微调测试"}, {"role": "assistant", "message": "我学会了"}]},
        {
            "conversation": [
                {"role": "human", "message": "What do zorbits eat?"},
                {"role": "assistant", "message": "Clover."},
            ]
        },
    ]
    examples = load_splits(rows).train  # one dataset has one format: a mix is refused, naming the row
    for row, example in zip(rows, examples):
        console.print("raw      ", row, "\ncanonical", example["messages"], highlight=False)

    stage("2. format (minisft/formatting.py): the chat template → token ids")
    formatted = format_example(examples[0], tokenizer, resolve_eos_token(tokenizer, None))
    console.print(f"{len(formatted.input_ids)} token ids: {formatted.input_ids}")
    console.print(tokenizer.decode(formatted.input_ids), highlight=False, markup=False)

    stage("3. mask (minisft/masking.py via prepare.py): labels, -100 where no loss is taken")
    prepared = prepare_dataset(examples, tokenizer, DataConfig(assistant_only_loss=True))
    first = prepared.examples[0]
    console.print(render_tokens(tokenizer, first["input_ids"], first["labels"]))
    console.print("the trained tokens (bright above):", [label for label in first["labels"] if label != -100])
    console.print(f"trained tokens {prepared.stats.trained_tokens} of {prepared.stats.tokens}")

    stage("4. pack (minisft/packing.py): examples share rows, positions restart per example")
    demo = load_splits(demo_dataset_path()).train
    demo_prepared = prepare_dataset(demo, tokenizer, DataConfig(assistant_only_loss=True, max_length=256))
    packed = pack(demo_prepared.examples, max_length=256)  # bfd: the examples come truncated to 256 tokens
    table = Table("row", "examples (seq_lengths)", "tokens", "position_ids (the collator's)")
    for index, row in enumerate(packed.rows):
        positions = collate_rows([row], tokenizer.pad_token_id)["position_ids"][0].tolist()
        table.add_row(
            str(index), str(row["seq_lengths"]), str(len(row["input_ids"])), f"{positions[:5]} … {positions[-3:]}"
        )
    console.print(table)
    console.print(f"{len(demo)} examples in {packed.stats.rows} rows, efficiency {packed.stats.efficiency:.1%}")

    stage("5. LoRA (minisft/lora.py): a trainable low-rank update beside frozen layers")
    model = load_model(MODEL)
    console.print(str(inject_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))))
    q_proj = model.model.layers[0].self_attn.q_proj
    console.print(
        f"layer 0 q_proj: frozen W {tuple(q_proj.base.weight.shape)}, A {tuple(q_proj.lora_A.weight.shape)}, "
        f"B {tuple(q_proj.lora_B.weight.shape)} (all zeros: {bool((q_proj.lora_B.weight == 0).all())})"
    )

    stage("6. attention boundaries (minisft/attention.py): each packed example attends only to itself")
    use_sdpa_by_example(model)  # sdpa runs once per example of a row, as the loop sets it up
    batch = collate_rows(packed.rows[:1], tokenizer.pad_token_id)
    inputs, labels = packed_inputs(batch, model)  # the row laid flat, where each example starts, and its labels
    console.print(
        f"row 0 holds examples of {batch['seq_lengths'][0]} tokens: cu_seq_lens {inputs['cu_seq_lens_q'].tolist()}, "
        f"position_ids restart at each: {inputs['position_ids'][0, :8].tolist()} …"
    )

    stage("7. loss (minisft/loss.py): cross-entropy on the trained tokens of that packed batch")

    def losses_of(inputs: dict, labels: torch.Tensor):  # as the loop's model_losses: the backbone, then the loss
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        return token_losses(hidden, labels, head_matrix(model))

    with torch.no_grad():
        losses = losses_of(inputs, labels)
    console.print(
        f"sum of token losses {float(losses.loss_sum):.2f} over {losses.tokens} trained tokens "
        f"= loss {float(losses.loss_sum) / losses.tokens:.3f}"
    )
    alone, start = 0.0, 0  # the boundaries' promise: the packed row's sum is the sum of its examples run alone
    for length in batch["seq_lengths"][0]:
        ids, labels = batch["input_ids"][:, start : start + length], batch["labels"][:, start : start + length]
        with torch.no_grad():
            alone += float(losses_of({"input_ids": ids}, labels).loss_sum)
        start += length
    console.print(f"the same examples run one by one: sum of token losses {alone:.2f}")

    stage("8. loop (minisft/loop.py): all of the above, then steps, logs, eval, outputs")
    result = train(
        RunConfig(
            data=DataConfig(assistant_only_loss=True, max_length=256),
            packing=PackingConfig(packing=True),
            lora=LoraConfig(use_peft=True, lora_target_modules=["all-linear"], lora_dropout=0.0),
            training=TrainingConfig(
                output_dir=output_dir,
                overwrite_output_dir=True,
                max_steps=2,
                per_device_train_batch_size=1,
                learning_rate=1e-3,
                logging_steps=1,
                eval_strategy="steps",
                eval_steps=1,
                save_steps=0,
            ),
        )
    )
    console.print(f"{result.steps} steps; the last figures: {result.metrics}", highlight=False)
    console.print(f"the adapter and metrics.jsonl are in {result.output_dir}")


if __name__ == "__main__":
    main()
