"""`python -m minisft.inspect --audit`: each trap on a dataset built to show it is flagged; clean data is not."""

import json

from minisft.inspect import main
from minisft.machinery.cli import demo_dataset_path
from minisft.train import main as train_main


def audit_of(capsys, *flags: str) -> dict:
    main(["--audit", "--json", "--cache_dir", "none", *flags])
    return json.loads(capsys.readouterr().out)


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_the_demo_data_gives_no_warning(capsys):
    main(["--audit", "--cache_dir", "none"])
    out = capsys.readouterr().out
    assert "stop token trained (<|im_end|>)" in out and "12 of 12 (100.0%)" in out
    assert "no warnings" in out and "warning:" not in out
    audit = audit_of(capsys, "--assistant_only_loss")
    assert audit["warnings"] == [] and audit["stop_trained"] == audit["examples"] == 12
    assert audit["duplicates"] == 1  # the seed conversation, written twice on purpose: counted, under the threshold
    by_role = audit["trained_by_role"]
    assert by_role["assistant"] == audit["trained_tokens"] and by_role["user"] == by_role["system"] == 0


def test_a_response_template_that_stops_before_the_end_of_turn(capsys):
    # Trained from "<|im_start|>assistant\n" up to the next <|im_end|>: the answers, never the token that ends them.
    audit = audit_of(capsys, "--response_template", "<|im_start|>assistant\n", "--instruction_template", "<|im_end|>")
    assert audit["stop_trained"] == 0 and audit["trained_tokens"] > 0
    assert any("the model may never learn to stop" in warning for warning in audit["warnings"])


def test_text_rows_ended_with_a_token_generation_does_not_stop_on(capsys, tmp_path):
    data = write_rows(tmp_path / "text.jsonl", [{"text": f"The answer is {number}."} for number in range(10)])
    audit = audit_of(capsys, "--dataset_name", data, "--eos_token", "<|im_start|>")
    assert audit["stop_tokens"] == ["<|im_end|>"] and audit["stop_trained"] == 0
    assert any("may never learn to stop" in warning for warning in audit["warnings"])
    assert not audit_of(capsys, "--dataset_name", data)["warnings"]  # the tokenizer's own EOS: clean


def test_labels_masked_almost_everywhere_or_everywhere(capsys, tmp_path):
    ids = list(range(100, 139)) + [2]  # the last token <|im_end|>, the only one trained
    rows = [{"input_ids": ids, "labels": [-100] * 39 + [2]} for _ in range(8)]
    rows += [{"input_ids": ids, "labels": [-100] * 40} for _ in range(2)]  # every label -100 (unsloth #823)
    audit = audit_of(capsys, "--dataset_name", write_rows(tmp_path / "masked.jsonl", rows))
    assert audit["mostly_masked"] == 8 and audit["dropped"] == 2 and audit["stop_trained"] == 8
    assert any("more than 95% of their tokens masked" in warning for warning in audit["warnings"])
    assert any("2 of 10 examples were dropped (2 no token to train on)" in warning for warning in audit["warnings"])
    assert not any("stop" in warning for warning in audit["warnings"])


def test_a_response_template_found_in_some_examples(capsys, tmp_path):
    rows = [{"text": f"Question {number}?\n### Answer: {number}"} for number in range(8)]
    rows += [{"text": "Question without its answer?"} for _ in range(2)]
    audit = audit_of(capsys, "--dataset_name", write_rows(tmp_path / "qa.jsonl", rows), "--response_template",
                     "### Answer:")  # fmt: skip
    assert audit["template_missing"] == 2 and audit["examples"] == 8
    assert any("response template was not found in 2 of 10 examples" in warning for warning in audit["warnings"])


def test_duplicates(capsys, tmp_path):
    lines = (demo_dataset_path() / "train.jsonl").read_text(encoding="utf-8")
    data = tmp_path / "twice.jsonl"
    data.write_text(lines + lines, encoding="utf-8")  # a file read twice
    audit = audit_of(capsys, "--dataset_name", str(data))
    assert audit["examples"] == 24 and audit["duplicates"] == 13  # 12 copies, and the demo's own one
    assert any("13 of 24 examples are exact copies" in warning for warning in audit["warnings"])


def test_heavy_truncation_counts_the_trained_tokens_it_cut(capsys, tmp_path):
    rows = [{"text": "word " * (20 + number)} for number in range(10)]
    audit = audit_of(capsys, "--dataset_name", write_rows(tmp_path / "long.jsonl", rows), "--max_length", "16")
    assert audit["truncated"] == 10 and audit["truncated_tokens"] > 0
    # Text rows train every token, so every token cut was a trained one.
    assert audit["truncated_trained_tokens"] == audit["truncated_tokens"]
    assert any("10 of 10 examples (100%) were truncated" in warning for warning in audit["warnings"])


def test_the_run_prints_the_warnings_before_step_1(tiny_dir, tmp_path, capsys):
    train_main([
        "--model_name_or_path", tiny_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--logging_steps", "1", "--cache_dir", "none", "--save_strategy", "no",
        "--response_template", "<|im_start|>assistant\n", "--instruction_template", "<|im_end|>",
    ])  # fmt: skip
    captured = capsys.readouterr()
    output = captured.out + captured.err
    warning = output.index("the model may never learn to stop")
    assert warning < output.index("step 1")
    assert "per example: tokens" not in output  # the warnings, not the table
