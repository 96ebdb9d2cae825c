"""Data preparation at scale: minisft (cold and warm cache, 1 and 2 processes) against TRL's SFTTrainer.

    python benchmarks/prepare_speed.py --conversations 40000             # the comparison, TRL included
    python benchmarks/prepare_speed.py --conversations 1000000 --no-trl --processes 2  # a million

Each measurement runs in a process of its own (its peak RSS is its own, imports included):

- minisft: load_and_prepare + pack (bfd, max_length 1024), the data side of `python -m
  minisft.train` up to its first step; cold with an empty cache, warm with the cache it left;
- TRL 1.16: SFTTrainer constructed over datasets.load_dataset("json") with packing (bfd) on a
  tiny model: its whole data preparation; warm reuses datasets' Arrow cache.

The data are synthetic conversations of SmolLM2's chat template: 1 to 3 turns, lognormal
lengths (median ~180 tokens), written once as JSONL. Timings on a shared machine are noisy:
compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the model learns to answer questions about data files tokens memory cache speed and more".split()


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(count):
            messages = []
            for _ in range(rng.randint(1, 3)):
                question = " ".join(rng.choices(WORDS, k=max(3, int(rng.lognormvariate(3.0, 0.6)))))
                answer = " ".join(rng.choices(WORDS, k=max(3, int(rng.lognormvariate(4.2, 0.8)))))
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            file.write(json.dumps({"messages": messages}) + "\n")


def run_minisft(data: Path, cache_dir: Path, processes: int) -> dict:
    from minisft.machinery.config import DataConfig, PackingConfig
    from minisft.machinery.models import load_tokenizer
    from minisft.machinery.pack_plans import pack_prepared
    from minisft.machinery.prepare import load_and_prepare

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    start = time.perf_counter()
    config = DataConfig(dataset_name=str(data), max_length=1024, cache_dir=str(cache_dir), dataset_num_proc=processes)
    splits = load_and_prepare(str(data), tokenizer, config, PackingConfig(packing=True))
    packed = pack_prepared(splits.train.examples, 1024, "bfd")
    first_row = packed.rows[0]  # the first step's data, read from the storage
    return {
        "seconds": time.perf_counter() - start,
        "rows": packed.stats.rows,
        "tokens": packed.stats.tokens,
        "first_row_tokens": len(first_row["input_ids"]),
        "note": splits.cache_note,
    }


def run_trl(data: Path, cache_dir: Path) -> dict:
    import datasets
    import trl

    from minisft.machinery.models import load_tokenizer, tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache_dir))
    with tempfile.TemporaryDirectory() as output_dir:
        args = trl.SFTConfig(
            output_dir=output_dir, report_to="none", use_cpu=True, max_length=1024, packing=True,
            packing_strategy="bfd", dataset_num_proc=None,
        )  # fmt: skip
        model = tiny_model(tokenizer)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return {"seconds": time.perf_counter() - start, "rows": len(trainer.train_dataset)}


def measure(mode: str, data: Path, cache_dir: Path) -> dict:
    """Run one mode in a child process; its result and its peak RSS."""
    command = [sys.executable, __file__, "--child", mode, "--data", str(data), "--cache", str(cache_dir)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def child(mode: str, data: Path, cache_dir: Path) -> None:
    if mode.startswith("trl"):
        result = run_trl(data, cache_dir)
    else:
        result = run_minisft(data, cache_dir, processes=int(mode.rsplit("-", 1)[1]))
    # this process's peak plus its largest worker's (forked workers share pages, so this overcounts a little)
    usage = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak_kb = sum(usage)
    result["peak_rss_mb"] = peak_kb / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=40_000)
    parser.add_argument("--no-trl", action="store_true", help="minisft only (the million-conversation run)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="minisft's --dataset_num_proc runs")
    parser.add_argument("--child")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.cache)
        return
    work = Path(tempfile.mkdtemp(prefix="prepare-speed-"))
    try:
        data = work / "conversations.jsonl"
        write_conversations(data, args.conversations)
        print(f"{args.conversations:,} conversations, {data.stat().st_size / 1e6:.0f} MB of JSONL", flush=True)
        results = {}
        for processes in args.processes:
            cache_dir = work / f"cache-{processes}"
            results[f"minisft cold, {processes} process(es)"] = measure(f"minisft-{processes}", data, cache_dir)
        warm = args.processes[0]
        results["minisft warm"] = measure(f"minisft-{warm}", data, work / f"cache-{warm}")
        if not args.no_trl:
            results["TRL cold"] = measure("trl-cold", data, work / "trl-cache")
            results["TRL warm"] = measure("trl-warm", data, work / "trl-cache")
        report(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict) -> None:
    base = results.get("TRL cold") or next(iter(results.values()))
    base_name = "TRL cold" if "TRL cold" in results else next(iter(results))
    print(f"| | time | peak RSS | rows | time / {base_name} | RSS / {base_name} |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {result['seconds']:.1f} s | {result['peak_rss_mb']:,.0f} MB | {result['rows']:,} | "
            f"{result['seconds'] / base['seconds']:.2f} | {result['peak_rss_mb'] / base['peak_rss_mb']:.2f} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
