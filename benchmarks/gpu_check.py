"""The GPU check: the CUDA paths no session has run yet, in one script for the first machine with an NVIDIA GPU.

    bash benchmarks/gpu_check.sh              # a GPU machine after ./install.sh --test: under 8 minutes
    bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU with the tiny model, about a minute (CI)

Every step runs in its own process (a crashing kernel fails its step, not the check), is recorded as ok, failed
or skipped with its figures, and ends up in one table and in one folder (--out, default
benchmarks/results/gpu_check[_dry_run]/): check.json with every figure, and each step's output log.

    environment   the GPU, its memory, torch, CUDA, bitsandbytes, flash-attn, bf16 support
    cuda tests    the tests marked cuda, which skip without a GPU (flash attention's boundaries, fp16's scaler)
    attention     for sdpa, eager, flex_attention and flash_attention_2 (when flash-attn is installed): the logits
                  of three examples packed in one row against each example run alone, under bf16 autocast, then
                  a 5-step bf16 training run of SmolLM2-135M through minisft.machinery.loop.train with that
                  implementation
    4-bit         benchmarks/load_memory.py: the model's memory loaded in float32 and quantized while loading
    benchmark     benchmarks/packing_throughput.py --device cuda: minisft bfd and TRL packed, tokens/s and MFU

The dry run uses the tiny model and the CPU (fp32, no autocast), skips what needs CUDA, and runs the benchmark
with two steps of minisft's bfd mode only: it checks the wiring, not the GPU.
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

ROOT = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")
TEXTS = [
    "Hello world, this is the first example of the row.",
    "Second one is short.",
    "微调测试 我学会了: the third example, with Chinese and English, a little longer than the others are.",
]


def environment() -> dict:
    import torch

    figures = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "python": sys.version.split()[0],
    }
    for package in ("transformers", "bitsandbytes", "flash_attn", "trl", "peft"):
        try:
            figures[package] = __import__(package).__version__
        except Exception as error:  # an absent or broken package is a figure here, not a failure
            figures[package] = f"not available ({type(error).__name__})"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        figures |= {
            "gpu": properties.name,
            "gpu_memory_gb": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return figures


def attention(implementation: str, model_dir: str, device: str, work: Path) -> dict:
    """Packed rows against examples alone, then a short training run, with one attention implementation."""
    import torch

    from minisft.machinery.cli import demo_dataset_path
    from minisft.machinery.config import DataConfig, LoraConfig, ModelConfig, PackingConfig, RunConfig, TrainingConfig
    from minisft.machinery.loop import train
    from minisft.machinery.models import load_model, load_tokenizer
    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.batches import collate_rows, packed_inputs
    from minisft.sft.packing import make_row

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, attn_implementation=implementation, device=device).eval()
    use_sdpa_by_example(model)
    examples = [tokenizer(text)["input_ids"] for text in TEXTS]
    batch = collate_rows([make_row([(ids, ids) for ids in examples])], tokenizer.pad_token_id)
    inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.no_grad(), autocast:
        packed = model(**packed_inputs(inputs, model)[0]).logits[0].float()
        gap, start = 0.0, 0
        for ids in examples:
            alone = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
            gap = max(gap, (packed[start : start + len(ids)] - alone).abs().max().item())
            start += len(ids)
    # fp32 on the CPU: a few ulps (tests/test_attention.py measures 3.6e-7). bf16 autocast: ~6 bf16 ulps of logits
    # of magnitude ~1-10. Examples that see each other differ by ~0.7 (the test's negative control).
    bound = 5e-2 if device == "cuda" else 1e-5

    figures = {"packed_vs_alone_max_logit_gap": gap, "bound": bound, "ok": gap <= bound}
    if device == "cpu" and implementation == "flex_attention":
        return figures | {"training": "skipped: FlexAttention has no backward pass on the CPU"}
    output_dir = work / f"run-{implementation}"
    result = train(
        RunConfig(
            model=ModelConfig(model_name_or_path=model_dir, attn_implementation=implementation),
            data=DataConfig(dataset_name=str(demo_dataset_path()), max_length=512),
            packing=PackingConfig(packing=True),
            lora=LoraConfig(),
            training=TrainingConfig(
                output_dir=str(output_dir), max_steps=5, logging_steps=1, save_steps=0, learning_rate=1e-4
            ),
        )
    )
    last = result.metrics
    finite = last.get("loss") is not None and last["loss"] == last["loss"]  # NaN != NaN
    return figures | {
        "ok": figures["ok"] and finite,
        "loss": last.get("loss"),
        "tokens_per_second": last.get("tokens_per_second"),
        "peak_memory_mb": last.get("peak_memory_mb"),
    }


def shown_value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_step(name: str, command: list[str], out: Path, timeout: int) -> dict:
    """Run one step in a child process; its log goes to out/<name>.log, its figures come back as JSON lines."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        (out / f"{name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        figures = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
        status = "ok" if done.returncode == 0 and figures.get("ok", True) else "failed"
        if done.returncode != 0:
            figures = {"returncode": done.returncode, "last_lines": (done.stdout + done.stderr).splitlines()[-5:]}
    except subprocess.TimeoutExpired:
        status, figures = "failed", {"timeout_s": timeout}
    except (json.JSONDecodeError, IndexError):
        status, figures = "ok", {}  # a step that prints a table rather than JSON: its log holds the figures
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1), **figures}


def pytest_step(out: Path, dry_run: bool) -> dict:
    """The tests that skip without a GPU. Without one they are all reported as skipped."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    (out / "cuda_tests.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    # pytest exits 0 when everything passed or was skipped, 5 when nothing was collected.
    status = "failed" if done.returncode not in (0, 5) else "ok" if "passed" in summary else "skipped"
    seconds = round(time.perf_counter() - started, 1)
    return {"step": "cuda tests", "status": status, "seconds": seconds, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU and the tiny model: checks the wiring")
    parser.add_argument("--out", help="the folder for check.json and the logs")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child process: one step
    parser.add_argument("--implementation", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"

    if args.step == "environment":
        print(json.dumps(environment()))
        return
    if args.step == "attention":
        print(json.dumps(attention(args.implementation, args.model_dir, device, Path(args.work))))
        return

    out = Path(args.out or ROOT / "benchmarks" / "results" / ("gpu_check_dry_run" if args.dry_run else "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("check.json", "load_memory.json", "packing_throughput.json"):  # an earlier run's figures
        (out / stale).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    me = [sys.executable, str(Path(__file__).resolve())] + (["--dry-run"] if args.dry_run else [])
    steps = [run_step("environment", me + ["--step", "environment"], out, 120)]
    env = {key: value for key, value in steps[0].items() if key not in ("step", "status", "seconds")}
    if not args.dry_run and not env.get("cuda_available"):
        sys.exit("gpu_check: no CUDA GPU is visible here; run with --dry-run to check the wiring on the CPU.")

    steps.append(pytest_step(out, args.dry_run))

    if args.dry_run:
        from minisft.machinery.models import load_tokenizer, tiny_model

        tokenizer = load_tokenizer("smollm2-135m-instruct")
        model_dir = str(work / "tiny")
        tiny_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    else:
        from minisft.machinery.models import resolve_model_source

        model_dir = resolve_model_source("smollm2-135m-instruct")  # converted from the GGUF once, before timing
    for implementation in IMPLEMENTATIONS:
        name = f"attention {implementation}"
        if implementation == "flash_attention_2" and (args.dry_run or "not available" in str(env.get("flash_attn"))):
            steps.append({"step": name, "status": "skipped", "reason": "needs CUDA and the flash-attn package"})
            continue
        command = me + ["--step", "attention", "--implementation", implementation, "--model_dir", model_dir]
        steps.append(run_step(name, command + ["--work", str(work)], out, 300))

    memory = [sys.executable, "benchmarks/load_memory.py", "--model", model_dir, "--device", device]
    memory += ["--repeats", "1", "--json", str(out / "load_memory.json")]
    steps.append(run_step("4-bit loading", memory, out, 300))
    if (out / "load_memory.json").is_file():
        for mode, runs in json.loads((out / "load_memory.json").read_text()).items():
            peak = runs[0]["cuda_peak_mb"] if device == "cuda" else runs[0]["peak_anonymous_mb"]
            steps[-1][f"{mode} {'cuda peak' if device == 'cuda' else 'peak anonymous'} MB"] = round(peak)

    benchmark = [sys.executable, "benchmarks/packing_throughput.py", "--device", device, "--repeats", "1"]
    benchmark += ["--output", str(out / "packing_throughput")]
    if args.dry_run:
        benchmark += ["--model", "tiny", "--steps", "2", "--modes", "minisft_bfd", "--examples_per_step", "2"]
        benchmark += ["--max_length", "256", "--held_out", "2"]
    else:
        benchmark += ["--steps", "5", "--modes", "minisft_bfd", "trl_packed"]
    steps.append(run_step("benchmark", benchmark, out, 420))
    if (out / "packing_throughput.json").is_file():
        for mode, figures in json.loads((out / "packing_throughput.json").read_text())["modes"].items():
            median = figures["median"]
            steps[-1][f"{mode} tok/s"] = round(median["trained_tokens_per_second"], 1)
            steps[-1][f"{mode} MFU"] = round(median["mfu"], 3)

    report = {"dry_run": args.dry_run, "environment": env, "steps": steps}
    (out / "check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"gpu_check{' --dry-run' if args.dry_run else ''}: {env.get('gpu', 'CPU')}, torch {env['torch']}"
    )
    for column in ("step", "status", "seconds", "figures"):
        table.add_column(column)
    for step in steps:
        figures = {key: value for key, value in step.items() if key not in ("step", "status", "seconds", "ok")}
        if step["step"] == "environment":
            figures = {}
        shown = ", ".join(
            f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}" for key, value in figures.items()
        )
        table.add_row(step["step"], step["status"], str(step.get("seconds", "")), shown[:200])
    Console(width=160).print(table)
    print(f"written: {out / 'check.json'} and the steps' logs beside it")
    sys.exit(1 if any(step["status"] == "failed" for step in steps) else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
