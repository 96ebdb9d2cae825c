"""What evaluation and gradient accumulation cost, measured on the loop's own functions (issue 18).

    python benchmarks/step_costs.py                      # CPU, the tiny Llama over SmolLM2's vocabulary, ~2 min
    python benchmarks/step_costs.py --model smollm2-135m # part 1 on SmolLM2-135M (parts 2 and 3 stay tiny)
    python benchmarks/step_costs.py --minisft ../old     # part 2 with another checkout's minisft (same command line)
    python benchmarks/step_costs.py --memory             # part 3 alone: live tensor bytes of train_step, ~4 min

1. Evaluation per token, against a training step per token. `minisft.sft.step.evaluate` runs under no_grad,
   and the loss then takes the plain formula (loss.plain_losses). The fused loss (what training runs)
   computes the head's gradients inside its forward, so evaluating with it would pay for them anyway:
   it is timed too, as "eval with the fused loss", to show what choosing the plain one saves.
2. Peak memory against --gradient_accumulation_steps. Each micro-batch is collated just before its
   forward pass, so what one step holds should not depend on how many micro-batches it has. Packed
   rows under eager attention make the effect easy to see: each micro-batch carries a dense
   (1, 1, L, L) fp32 mask, 4 MB at L = 1024, which a loop collating the whole step first would hold
   `accumulation` times. Each accumulation count runs `python -m minisft.train` in its own process (peak
   RSS is per process) on the same data, 3 steps, one row per micro-batch. RSS carries the allocator's
   slack and the machine's noise, larger here than the effect: part 3 is the measurement to read.
3. (--memory) The same question, answered exactly: the peak of live tensor bytes during one
   `minisft.sft.step.train_step`, from the profiler's allocation events (torch.profiler, profile_memory=True:
   the running sum of their sizes in time order, above what was live when the step began). Two variants
   of the same step over one packed row repeated `accumulation` times: "one at a time", train_step as the
   loop calls it, and "collated ahead", the loop before this change (commit 7b15111), simulated by
   collating every micro-batch first and handing train_step a collate_fn that returns them in turn. Under
   eager attention (a dense mask per micro-batch) and sdpa per example (no mask). The difference per extra
   micro-batch is checked against the bytes of one collated micro-batch, counted by formula and measured.

Output: a table and a JSON file (--out). Timings drift on a shared machine; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from packing_throughput import TINY_SHAPE, synthetic_conversations, write_jsonl  # noqa: E402


def step_parts(model) -> tuple:
    """What train_step takes beside the batches: fused AdamW (lr 1e-5, no decay) and a constant schedule."""
    from minisft.sft.optim import build_optimizer, build_schedule

    optimizer = build_optimizer(model, "adamw_torch_fused", 1e-5, 0.0)
    return optimizer, build_schedule(optimizer, "constant", 0, 1000)


def eval_costs(repeats: int, model_name: str) -> dict:
    """Seconds per trained token: a training step (minisft.sft.step.train_step over the rows, forward, fused loss,
    backward, clipping and AdamW), evaluation (plain loss), evaluation with the fused loss."""
    from minisft.machinery.config import DataConfig
    from minisft.machinery.models import load_model, load_tokenizer, tiny_model
    from minisft.machinery.pack_plans import pack_prepared
    from minisft.machinery.prepare import prepare_dataset
    from minisft.sft import loss as loss_module
    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.batches import collate
    from minisft.sft.labels import count_trained_tokens_of
    from minisft.sft.step import model_losses, train_step

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model(tokenizer, **TINY_SHAPE) if model_name == "tiny" else load_model("smollm2-135m-instruct")
    use_sdpa_by_example(model)
    examples = prepare_dataset(synthetic_conversations(64, seed=0), tokenizer, DataConfig(max_length=1024)).examples
    rows = list(pack_prepared(examples, 1024, "bfd").rows)[:8]
    batches = [collate([row], model, tokenizer.pad_token_id, False, None, torch.device("cpu")) for row in rows]
    tokens = count_trained_tokens_of(rows)
    optimizer, schedule = step_parts(model)

    def timed(work) -> float:
        work()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = work()
            best = min(best, (time.perf_counter() - start) / tokens)
        return best

    collated = {id(row): batch for row, batch in zip(rows, batches)}  # collated once, outside the timing

    def training() -> int:  # one optimizer step over the rows, one micro-batch each: the loop's train_step
        micro_batches = [[row] for row in rows]
        train_step(model, micro_batches, tokens, lambda units: collated[id(units[0])], optimizer, schedule, 1.0)
        return tokens

    def evaluation() -> int:
        with torch.no_grad():
            return sum(model_losses(model, batch).tokens for batch in batches)

    def evaluation_fused() -> int:
        plain = loss_module.plain_losses
        context = type("Context", (), {"needs_input_grad": (True, True), "save_for_backward": lambda *a: None})()
        fused_chunk = loss_module.CHUNK_TOKENS["cpu"]  # the fused loss at its own chunk size, as training runs it
        loss_module.plain_losses = lambda hidden, weight, targets, softcap, chunk, metrics: (
            loss_module.ChunkedLinearCrossEntropy.forward(
                context, hidden, weight, targets, softcap, fused_chunk, metrics
            )
        )
        try:
            return evaluation()
        finally:
            loss_module.plain_losses = plain

    figures = {"train_step": timed(training), "eval": timed(evaluation), "eval_fused_loss": timed(evaluation_fused)}
    return {name: seconds * 1e6 for name, seconds in figures.items()}  # microseconds per trained token


def accumulation_memory(counts: list[int], minisft_path: Path, work: Path) -> dict:
    """Peak RSS (MB) of a 3-step packed run under eager attention, for each --gradient_accumulation_steps."""
    from minisft.machinery.models import load_tokenizer, tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model_dir = work / "model"
    tiny_model(tokenizer, **TINY_SHAPE).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = work / "train.jsonl"
    write_jsonl(data, synthetic_conversations(3 * max(counts) * 8, seed=1))
    figures = {}
    for count in counts:
        output_dir = work / f"run-{count}"
        command = [
            sys.executable, "-m", "minisft.train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
            "--output_dir", str(output_dir), "--packing", "--max_length", "1024", "--attn_implementation", "eager",
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(count), "--max_steps", "3",
            "--logging_steps", "3", "--save_strategy", "no", "--use_peft", "false",
        ]  # fmt: skip
        environment = {**os.environ, "PYTHONPATH": str(minisft_path)}
        subprocess.run(command, check=True, env=environment, capture_output=True, text=True)
        records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        figures[count] = max(record["peak_memory_mb"] for record in records if "peak_memory_mb" in record)
    return figures


def live_bytes(work) -> tuple[int, int, object]:
    """(peak, end, work()): live CPU tensor bytes while work() runs, above those live when it began.

    The profiler records every allocation (+size) and free (−size) of a tensor allocated inside the window;
    frees of tensors older than the window count 0. The allocator's slack and non-tensor memory are not in it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = work()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):  # stable: ties keep the recorded order
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live, result


def step_memory(counts: list[int], length: int) -> dict:
    """Peak live tensor bytes of one train_step by accumulation count, micro-batches collated one at a time
    (the loop) or all ahead (the loop at commit 7b15111), under eager attention and sdpa per example."""
    import functools

    from minisft.machinery.config import DataConfig
    from minisft.machinery.models import load_tokenizer, tiny_model
    from minisft.machinery.pack_plans import pack_prepared
    from minisft.machinery.prepare import prepare_dataset
    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.batches import collate
    from minisft.sft.labels import count_trained_tokens_of
    from minisft.sft.step import train_step

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    examples = prepare_dataset(synthetic_conversations(64, seed=0), tokenizer, DataConfig(max_length=length)).examples
    row = max(pack_prepared(examples, length, "bfd").rows, key=lambda row: len(row["input_ids"]))
    width, documents = len(row["input_ids"]), len(row["seq_lengths"])
    trained = count_trained_tokens_of([row])
    figures = {"row": {"length": width, "examples": documents, "trained_tokens": trained}}
    for implementation in ("eager", "sdpa"):
        model = tiny_model(tokenizer, **TINY_SHAPE, attn_implementation=implementation)
        use_sdpa_by_example(model)  # sdpa → sdpa per example, as the loop runs packed rows; eager stays
        optimizer, schedule = step_parts(model)
        collate_fn = functools.partial(
            collate, model=model, pad_token_id=tokenizer.pad_token_id, padding_free=False, pad_to_multiple_of=None,
            device=torch.device("cpu"),
        )  # fmt: skip

        def step(count: int, ahead: bool) -> None:
            micro_batches = [[row]] * count
            step_collate = collate_fn
            if ahead:  # the old loop: the whole step's micro-batches collated before the first forward pass
                batches = [collate_fn(units) for units in micro_batches]
                pending = iter(batches)
                step_collate = lambda units: next(pending)  # noqa: E731
            train_step(model, micro_batches, trained * count, step_collate, optimizer, schedule, 1.0)

        step(1, ahead=False)  # the optimizer's state is created here, outside the measured steps
        _, batch_bytes, _ = live_bytes(lambda: collate_fn([row]))  # what one collated micro-batch holds
        if implementation == "eager":  # the (1, 1, L, L) mask in the model's dtype, ids, labels and positions
            formula = width * width * model.dtype.itemsize + 3 * width * 8
        else:  # the flattened ids, labels and positions, and the examples' boundaries (int32)
            formula = 3 * width * 8 + 4 * (documents + 1)
        peaks = {"one_at_a_time": {}, "collated_ahead": {}}
        for count in counts:
            for variant, ahead in (("one_at_a_time", False), ("collated_ahead", True)):
                peaks[variant][count] = live_bytes(lambda: step(count, ahead))[0]
        later = [count for count in counts if count >= 2]  # from 1 to 2 the gradients start living across passes
        per_extra = {
            variant: (by_count[later[-1]] - by_count[later[0]]) / (later[-1] - later[0])
            for variant, by_count in peaks.items()
        }
        figures[implementation] = {
            "collated_micro_batch_bytes": {"formula": formula, "measured": batch_bytes},
            "peak_live_bytes": peaks,
            "per_extra_micro_batch_bytes": {"counts": [later[0], later[-1]], **per_extra},
        }
    return figures


def print_step_memory(figures: dict) -> None:
    mib = 2**20
    row = figures["row"]
    print(f"one packed row of {row['length']} tokens ({row['examples']} examples) per micro-batch; MiB = 2^20 bytes")
    for implementation in ("eager", "sdpa"):
        entry = figures[implementation]
        batch = entry["collated_micro_batch_bytes"]
        print(
            f"{implementation}: one collated micro-batch {batch['measured']:,} bytes measured, "
            f"{batch['formula']:,} by formula ({batch['measured'] / mib:.3f} MiB)"
        )
        peaks = entry["peak_live_bytes"]
        for count in peaks["one_at_a_time"]:
            one, ahead = peaks["one_at_a_time"][count], peaks["collated_ahead"][count]
            print(
                f"  accumulation {count:>3}: one at a time {one / mib:8.2f} MiB, collated ahead {ahead / mib:8.2f} MiB "
                f"(+{(ahead - one) / mib:.2f})"
            )
        extra = entry["per_extra_micro_batch_bytes"]
        print(
            f"  per extra micro-batch ({extra['counts'][0]} to {extra['counts'][1]}): one at a time "
            f"{extra['one_at_a_time']:,.0f} bytes, collated ahead {extra['collated_ahead']:,.0f} bytes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minisft",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="checkout whose python -m minisft.train part 2 runs",
    )
    parser.add_argument(
        "--memory", action="store_true", help="part 3 alone: live tensor bytes of train_step by accumulation"
    )
    parser.add_argument(
        "--accumulation", type=int, nargs="+", help="accumulation counts (default 1 4 16; --memory: 1 2 4 8 16)"
    )
    parser.add_argument("--row_length", type=int, default=1024, help="--memory: the packed row's length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model", default="tiny", choices=["tiny", "smollm2-135m"], help="part 1's model (parts 2 and 3: tiny)"
    )
    parser.add_argument("--out", type=Path, help="default results/cpu_step_costs.json (--memory: cpu_step_memory.json)")
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    torch.manual_seed(0)
    figures = {"minisft": str(args.minisft), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.memory:
        start = time.perf_counter()
        figures["step_memory"] = step_memory(args.accumulation or [1, 2, 4, 8, 16], args.row_length)
        figures["seconds"] = round(time.perf_counter() - start, 1)
        print_step_memory(figures["step_memory"])
        out = args.out or results / "cpu_step_memory.json"
    else:
        figures["model"] = args.model
        figures["microseconds_per_trained_token"] = eval_costs(args.repeats, args.model)
        with tempfile.TemporaryDirectory() as work:
            figures["peak_rss_mb_by_accumulation"] = accumulation_memory(
                args.accumulation or [1, 4, 16], args.minisft, Path(work)
            )
        costs = figures["microseconds_per_trained_token"]
        print(
            f"per trained token: train step {costs['train_step']:.1f} µs, eval {costs['eval']:.1f} µs "
            f"({costs['eval'] / costs['train_step']:.2f}× a step), eval with the fused loss "
            f"{costs['eval_fused_loss']:.1f} µs"
        )
        for count, megabytes in figures["peak_rss_mb_by_accumulation"].items():
            print(f"--gradient_accumulation_steps {count:>3}: peak RSS {megabytes:,.0f} MB")
        out = args.out or results / "cpu_step_costs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
