"""`python -m minisft.inspect`: what it prints is what training consumes; user errors get no traceback."""

import json
import subprocess
import sys

import pytest

from minisft.inspect import main
from minisft.machinery.cli import demo_dataset_path, run
from minisft.machinery.config import DataConfig
from minisft.machinery.data_files import load_splits
from minisft.machinery.prepare import prepare_dataset


def test_json_is_exactly_the_prepared_examples(capsys, tokenizer):
    main(["--json", "--assistant_only_loss"])
    lines = capsys.readouterr().out.splitlines()
    printed = [json.loads(line) for line in lines]
    train = load_splits(demo_dataset_path()).train
    expected = prepare_dataset(train, tokenizer, DataConfig(assistant_only_loss=True)).examples
    assert printed == expected
    assert all(set(example) == {"input_ids", "labels"} for example in printed)


def test_json_respects_num_examples_and_split(capsys):
    main(["--json", "--num_examples", "2", "--split", "eval"])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_default_view_shows_tokens_and_figures(capsys, tmp_path):
    data = tmp_path / "seed.jsonl"
    rows = [
        {"conversation": [{"role": "human", "message": "微调测试"}, {"role": "assistant", "message": "我学会了"}]},
        {"conversation": [{"role": "human", "message": "x " * 40}, {"role": "assistant", "message": "y"}]},
    ]
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    main(["--dataset_name", str(data), "--assistant_only_loss", "--max_length", "60"])
    out = capsys.readouterr().out
    assert "seed.jsonl line 1" in out and "我学会了" in out
    assert "truncated to max_length" in out and "1 examples" in out
    assert "every trained token was past max_length" in out  # the long one lost its answer: dropped, and said so


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', "line 2: not valid JSON"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "unknown role 'robot'"),
        ('{"messages": []}\n', "is empty"),
        ('{"question": "hi"}\n', "unknown dataset format"),
    ],
)
def test_bad_data_is_one_clear_line(tmp_path, capsys, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--dataset_name", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and message in err and "Traceback" not in err


def test_missing_file_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minisft.inspect", "--dataset_name", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "nope.jsonl: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m minisft.inspect" in out and "{% generation %}" in out and "--response_template" in out


def test_bare_completion_only_loss_means_true(capsys, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": " there"}) + "\n", encoding="utf-8")
    main(["--dataset_name", str(data), "--json", "--completion_only_loss"])
    masked = json.loads(capsys.readouterr().out)["labels"]
    main(["--dataset_name", str(data), "--json", "--completion_only_loss", "false"])
    unmasked = json.loads(capsys.readouterr().out)["labels"]
    assert -100 in masked and -100 not in unmasked


def test_packing_json_prints_rows_with_boundaries(capsys):
    main(["--json", "--packing", "--max_length", "256"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(set(row) == {"input_ids", "labels", "position_ids", "seq_lengths"} for row in rows)
    assert all(len(row["input_ids"]) <= 256 and sum(row["seq_lengths"]) == len(row["input_ids"]) for row in rows)
    # All the demo's training examples are in the rows, none twice.
    unpacked = load_splits(demo_dataset_path()).train
    assert sum(len(row["seq_lengths"]) for row in rows) == len(unpacked)


def test_packing_view_reports_efficiency(capsys):
    main(["--packing", "--max_length", "256", "--num_examples", "1"])
    out = capsys.readouterr().out
    assert "row    0" in out and "packing efficiency" in out and "row    1" not in out


def test_eval_packing_false_shows_eval_unpacked(capsys):
    main(["--json", "--packing", "--split", "eval", "--eval_packing", "false"])
    assert all(set(json.loads(line)) == {"input_ids", "labels"} for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("flags", [["--max_length", "0"], ["--max_length", "-5", "--packing"]])
def test_max_length_must_be_positive(capsys, flags):
    with pytest.raises(SystemExit):
        run(main, flags)
    assert "--max_length must be a positive number of tokens" in capsys.readouterr().err


def test_bfd_split_keeps_every_token_and_bfd_truncates(capsys, tokenizer):
    """As in TRL, bfd_split keeps every token (preparation leaves overlong examples whole for it to split), and bfd
    packs examples truncated to max_length (by preparation, as unpacked batches take them)."""
    untruncated = prepare_dataset(load_splits(demo_dataset_path()).train, tokenizer, DataConfig(), truncate=False)
    total = sum(len(example["input_ids"]) for example in untruncated.examples)
    longer = [len(example["input_ids"]) for example in untruncated.examples if len(example["input_ids"]) > 32]
    assert longer  # the premise: some demo examples are longer than the rows
    main(["--json", "--packing", "--packing_strategy", "bfd_split", "--max_length", "32"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(len(row["input_ids"]) for row in rows) == total
    main(["--json", "--packing", "--packing_strategy", "bfd", "--max_length", "32"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(len(row["input_ids"]) for row in rows) == total - sum(length - 32 for length in longer)
