"""A warm start: how long from the command to the first step's data, when the data preparation is already cached.

    python benchmarks/warm_start.py                  # tiny random model, 10 conversations, median of 3
    python benchmarks/warm_start.py --model smollm2-135m-instruct --repeats 5

Each measurement is a fresh Python process, timed from just before it is started, as `python -m minisft.train
--max_steps 1` is (the same main(), the same flags). Two figures per process:

- import: `import minisft.train` alone, inside the process (what every run pays before it reads a flag);
- first step's data: from the parent's launch of the process to the loop's `train_begin` event (the model is
  loaded, the data prepared, or read from the cache, and packed: the next thing is the first step), and to the
  first `step_end` beside it.

Beside them, the floor: a process that only imports torch and transformers and loads the same model and tokenizer
with transformers' Auto classes (what any transformers-based trainer pays before its first step), timed the same way.

The first process prepares the data (cold) and is not counted; the others reuse its cache (warm). The cache lives
in a temporary folder (MINISFT_CACHE) whose embedded model is a link to the usual one, so nothing of the user's
cache changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "warm_start.json"

# Run in the child: `python -m minisft.train` with the loop's events timed (wall clock, as the parent's).
CHILD = """
import json, sys, time
started = time.time()
import minisft.train as cli
imported = time.time()
from minisft.machinery import loop
marks = {"import_s": imported - started}

def train_timed(config, console=None, **given):
    def on_event(event, **info):
        if event in ("train_begin", "step_end") and event not in marks:
            marks[event] = time.time()
    return loop.train(config, console, on_event=on_event, **given)

cli.train = train_timed
try:
    cli.main(sys.argv[1:])
finally:
    print("WARM_START " + json.dumps(marks), file=sys.stderr)
"""

# Run in the child: the floor, transformers alone loading the same model and tokenizer.
FLOOR = """
import sys, time
started = time.time()
import torch
torch_imported = time.time()
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa")
AutoTokenizer.from_pretrained(sys.argv[1])
print(f"FLOOR {torch_imported - started} {time.time()}", file=sys.stderr)
"""


def tiny_model_dir(folder: Path) -> tuple[str, str]:
    """tests/conftest.py's tiny_dir: a tiny random Llama with the real SmolLM2 tokenizer, and ten conversations."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from minisft.machinery.models import load_tokenizer, tiny_model
    from tests.tiny_runs import data_file_of, write_conversations

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tiny_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    write_conversations(data_file_of(folder / "model"))
    return str(folder / "model"), str(data_file_of(folder / "model"))


def one_run(model: str, data: str, output_dir: Path, env: dict) -> dict:
    flags = ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(output_dir)]
    flags += ["--max_steps", "1", "--save_steps", "0"]
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, *flags], env=env, capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.startswith("WARM_START ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    marks = json.loads(lines[-1].removeprefix("WARM_START "))
    floor = floor_run(model)
    return {
        "import_s": marks["import_s"],
        "first_step_data_s": marks["train_begin"] - launched,
        "first_step_end_s": marks["step_end"] - launched,
        **floor,
    }


def floor_run(model: str) -> dict:
    from minisft.machinery.models import resolve_model_source  # the embedded model's name to its folder

    launched = time.time()
    done = subprocess.run([sys.executable, "-c", FLOOR, resolve_model_source(model)], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.startswith("FLOOR ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"the floor run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    torch_s, loaded = map(float, lines[-1].split()[1:])
    return {"floor_import_torch_s": torch_s, "floor_model_loaded_s": loaded - launched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder or name (default: a tiny random model, as the tests')")
    parser.add_argument("--data", help="a JSONL file of conversations (default: the tiny model's ten)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        cache.mkdir()
        from minisft.machinery.models import cache_root

        for entry in cache_root().iterdir():  # the converted embedded model, without its data preparations
            if entry.name != "prepared":
                (cache / entry.name).symlink_to(entry)
        model, data = tiny_model_dir(scratch) if args.model is None else (args.model, args.data)
        if data is None:
            sys.exit("--data is needed with --model")
        env = {**os.environ, "MINISFT_CACHE": str(cache)}
        cold = one_run(model, data, scratch / "out0", env)
        warm = [one_run(model, data, scratch / f"out{i + 1}", env) for i in range(args.repeats)]
    medians = {key: statistics.median(run[key] for run in warm) for key in warm[0]}
    results = {
        "model": args.model or "tiny random Llama (tests/conftest.py)",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "cold": cold,
        "warm": warm,
        "warm_median": medians,
    }
    print(f"{'warm, median of ' + str(args.repeats):<24} {'seconds':>8}")
    print(f"{'import minisft.train':<24} {medians['import_s']:>8.2f}")
    print(f"{'first step data':<24} {medians['first_step_data_s']:>8.2f}   (target: 2.00)")
    print(f"{'first step done':<24} {medians['first_step_end_s']:>8.2f}")
    print(f"{'floor: import torch':<24} {medians['floor_import_torch_s']:>8.2f}")
    print(f"{'floor: model+tokenizer':<24} {medians['floor_model_loaded_s']:>8.2f}   (torch + transformers alone)")
    print(f"(cold run, not counted: first step data at {cold['first_step_data_s']:.2f} s)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
