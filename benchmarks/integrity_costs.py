"""What the integrity checks cost (issue 27): checksums of the prepared cache and of checkpoints, the base model's
fingerprint, and the output folder's lock and record.

    python benchmarks/integrity_costs.py                 # ~1 minute; --tokens 200000000 for a million conversations

Each figure is the median of a few repetitions, the files in the page cache (as a run that just wrote or is about
to read them finds them). Writes benchmarks/results/integrity_costs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minisft.machinery import cache
from minisft.machinery.checkpoint import base_identity, verify_files
from minisft.machinery.models import load_model, load_tokenizer, tiny_model
from minisft.machinery.outputs import record_outputs, start_writing, take_lock
from minisft.machinery.storage import file_checksums


def timed(work, repeats: int) -> float:
    """The median seconds of `repeats` calls of work()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepared_split(folder: Path, tokens: int) -> int:
    """A prepared split's files at the size of `tokens` (ids, trained mask, offsets, origins): their bytes."""
    rng = np.random.default_rng(0)
    examples = tokens // 200
    (folder / "train").mkdir(parents=True)
    rng.integers(0, 49152, tokens, dtype=np.uint16).tofile(folder / "train/input_ids.bin")
    rng.integers(0, 2, tokens, dtype=np.uint8).tofile(folder / "train/trained.bin")
    np.linspace(0, tokens, examples + 1).astype(np.int64).tofile(folder / "train/offsets.bin")
    (folder / "train/origins.bin").write_bytes(b"x" * (examples * 30))
    (np.arange(examples + 1, dtype=np.int64) * 30).tofile(folder / "train/origin_offsets.bin")
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def smollm2_checkpoint(folder: Path, model) -> int:
    """The two large files of a SmolLM2 full fine-tune's checkpoint: the weights and AdamW's two moments."""
    model.save_pretrained(folder)
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in model.named_parameters()}
    torch.save(moments, folder / "optimizer.pt")
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000, help="Tokens in the synthetic prepared split.")
    parser.add_argument("--out", default="benchmarks/results/integrity_costs.json")
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)

        size = prepared_split(work / "prepared", args.tokens)
        cache.seal(work / "prepared")
        verify = timed(lambda: cache.verify(work / "prepared"), 3)
        figures["prepared cache: verify, s per GB"] = verify / (size / 1e9)
        figures["prepared cache: split size, MB"] = size / 1e6

        model = load_model("smollm2-135m-instruct", dtype=torch.float32)
        size = smollm2_checkpoint(work / "checkpoint", model)
        listed = file_checksums(work / "checkpoint")
        figures["checkpoint: SmolLM2 full fine-tune files, MB"] = size / 1e6
        figures["checkpoint: list checksums (save), s"] = timed(lambda: file_checksums(work / "checkpoint"), 3)
        figures["checkpoint: verify (resume), s"] = timed(lambda: verify_files(work / "checkpoint", listed), 3)
        figures["checkpoint: s per GB"] = figures["checkpoint: verify (resume), s"] / (size / 1e9)
        figures["base identity: SmolLM2-135M, ms"] = 1e3 * timed(lambda: base_identity(model, "smollm2"), 5)
        tiny = tiny_model(load_tokenizer("smollm2-135m-instruct"))
        figures["base identity: tiny model, ms"] = 1e3 * timed(lambda: base_identity(tiny, "tiny"), 20)

        run = work / "run"
        run.mkdir()
        figures["output folder: lock take + release, ms"] = 1e3 * timed(lambda: take_lock(run).release(), 500)
        start_writing(run, overwrite=False)
        for step in range(1, 51):  # a long run's folder: 50 checkpoints and the model's files
            (run / f"checkpoint-{step}").mkdir()
        record_outputs(run)
        figures["output folder: record update, nothing new, ms"] = 1e3 * timed(lambda: record_outputs(run), 500)
        steps = iter(range(100, 10**6))

        def new_checkpoint() -> None:
            (run / f"checkpoint-{next(steps)}").mkdir()
            record_outputs(run)

        figures["output folder: record update after a new checkpoint (mkdir included), ms"] = 1e3 * timed(
            new_checkpoint, 50
        )
    for name, value in figures.items():
        print(f"{name}: {value:,.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
