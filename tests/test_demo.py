"""`python -m minisft.train` with no dataset: the demo, its visible defaults, and the lesson it teaches."""

import json

import pytest

from minisft.machinery.cli import demo_dataset_path
from minisft.machinery.data_files import load_splits
from minisft.train import DEMO_DEFAULTS, main


def probe_answers(output_dir) -> list[dict]:
    """The demo's probes as the run asked them (minisft/machinery/probes.py): one line per probe per occasion."""
    return [json.loads(line) for line in (output_dir / "probes.jsonl").read_text(encoding="utf-8").splitlines()]


def test_demo_defaults_apply_are_shown_and_yield_to_flags(chatty_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora_alpha: 8\n")
    output_dir = tmp_path / "out"
    main(
        [
            "--model_name_or_path",
            chatty_dir,
            "--config",
            str(config),
            "--lora_r",
            "4",
            "--max_steps",
            "2",
            "--output_dir",
            str(output_dir),
        ]
    )
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8  # a flag and the config file beat the demo's
    assert adapter["target_modules"] == "all-linear" and adapter["lora_dropout"] == DEMO_DEFAULTS["lora_dropout"]
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1, 2]  # the probes before training, then logging_steps 1
    assert records[1]["learning_rate"] == DEMO_DEFAULTS["learning_rate"]
    assert "eval_probe_match_held_out" in records[0] and "eval_probe_match_held_out" in records[-1]  # epoch's end
    captured = capsys.readouterr()
    [shown] = [line for line in captured.err.splitlines() if line.startswith("demo defaults")]
    assert "--use_peft true" in shown and "--learning_rate 0.001" in shown and "--assistant_only_loss true" in shown
    assert f"--probe_prompts {DEMO_DEFAULTS['probe_prompts']}" in shown
    assert "--lora_r" not in shown and "--lora_alpha" not in shown  # overridden, so not the demo's
    assert "run summary" in captured.err and "train loss" in captured.err

    # The demo's prompts go through --probe_prompts: asked by the loop before the first step and at the epoch's end.
    held_out = [example["messages"][-2]["content"] for example in load_splits(demo_dataset_path()).eval]
    answers = probe_answers(output_dir)
    assert [line["step"] for line in answers] == [0] * 6 + [2] * 6
    assert [line["kind"] for line in answers[:6]] == ["trained", "trained"] + ["held_out"] * len(held_out) + ["general"]
    assert [line["prompt"] for line in answers[2:5]] == held_out and answers[5]["expected"] == "Paris"
    summary = " ".join(captured.err.split())
    assert "The probe prompts, before (step 0) and after (step 2) training" in summary and "微调测试" in summary


def test_a_dataset_turns_the_demo_off(chatty_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    main(
        [
            "--model_name_or_path",
            chatty_dir,
            "--dataset_name",
            str(data),
            "--max_steps",
            "1",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    captured = capsys.readouterr()
    assert "demo defaults" not in captured.err and "probe prompts" not in captured.err
    assert not (tmp_path / "out" / "probes.jsonl").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()  # full fine-tuning, the non-demo default


@pytest.mark.slow
def test_the_demo_teaches_the_answer(tmp_path):
    """The real embedded model, shortened to 2 epochs (6 steps) at a higher learning rate.

    Measured on a shared 2-core CPU: about 4 minutes with other jobs running, most of it training.
    """
    main(["--num_train_epochs", "2", "--learning_rate", "3e-3", "--output_dir", str(tmp_path / "demo")])
    answers = probe_answers(tmp_path / "demo")
    before = {line["prompt"]: line for line in answers if line["step"] == 0}
    after = {line["prompt"]: line for line in answers if line["step"] == 6}
    assert not before["微调测试"]["match"] and after["微调测试"]["match"]  # 我学会了
    assert after["What is the capital of France?"]["match"]  # Paris: and it kept what it knew
