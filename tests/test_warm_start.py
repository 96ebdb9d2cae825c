"""A warm run stays light: the packages only some runs need are imported by those runs alone.

A warm run (the data preparation cached) spends nearly all its time before the first step importing torch and
transformers (benchmarks/warm_start.py). Each package below costs a further 0.2-1.3 s to import on a 2-core CPU
(measured after torch and transformers), and only some runs use it: datasets and pyarrow read hub datasets and
parquet (machinery/data_files.py), bitsandbytes is QLoRA's (machinery/extras.py), tensorboard a --report_to tracker
(machinery/reporting.py), matplotlib `python -m minisft.plot`'s, gguf the embedded model's one-time conversion; pandas
comes with datasets; peft and trl are what minisft replaces. Imported at a module's top, any of them would be paid
by every run. The check runs in a fresh process, since the test's own process has imported most of them.
"""

import io
import json
import os
import subprocess
import sys

from rich.console import Console

from minisft.machinery.loop import train

from .tiny_runs import data_file_of, run_config

LAZY = ["datasets", "pyarrow", "pandas", "bitsandbytes", "peft", "trl", "torch.utils.tensorboard", "matplotlib", "gguf"]

# `python -m minisft.train`, reporting which of LAZY are imported: after `import minisft.train`, and when the loop
# is about to take its first step (its train_begin event: model loaded, data read from the cache and packed).
CHILD = """
import json, sys
LAZY = json.loads(sys.argv[1])
loaded = lambda: [name for name in LAZY if name in sys.modules]
import minisft.train as cli
from minisft.machinery import loop
seen = {"import": loaded()}

def train_watched(config, console=None, **given):
    def on_event(event, **info):
        if event == "train_begin":
            seen["train_begin"] = loaded()
    return loop.train(config, console, on_event=on_event, **given)

cli.train = train_watched
cli.main(sys.argv[2:])
print("SEEN " + json.dumps(seen), file=sys.stderr)
"""


def test_a_warm_run_imports_none_of_the_packages_only_some_runs_need(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISFT_CACHE", str(tmp_path / "cache"))
    train(run_config(tiny_dir, tmp_path / "cold", max_steps=1), Console(file=io.StringIO()))  # fills the cache
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir)), "--max_length", "256"]
    flags += ["--output_dir", str(tmp_path / "warm"), "--max_steps", "1", "--save_steps", "0"]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(LAZY), *flags],
        capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    assert "data: reused the preparation cached in" in child.stderr  # the warm path, not a fresh preparation
    report = next(line for line in child.stderr.splitlines() if line.startswith("SEEN "))
    seen = json.loads(report.removeprefix("SEEN "))
    assert seen == {"import": [], "train_begin": []}
