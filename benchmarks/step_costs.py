"""What evaluation and gradient accumulation cost, measured on the loop's own functions (issue 18).

    python benchmarks/step_costs.py                      # CPU, the tiny Llama over SmolLM2's vocabulary, ~2 min
    python benchmarks/step_costs.py --minisft ../old     # part 2 with another checkout's minisft (same command line)

1. Evaluation per token, against a training step per token. `minisft.loop.evaluate` runs under no_grad,
   and the loss then takes the plain formula (loss.plain_losses). The fused loss (what training runs)
   computes the head's gradients inside its forward, so evaluating with it would pay for them anyway:
   it is timed too, as "eval with the fused loss", to show what choosing the plain one saves.
2. Peak memory against --gradient_accumulation_steps. Each micro-batch is collated just before its
   forward pass, so what one step holds should not depend on how many micro-batches it has. Packed
   rows under eager attention make the effect easy to see: each micro-batch carries a dense
   (1, 1, L, L) fp32 mask, 4 MB at L = 1024, which a loop collating the whole step first would hold
   `accumulation` times. Each accumulation count runs `python -m minisft.train` in its own process (peak
   RSS is per process) on the same data, 3 steps, one row per micro-batch.

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


def eval_costs(repeats: int) -> dict:
    """Seconds per trained token: a training step, evaluation (plain loss), evaluation with the fused loss."""
    from minisft import loss as loss_module
    from minisft.attention import use_sdpa_by_example
    from minisft.config import DataConfig
    from minisft.distributed import Processes, data_parallel
    from minisft.loop import collate, model_losses
    from minisft.models import load_tokenizer, tiny_model
    from minisft.packing import pack
    from minisft.prepare import prepare_dataset

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model(tokenizer, **TINY_SHAPE)
    use_sdpa_by_example(model)
    examples = prepare_dataset(synthetic_conversations(64, seed=0), tokenizer, DataConfig(), truncate=False).examples
    rows = list(pack(examples, 1024, "bfd").rows)[:8]
    parallel = data_parallel(model, Processes(), fsdp=False)
    batches = [collate([row], model, tokenizer.pad_token_id, False, None, torch.device("cpu")) for row in rows]

    def timed(work) -> float:
        work()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = work()
            best = min(best, (time.perf_counter() - start) / tokens)
        return best

    def training() -> int:
        tokens = 0
        for batch in batches:
            losses = model_losses(model, batch, parallel)
            losses.loss_sum.backward()
            tokens += losses.tokens
        model.zero_grad(set_to_none=True)
        return tokens

    def evaluation() -> int:
        with torch.no_grad():
            return sum(model_losses(model, batch, parallel).tokens for batch in batches)

    def evaluation_fused() -> int:
        plain = loss_module.plain_losses
        loss_module.plain_losses = lambda *args: loss_module.ChunkedLinearCrossEntropy.forward(
            type("Context", (), {"needs_input_grad": (True, True), "save_for_backward": lambda *a: None})(), *args
        )
        try:
            return evaluation()
        finally:
            loss_module.plain_losses = plain

    figures = {"train_step": timed(training), "eval": timed(evaluation), "eval_fused_loss": timed(evaluation_fused)}
    return {name: seconds * 1e6 for name, seconds in figures.items()}  # microseconds per trained token


def accumulation_memory(counts: list[int], minisft_path: Path, work: Path) -> dict:
    """Peak RSS (MB) of a 3-step packed run under eager attention, for each --gradient_accumulation_steps."""
    from minisft.models import load_tokenizer, tiny_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minisft",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="checkout whose python -m minisft.train part 2 runs",
    )
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_step_costs.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    figures = {"minisft": str(args.minisft), "torch": torch.__version__, "threads": torch.get_num_threads()}
    figures["microseconds_per_trained_token"] = eval_costs(args.repeats)
    with tempfile.TemporaryDirectory() as work:
        figures["peak_rss_mb_by_accumulation"] = accumulation_memory(args.accumulation, args.minisft, Path(work))
    costs = figures["microseconds_per_trained_token"]
    print(
        f"per trained token: train step {costs['train_step']:.1f} µs, eval {costs['eval']:.1f} µs "
        f"({costs['eval'] / costs['train_step']:.2f}× a step), eval with the fused loss "
        f"{costs['eval_fused_loss']:.1f} µs"
    )
    for count, megabytes in figures["peak_rss_mb_by_accumulation"].items():
        print(f"--gradient_accumulation_steps {count:>3}: peak RSS {megabytes:,.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
