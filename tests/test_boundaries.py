"""The boundaries switch, --neat_packing false: each packed row is one sequence and its examples see each other.

With the boundaries (the default) an example computes inside a packed row what it computes alone: that is
tests/test_attention.py's test_packed_examples_equal_examples_alone, for sdpa, eager and flex_attention.
"""

import io
import json
import re

import pytest
import torch
from rich.console import Console

from minisft.machinery.config import PackingConfig
from minisft.machinery.loop import train
from minisft.machinery.models import tiny_model
from minisft.sft.attention import use_sdpa_by_example
from minisft.sft.batches import collate
from minisft.sft.packing import make_row

from .test_attention import TEXTS, TOLERANCE
from .test_examples import run_example
from .tiny_runs import data_file_of, max_diff, metrics, refused_train, run_config

CPU = torch.device("cpu")
# Packed behind another example, an example's logits move by ~0.7 (test_attention's negative control): 1e-2 is far
# above the rounding (TOLERANCE) and far below the effect.
SEEN = 1e-2


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
def test_without_boundaries_a_packed_row_is_one_sequence(tokenizer, examples, implementation):
    model = tiny_model(tokenizer, attn_implementation=implementation).eval()
    use_sdpa_by_example(model)  # as the loop does; only sdpa models change
    rows = [make_row([(ids, ids) for ids in examples[:3]]), make_row([(ids, ids) for ids in examples[3:]])]
    batch = collate(rows, model, tokenizer.pad_token_id, False, 64, CPU, boundaries=False)
    first_row = [token for ids in examples[:3] for token in ids]
    with torch.no_grad():
        packed = model(**batch["inputs"]).logits[0, : len(first_row)]  # row 0 leads, flattened or not
        whole, first, second = (logits_of(model, ids) for ids in (first_row, examples[0], examples[1]))
    length = len(examples[0])
    assert max_diff(packed, whole) <= TOLERANCE  # the row computes as one ordinary sequence
    assert max_diff(packed[:length], first) <= TOLERANCE  # the first example is the row's causal prefix
    assert max_diff(packed[length : length + len(examples[1])], second) > SEEN  # the second sees the first
    # Only what a token sees changes: the targets are those of the row with boundaries.
    assert torch.equal(batch["labels"], collate(rows, model, tokenizer.pad_token_id, False, 64, CPU)["labels"])


def test_without_boundaries_a_padding_free_batch_is_one_sequence(tokenizer, examples):
    model = tiny_model(tokenizer).eval()
    use_sdpa_by_example(model)
    units = [{"input_ids": ids, "labels": ids} for ids in examples]
    batch = collate(units, model, tokenizer.pad_token_id, True, None, CPU, boundaries=False)
    with torch.no_grad():
        packed = model(**batch["inputs"]).logits[0]
        whole = logits_of(model, [token for ids in examples for token in ids])
    assert max_diff(packed, whole) <= TOLERANCE
    assert max_diff(packed[: len(examples[0])], whole[: len(examples[0])]) <= TOLERANCE
    with torch.no_grad():
        second = logits_of(model, examples[1])
    assert max_diff(packed[len(examples[0]) : len(examples[0]) + len(examples[1])], second) > SEEN


def test_a_run_without_boundaries_says_so_and_trains_otherwise(tiny_dir, tmp_path):
    output = io.StringIO()
    packing = PackingConfig(packing=True, neat_packing=False)
    train(run_config(tiny_dir, tmp_path / "open", packing=packing, max_steps=1), Console(file=output, width=400))
    train(
        run_config(tiny_dir, tmp_path / "neat", packing=PackingConfig(packing=True), max_steps=1),
        Console(file=io.StringIO()),
    )
    opening = next(line for line in output.getvalue().splitlines() if line.startswith("run "))
    assert opening.endswith(", packing without attention boundaries (examples see each other)")
    # The same rows, seed and weights: only what the examples see makes the first step's loss differ.
    assert metrics(tmp_path / "open")[0]["loss"] != metrics(tmp_path / "neat")[0]["loss"]


def test_without_packing_the_switch_is_refused(tiny_dir, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir)), "--max_length", "64",
            "--output_dir", str(tmp_path / "out"), "--neat_packing", "false"]  # fmt: skip
    line, _ = refused_train(argv, capsys)
    assert "--neat_packing false" in line and "needs --packing, --eval_packing or --padding_free" in line
    assert not (tmp_path / "out").exists()


def test_the_example_shows_the_contamination_and_both_held_out_losses(tiny_dir):
    output = run_example("05_packing_boundaries.py", "--model_name_or_path", tiny_dir, "--max_steps", "2",
                         "--eval_steps", "2")  # fmt: skip
    gaps = dict(
        re.findall(
            r"packed (with|without) boundaries: +[\d.]+ \(largest per-token difference from alone: ([^)]+)\)", output
        )
    )
    assert float(gaps["with"]) <= TOLERANCE and float(gaps["without"]) > SEEN
    assert "packing without attention boundaries (examples see each other)" in " ".join(output.split())  # unwrapped
    assert re.search(r"held-out loss before training: [\d.]+", output)
    runs = re.findall(r"trained (with|without) boundaries: last train loss ([\d.]+), held-out loss ([\d.]+)", output)
    assert [name for name, _, _ in runs] == ["with", "without"] and runs[0][1:] != runs[1][1:]


def test_inspect_shows_the_positions_a_run_without_boundaries_feeds(capsys):
    from minisft.inspect import main

    main(["--json", "--packing", "--max_length", "256", "--neat_packing", "false"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert any(len(row["seq_lengths"]) > 1 for row in rows)  # rows of several examples, as ever
    assert all(row["position_ids"] == list(range(len(row["input_ids"]))) for row in rows)  # one sequence each
    assert "packing without attention boundaries (examples see each other)" in " ".join(captured.err.split())
