"""Where one training step's peak memory goes (CPU, peak RSS), and what each remedy costs in tokens/s.

    python benchmarks/memory_profile.py                                   # SmolLM2-135M, every variant, ~6 min
    python benchmarks/memory_profile.py --model tiny --variants baseline checkpointing

The job is the packing benchmark's packed mode (benchmarks/packing_throughput.py, minisft_bfd): the same
synthetic conversations, best-fit-decreasing rows of max_length, one row per micro-batch, AdamW (fused, lr 1e-3),
clipping at 1.0, fp32. Each variant runs in its own process, so each peak is that process's alone.

The step is minisft.sft.step.train_step itself; hooks on the model, its collate function and the optimizer mark
where each phase begins, so that a sampler thread can name the phase each resident-memory sample falls in.
Two kinds of figures:
    resident (RSS)  /proc/self/statm sampled every millisecond: the peak of each phase, and the process's
                    peak (VmHWM), which is what the throughput benchmark and the loop report
    accounted       what the step holds, by tensor: weights, gradients and AdamW's two moments (their sizes),
                    and the activations autograd saves for backward, counted by a saved_tensors_hooks pack
                    function once per storage (parameters left out), by where they were saved: the decoder
                    layers, or the loss (minisft/sft/loss.py's fused head saves ∂loss/∂h and ∂loss/∂W)
Variants (the remedies; each changes one thing):
    baseline        minisft as it is
    checkpointing   per-layer activation checkpointing: model.gradient_checkpointing_enable (HF, non-reentrant);
                    each layer keeps its input and recomputes the rest in backward
    loss_in_place   the fused loss's backward scales its saved ∂loss/∂h and ∂loss/∂W in place and hands them
                    on, instead of allocating scaled copies (a monkeypatch of ChunkedLinearCrossEntropy.backward:
                    the change proposed for minisft/sft/loss.py)
    malloc_fixed    glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): every large tensor is its
                    own mapping, returned to the system when freed. By default glibc raises the threshold after
                    each large free, so later tensors come from the heap, whose freed middle cannot be returned
    combined        checkpointing + loss_in_place + malloc_fixed
Offloading has no CPU form: activations (torch.autograd.graph.save_on_cpu) or optimizer state already live in
the memory it would move them to, so it is not a variant here; on a GPU it trades transfers for device memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

VARIANTS = ("baseline", "checkpointing", "loss_in_place", "malloc_fixed", "combined")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


class PhaseSampler(threading.Thread):
    """The peak resident memory of each named phase, sampled every millisecond from /proc/self/statm."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self.running = "start", {}, True

    def run(self):
        with open("/proc/self/statm") as statm:
            while self.running:
                statm.seek(0)
                resident = int(statm.read().split()[1]) * PAGE / MB
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident)
                time.sleep(0.001)

    def enter(self, phase: str):
        time.sleep(0.002)  # let the sampler see the end of the phase before
        self.phase = phase


class SavedActivations:
    """Bytes autograd saves for backward during the forward, once per storage, parameters excepted, by place."""

    def __init__(self, model):
        self.parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
        self.seen, self.bytes, self.place = set(), {}, "embedding"

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.parameters and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.place] = self.bytes.get(self.place, 0) + storage.nbytes()
        return tensor

    def hooks(self):
        self.seen.clear()
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def in_place_backward(ctx, grad_output):
    """ChunkedLinearCrossEntropy.backward without the two scaled copies: its saved gradients are scaled in place.

    The saved tensors are the function's own (made in its forward, used nowhere else), and backward runs once
    per forward (no retain_graph in the loop), so scaling them in place changes nothing else. In fp32 the
    .to() is a no-op, so ∂loss/∂W (vocabulary × hidden, 113 MB on SmolLM2) goes on to the parameter's
    gradient as it is instead of beside a copy.
    """
    grad_hidden, grad_weight = ctx.saved_tensors
    hidden_dtype, weight_dtype = ctx.dtypes
    grad_hidden = grad_hidden.mul_(grad_output).to(hidden_dtype)
    grad_weight = None if grad_weight is None else grad_weight.mul_(grad_output).to(weight_dtype)
    return grad_hidden, grad_weight, None, None, None, None


def worker(variant: str, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from packing_throughput import TINY_SHAPE, synthetic_conversations

    from minisft.machinery.config import DataConfig
    from minisft.machinery.loop import peak_memory_mb
    from minisft.machinery.models import load_model, load_tokenizer, tiny_model
    from minisft.machinery.pack_plans import pack_prepared
    from minisft.machinery.prepare import prepare_dataset
    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.batches import collate
    from minisft.sft.labels import count_trained_tokens_of
    from minisft.sft.loss import ChunkedLinearCrossEntropy
    from minisft.sft.optim import build_optimizer, build_schedule
    from minisft.sft.step import train_step

    sampler = PhaseSampler()
    sampler.start()
    torch.manual_seed(args.seed)
    resident_after_imports = int(open("/proc/self/statm").read().split()[1]) * PAGE / MB
    sampler.enter("load")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    if args.model == "tiny":
        model = tiny_model(tokenizer, **TINY_SHAPE, seed=args.seed)
    else:
        model = load_model("smollm2-135m-instruct", attn_implementation="sdpa")
    use_sdpa_by_example(model)
    if variant in ("checkpointing", "combined"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant in ("loss_in_place", "combined"):
        ChunkedLinearCrossEntropy.backward = staticmethod(in_place_backward)
    optimizer = build_optimizer(model, "adamw_torch", 1e-3, 0.0)

    conversations = synthetic_conversations(args.examples, args.seed)
    examples = prepare_dataset(conversations, tokenizer, DataConfig(max_length=args.max_length)).examples
    rows = pack_prepared(examples, args.max_length, "bfd").rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    saved = SavedActivations(model)
    timings, activations = [], []
    layers = model.model.layers
    for index, layer in enumerate(layers):  # name the place of each saved tensor: a layer, or after them the loss
        layer.register_forward_pre_hook(lambda module, inputs, index=index: setattr(saved, "place", "layers"))

    # The phases, marked from inside train_step by hooks, so that the step measured is the loop's own:
    # a micro-batch's forward starts when it is collated; its backward when the gradient reaches the last
    # layer's output (the fused loss's backward before it only scales what its forward computed); the
    # optimizer phase when optimizer.step() starts (clipping falls in the backward phase before it).
    def collate_and_mark(units, step):
        sampler.enter(f"step {step + 1} forward")
        saved.bytes, saved.place = {}, "embedding"
        saved.seen.clear()
        return collate(units, model, tokenizer.pad_token_id, False, None, torch.device("cpu"))

    def backward_starts(gradient, step):
        activations.append(dict(saved.bytes))
        sampler.enter(f"step {step + 1} backward")

    def last_layer_ran(module, inputs, output):
        saved.place = "loss"
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda gradient: backward_starts(gradient, step))

    layers[-1].register_forward_hook(last_layer_ran)
    optimizer.register_step_pre_hook(lambda *unused: sampler.enter(f"step {step + 1} optimizer"))
    schedule = build_schedule(optimizer, "constant", 0, args.steps)

    for step in range(args.steps):
        units = [rows[index] for index in order[step * args.rows_per_step : (step + 1) * args.rows_per_step]]
        step_tokens = count_trained_tokens_of(units)
        start = time.perf_counter()
        with saved.hooks():
            step_collate = functools.partial(collate_and_mark, step=step)
            train_step(model, [[row] for row in units], step_tokens, step_collate, optimizer, schedule, 1.0)
        timings.append({"seconds": time.perf_counter() - start, "trained_tokens": step_tokens})
    sampler.enter("end")
    sampler.running = False

    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    measured = timings[args.warmup_steps :]
    largest = max(activations, key=lambda found: sum(found.values()))
    return {
        "variant": variant,
        "peak_rss_mb": peak_memory_mb(torch.device("cpu")),  # VmHWM: this worker's own, not its driver's
        "resident_after_imports_mb": resident_after_imports,
        "phase_peaks_mb": sampler.peaks,
        "weights_mb": parameter_bytes / MB,  # gradients: the same again; AdamW's moments: twice
        "saved_activations_mb": {place: size / MB for place, size in largest.items()},
        "trained_tokens_per_second": sum(t["trained_tokens"] for t in measured) / sum(t["seconds"] for t in measured),
        "steps": timings,
        "rows": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["tiny", "smollm2-135m"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--examples", type=int, default=24, help="conversations (the packing benchmark's default)")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="AdamW's moments exist from the first step's end on")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--rows_per_step", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every variant, interleaved; medians reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/memory_profile", help="path stem of the .json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args)), encoding="utf-8")
        return

    started, load_at_start = time.perf_counter(), os.getloadavg()
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    flags = ["--model", args.model, "--examples", str(args.examples), "--max_length", str(args.max_length)]
    flags += ["--steps", str(args.steps), "--warmup_steps", str(args.warmup_steps)]
    flags += ["--rows_per_step", str(args.rows_per_step), "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory(prefix="memory-profile-") as directory:
        for repeat in range(args.repeats):
            order = args.variants[repeat % len(args.variants) :] + args.variants[: repeat % len(args.variants)]
            for variant in order:
                print(f"repetition {repeat + 1}/{args.repeats}: {variant}", file=sys.stderr, flush=True)
                result = Path(directory) / f"{variant}.json"
                environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                if variant in ("malloc_fixed", "combined"):
                    environment["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
                command = [sys.executable, __file__, "--worker", variant, "--result", str(result), *flags]
                subprocess.run(command, check=True, env=environment)
                runs[variant].append(json.loads(result.read_text(encoding="utf-8")))

    print(f"{'variant':<15} {'peak RSS MB':>12} {'tok/s':>7}   saved activations MB (largest micro-batch)")
    summary = {}
    for variant, found in runs.items():
        peak = statistics.median(run["peak_rss_mb"] for run in found)
        rate = statistics.median(run["trained_tokens_per_second"] for run in found)
        summary[variant] = {"peak_rss_mb": peak, "trained_tokens_per_second": rate, "repetitions": found}
        places = ", ".join(f"{place} {size:,.0f}" for place, size in found[0]["saved_activations_mb"].items())
        print(f"{variant:<15} {peak:>12,.0f} {rate:>7,.0f}   {places}")
    first = runs[args.variants[0]][0]
    print(
        f"weights {first['weights_mb']:,.0f} MB (gradients the same, AdamW's moments twice); resident after imports "
        f"{first['resident_after_imports_mb']:,.0f} MB. Phase peaks (MB), first repetition:"
    )
    for variant, found in runs.items():
        print(f"  {variant}: " + ", ".join(f"{phase} {mb:,.0f}" for phase, mb in found[0]["phase_peaks_mb"].items()))
    record = {
        "arguments": {key: value for key, value in vars(args).items() if key not in ("worker", "result")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "variants": summary,
        "seconds": time.perf_counter() - started,
    }
    output = Path(args.output).with_suffix(".json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"wrote {output}; took {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
