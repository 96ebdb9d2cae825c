"""How much memory does loading a model take, in full precision and quantized to 4 bits while it loads (QLoRA)?

    python benchmarks/load_memory.py                      # the embedded SmolLM2-135M-Instruct, 5 runs per mode
    python benchmarks/load_memory.py --model PATH --repeats 3 --json out.json

Each load runs in a fresh process, so one mode's allocations never count for another. On a CPU three figures are
taken: the peak of the process's resident memory (VmHWM, what an out-of-memory killer sees), the peak of its
anonymous memory (sampled every 2 ms: the memory that is the process's own, not the checkpoint file's pages that
the kernel maps in and can drop again), and the resident memory after one forward pass, when every weight has been
read at least once. On CUDA the figure is torch's peak allocated memory. The table gives the median of the runs and,
in brackets, the highest: glibc's allocator returns freed memory to the system late and unevenly, so one run can
peak hundreds of MB above another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

MODES = ("float32", "4bit-nf4")


def memory_status() -> dict[str, float]:
    """The process's memory figures from /proc/self/status, in MB."""
    figures = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                figures[key] = int(value.split()[0]) / 1024
    return figures


def measure(model: str, mode: str, device: str) -> dict:
    """Load `model` in `mode` in this process and report its memory (run in a child process by main)."""
    import torch

    from minisft.machinery.models import four_bit_quantization, load_model

    peak_anonymous, sampling = [memory_status()["RssAnon"]], [True]

    def sample():
        while sampling[0]:
            peak_anonymous[0] = max(peak_anonymous[0], memory_status()["RssAnon"])
            time.sleep(0.002)

    before = memory_status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    quantization = four_bit_quantization(torch.float32, "nf4", device=device) if mode == "4bit-nf4" else None
    loaded = load_model(model, dtype=torch.float32, quantization_config=quantization, device=device)
    seconds = time.perf_counter() - start
    after_load = memory_status()
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[1, 2, 3, 4]], device=device))
    after_forward = memory_status()
    sampling[0] = False
    sampler.join()
    weights = sum(tensor.numel() * tensor.element_size() for tensor in loaded.parameters()) / 2**20
    return {
        "mode": mode,
        "seconds": seconds,
        "weights_mb": weights,
        "before_mb": before["VmRSS"],
        "peak_rss_mb": after_forward["VmHWM"],
        "peak_anonymous_mb": peak_anonymous[0],
        "rss_after_load_mb": after_load["VmRSS"],
        "rss_after_forward_mb": after_forward["VmRSS"],
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="Also write every run's figures here.")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.device)))
        return

    from minisft.machinery.models import resolve_model_source

    model = resolve_model_source(args.model)  # the embedded model is converted once, before any timing
    runs = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so a slow minute of the shared machine hits both modes alike
            command = [sys.executable, __file__, "--model", model, "--device", args.device, "--child", mode]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1]))

    table = Table(title=f"Loading {args.model} on {args.device}: MB, median of {args.repeats} runs [highest]")
    columns = ["weights_mb", "peak_rss_mb", "peak_anonymous_mb", "rss_after_load_mb", "rss_after_forward_mb"]
    if args.device.startswith("cuda"):
        columns.append("cuda_peak_mb")
    for column in ["mode", *columns, "seconds"]:
        table.add_column(column.removesuffix("_mb").replace("_", " "), justify="right")
    for mode, measured in runs.items():
        cells = [
            f"{statistics.median(run[column] for run in measured):,.0f} [{max(run[column] for run in measured):,.0f}]"
            for column in columns
        ]
        table.add_row(mode, *cells, f"{statistics.median(run['seconds'] for run in measured):.1f}")
    Console().print(table)
    print(f"baseline (python, torch, transformers imported): {runs[MODES[0]][0]['before_mb']:,.0f} MB resident")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(runs, out, indent=2)


if __name__ == "__main__":
    main()
