"""SFT stage by stage with the lesson's own functions (minisft/sft/), printing what each stage produces.

    examples → chat template → labels → packing → attention → batches → LoRA → loss → optimizer → step

Each stage is a call into one file of minisft/sft/, in the folder's reading order (the README's "How SFT works
inside minisft" walks the same path). Nothing here comes from the machinery but the model loader: no flags, no
cache, no checkpoints. It uses the embedded SmolLM2-135M-Instruct and the demo data that ships with minisft.

    python examples/03_api_stage_by_stage.py       # about a minute on 2 CPU cores
"""

import functools
import json
from importlib import resources

import torch

from minisft.machinery.models import load_model, load_tokenizer
from minisft.sft.attention import use_sdpa_by_example
from minisft.sft.batches import collate, collate_rows, packed_inputs
from minisft.sft.chat_template import format_batch, resolve_eos_token
from minisft.sft.examples import normalize_rows
from minisft.sft.labels import IGNORE_INDEX, count_trained_tokens_of, cut, drop_reason, example_labels, plan_masks
from minisft.sft.lora import LoraSettings, inject_lora
from minisft.sft.loss import head_matrix, token_losses
from minisft.sft.optim import build_optimizer, build_schedule
from minisft.sft.packing import pack
from minisft.sft.step import evaluate, train_step

MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 256


def stage(title: str) -> None:
    print(f"\n── {title} " + "─" * max(0, 100 - len(title)))


def demo_rows(split: str) -> list[tuple[str, dict]]:
    """(origin, row) pairs of the demo data that ships with minisft: a JSONL file is a row per line."""
    text = (resources.files("minisft") / "demo_data" / f"{split}.jsonl").read_text(encoding="utf-8")
    return [(f"{split}.jsonl line {number}", json.loads(line)) for number, line in enumerate(text.splitlines(), 1)]


def tokenized(examples: list[dict], tokenizer) -> list[dict]:
    """Stages 2 and 3 for a list of examples: format, label (assistant turns only), cut to MAX_LENGTH, drop."""
    plan = plan_masks(
        "conversational", set(examples[0]), tokenizer, completion_only_loss=None, assistant_only_loss=True,
        response_template=None, instruction_template=None,
    )  # fmt: skip
    kept = []
    for formatted in format_batch(examples, tokenizer, resolve_eos_token(tokenizer, None)):
        labels, _, _ = example_labels(formatted, plan)
        input_ids, cut_labels = cut(formatted.input_ids, labels, MAX_LENGTH)
        if drop_reason(sum(label != IGNORE_INDEX for label in cut_labels), labels, plan) is None:
            kept.append({"input_ids": input_ids, "labels": cut_labels})
    return kept


def main() -> None:
    tokenizer = load_tokenizer(MODEL)

    stage("1. examples (sft/examples.py): any row form → one canonical example")
    rows = [  # the first seed's format; ShareGPT's {"conversations": [{"from", "value"}]} would do as well
        {"conversation": [{"role": "human", "message": question}, {"role": "assistant", "message": answer}]}
        for question, answer in [("微调测试", "我学会了"), ("What do zorbits eat?", "Clover.")]
    ]
    examples = normalize_rows((f"row {index}", row) for index, row in enumerate(rows))  # one format, or refused
    for row, example in zip(rows, examples):
        print("raw      ", row, "\ncanonical", example["messages"])

    stage("2. format (sft/chat_template.py): the chat template → token ids")
    formatted = format_batch(examples[:1], tokenizer, resolve_eos_token(tokenizer, None))[0]
    print(f"{len(formatted.input_ids)} token ids: {formatted.input_ids}")
    print(tokenizer.decode(formatted.input_ids))

    stage("3. mask (sft/labels.py): labels, -100 where no loss is taken (assistant turns only)")
    first = tokenized(examples, tokenizer)[0]
    for token, label in list(zip(first["input_ids"], first["labels"]))[-8:]:
        print(f"{tokenizer.decode([token])!r:>16}  {token:>6}  {'trained' if label != IGNORE_INDEX else '-100'}")
    print("(a Chinese character is often several byte-level tokens: alone, each decodes to �)")
    trained = [label for label in first["labels"] if label != IGNORE_INDEX]
    print(f"trained tokens {len(trained)} of {len(first['input_ids'])}: {tokenizer.decode(trained)!r}")

    stage("4. pack (sft/packing.py): examples share rows of max_length, best fit decreasing")
    train = tokenized(normalize_rows(demo_rows("train")), tokenizer)
    packed = pack(train, max_length=MAX_LENGTH)  # bfd: the examples come cut to MAX_LENGTH tokens
    for index, row in enumerate(packed.rows[:4]):
        print(f"row {index}: examples of {row['seq_lengths']} tokens, {len(row['input_ids'])} in all")
    print(f"{len(train)} examples in {packed.stats.rows} rows, efficiency {packed.stats.efficiency:.1%}")

    stage("5. attention boundaries (sft/attention.py): each packed example attends only to itself")
    model = load_model(MODEL)
    use_sdpa_by_example(model)  # transformers' sdpa, called once per example of a flattened row
    print(f"attention implementation: {model.config._attn_implementation}")

    stage("6. batches (sft/batches.py): a packed row as the model takes it")
    batch = collate_rows(packed.rows[:1], tokenizer.pad_token_id)
    inputs, labels = packed_inputs(batch, model)  # the row laid flat, where each example starts, and its labels
    print(
        f"row 0 holds examples of {batch['seq_lengths'][0]} tokens: cu_seq_lens {inputs['cu_seq_lens_q'].tolist()}, "
        f"position_ids restart at each: {inputs['position_ids'][0, :8].tolist()} …"
    )

    stage("7. LoRA (sft/lora.py): a trainable low-rank update beside frozen layers")
    print(str(inject_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))))
    q_proj = model.model.layers[0].self_attn.q_proj
    print(
        f"layer 0 q_proj: frozen W {tuple(q_proj.base.weight.shape)}, A {tuple(q_proj.lora_A.weight.shape)}, "
        f"B {tuple(q_proj.lora_B.weight.shape)} (all zeros: {bool((q_proj.lora_B.weight == 0).all())})"
    )

    stage("8. loss (sft/loss.py): cross-entropy on the trained tokens of that packed batch")

    def losses_of(inputs: dict, labels: torch.Tensor):  # as sft/step.py's model_losses: the backbone, then the loss
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        return token_losses(hidden, labels, head_matrix(model))

    with torch.no_grad():
        losses = losses_of(inputs, labels)
    print(
        f"sum of token losses {float(losses.loss_sum):.2f} over {losses.tokens} trained tokens "
        f"= loss {float(losses.loss_sum) / losses.tokens:.3f}"
    )
    alone, start = 0.0, 0  # the boundaries' promise: the packed row's sum is the sum of its examples run alone
    for length in batch["seq_lengths"][0]:
        ids, labels = batch["input_ids"][:, start : start + length], batch["labels"][:, start : start + length]
        with torch.no_grad():
            alone += float(losses_of({"input_ids": ids}, labels).loss_sum)
        start += length
    print(f"the same examples run one by one: sum of token losses {alone:.2f}")

    stage("9. optimizer (sft/optim.py): AdamW over the adapters, a constant learning rate")
    optimizer = build_optimizer(model, "adamw_torch", learning_rate=1e-3, weight_decay=0.0)
    steps = 4
    schedule = build_schedule(optimizer, "constant", warmup=0, total=steps)
    trained_parameters = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    print(f"{trained_parameters:,} trained parameters, learning rate {schedule.get_last_lr()[0]}")

    stage("10. step (sft/step.py): micro-batches → backward → clip → optimizer.step(), the loop's own step")
    to_batch = functools.partial(
        collate, model=model, pad_token_id=tokenizer.pad_token_id, padding_free=False, pad_to_multiple_of=None,
        device=torch.device("cpu"),
    )  # fmt: skip
    held_out = tokenized(normalize_rows(demo_rows("test")), tokenizer)
    print(f"held-out loss before: {evaluate(model, held_out, to_batch, batch_size=4)['eval_loss']:.3f}")
    rows = list(packed.rows)
    for step in range(steps):
        micro_batches = [rows[(2 * step) % len(rows) : (2 * step) % len(rows) + 2]]  # 2 rows a step, one micro-batch
        tokens = count_trained_tokens_of(micro_batches[0])  # counted from the labels, before any tensor is built
        loss, _, _, grad_norm = train_step(model, micro_batches, tokens, to_batch, optimizer, schedule, 1.0)
        print(f"step {step + 1}: loss {loss:.3f} over {tokens} trained tokens, gradient norm {grad_norm:.2f}")
    print(f"held-out loss after: {evaluate(model, held_out, to_batch, batch_size=4)['eval_loss']:.3f}")
    print("python -m minisft.train runs these same stages, with the machinery around them (minisft/machinery/loop.py)")


if __name__ == "__main__":
    main()
