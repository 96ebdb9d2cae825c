"""`python -m minisft.train` with no dataset: the demo, its visible defaults, and the lesson it teaches."""

import json

import pytest

import minisft.train
from minisft.machinery.cli import demo_dataset_path
from minisft.machinery.data_files import load_splits
from minisft.train import DEMO_DEFAULTS, GENERAL_PROMPT, main


@pytest.fixture
def table_rows(monkeypatch):
    """The (kind, prompt), before and after answers the demo puts in its table."""
    seen = {}

    def spy(prompts, before, after):
        seen.update(prompts=prompts, before=before, after=after)
        return original(prompts, before, after)

    original = minisft.train.before_after_table
    monkeypatch.setattr(minisft.train, "before_after_table", spy)
    return seen


def test_demo_defaults_apply_are_shown_and_yield_to_flags(chatty_dir, tmp_path, capsys, table_rows):
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
    assert [record["step"] for record in records] == [1, 2]  # logging_steps 1
    assert records[0]["learning_rate"] == DEMO_DEFAULTS["learning_rate"]
    captured = capsys.readouterr()
    [shown] = [line for line in captured.err.splitlines() if line.startswith("demo defaults")]
    assert "--use_peft true" in shown and "--learning_rate 0.001" in shown and "--assistant_only_loss true" in shown
    assert "--lora_r" not in shown and "--lora_alpha" not in shown  # overridden, so not the demo's
    assert "run summary" in captured.err and "train loss" in captured.err

    held_out = [example["messages"][-2]["content"] for example in load_splits(demo_dataset_path()).eval]
    kinds = [kind for kind, _ in table_rows["prompts"]]
    assert kinds == ["trained", "trained"] + ["held out"] * len(held_out) + ["general"]
    assert [prompt for _, prompt in table_rows["prompts"]][2:] == held_out + [GENERAL_PROMPT]
    assert len(table_rows["before"]) == len(table_rows["after"]) == len(kinds)
    assert "before and after training" in captured.out and "微调测试" in captured.out


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
    assert "demo defaults" not in captured.err and "before and after" not in captured.out
    assert (tmp_path / "out" / "model.safetensors").is_file()  # full fine-tuning, the non-demo default


@pytest.mark.slow
def test_the_demo_teaches_the_answer(tmp_path, table_rows):
    """The real embedded model, shortened to 2 epochs (6 steps) at a higher learning rate.

    Measured on a shared 2-core CPU: about 4 minutes with other jobs running, most of it training.
    """
    main(["--num_train_epochs", "2", "--learning_rate", "3e-3", "--output_dir", str(tmp_path / "demo")])
    answers = dict(zip([prompt for _, prompt in table_rows["prompts"]], zip(table_rows["before"], table_rows["after"])))
    before, after = answers["微调测试"]
    assert "我学会了" not in before and "我学会了" in after
    assert "Paris" in answers[GENERAL_PROMPT][1]  # and it kept what it knew
