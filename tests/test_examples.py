"""Each example in examples/ runs as it stands (the longer ones shortened by their own flags) and does what it says."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=900,
        env={**os.environ, "COLUMNS": "200"},  # rich wraps at the terminal's width
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout + completed.stderr


@pytest.mark.slow
def test_one_sentence_sft_teaches_the_answer(tmp_path):
    # Half the seed's 30 epochs at twice the learning rate: the full run takes minutes on 2 cores.
    output = run_example("01_one_sentence_sft.py", str(tmp_path), "--num_train_epochs", "15", "--learning_rate", "2e-4")
    before = output.split("before: ", 1)[1].split("\n", 1)[0]
    after = output.split("after:  ", 1)[1].split("\n", 1)[0]
    assert "我学会了" not in before
    assert after == "'我学会了'"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_smollm2_walkthrough_monitors_the_run(tmp_path):
    output_dir = tmp_path / "walkthrough"
    output = run_example(
        "02_smollm2_walkthrough.py", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
        "--output_dir", str(output_dir),
    )  # fmt: skip
    assert "packed into" in output and "run summary" in output and "eval loss" in output
    assert (output_dir / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "model.safetensors").is_file()
    assert output.count("answered: ") == 3  # the three held-out prompts


@pytest.mark.slow
def test_api_stage_by_stage_prints_every_stage():
    output = run_example("03_api_stage_by_stage.py")
    stages = ("1. examples", "2. format", "3. mask", "4. pack", "5. attention", "6. batches", "7. LoRA", "8. loss")
    for stage in (*stages, "9. optimizer", "10. step"):
        assert stage in output, stage
    # The packed row's loss is its examples' losses run alone: the attention boundaries hold in the example too.
    packed = re.search(r"sum of token losses ([\d.]+) over", output).group(1)
    alone = re.search(r"run one by one: sum of token losses ([\d.]+)", output).group(1)
    assert packed == alone
    assert "<|im_start|>assistant\n我学会了<|im_end|>" in output  # the formatted conversation
    assert "trained tokens 9 of 48: '我学会了<|im_end|>\\n'" in output  # assistant-only labels
    assert "all zeros: True" in output  # LoRA's B starts at zero
    # the lesson's own step trains: four steps on the demo's rows lower the held-out loss
    before = float(re.search(r"held-out loss before: ([\d.]+)", output).group(1))
    after = float(re.search(r"held-out loss after: ([\d.]+)", output).group(1))
    assert after < before - 0.5, (before, after)


def test_audit_flags_the_trap_and_not_the_clean_data():
    output = run_example("04_audit.py")
    clean, trap = output.split("The same data", 1)
    assert "no warnings" in clean and "warning:" not in clean
    assert "stop token trained (<|im_end|>)" in clean and "12 of 12 (100.0%)" in clean
    assert "the model may never learn to stop" in trap and "0 of 12 (0.0%)" in trap
