"""Mixtures (minisft/machinery/mixture.py): a --config file's datasets: list, each source in its proportion."""

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from minisft.machinery.checkpoint import CheckpointError
from minisft.machinery.cli import parse_flags
from minisft.machinery.config import ConfigError, DataConfig
from minisft.machinery.loop import train
from minisft.machinery.mixture import MixtureError, prepare_mixture
from minisft.machinery.prepare import load_and_prepare

from .test_checkpoint import same_weights
from .tiny_runs import CONVERSATIONS, refused_train, run_config

ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CONVERSATIONS]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def sources(tmp_path):
    """Two files of six and four conversations, and the same ten in one file."""
    return (
        write(tmp_path / "a.jsonl", ROWS[:6]),
        write(tmp_path / "b.jsonl", ROWS[6:]),
        write(tmp_path / "ab.jsonl", ROWS),
    )


def mixture(tokenizer, tmp_path, a, b, pa=1, pb=1, seed=42):
    entries = [{"path": str(a), "name": None, "split": "train", "proportion": pa},
               {"path": str(b), "name": None, "split": "train", "proportion": pb}]  # fmt: skip
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"))
    return prepare_mixture(entries, tokenizer, config, None, seed)


def examples(prepared) -> Counter:
    return Counter(json.dumps(prepared.examples[index]) for index in range(len(prepared.examples)))


def test_proportions_of_one_prepare_as_the_files_concatenated(tokenizer, tmp_path, sources):
    a, b, ab = sources
    splits, line = mixture(tokenizer, tmp_path, a, b)
    alone = load_and_prepare(ab, tokenizer, DataConfig(max_length=256, cache_dir=str(tmp_path / "cache")))
    assert examples(splits.train) == examples(alone.train) and len(splits.train.examples) == 10
    assert splits.train.stats.trained_tokens == alone.train.stats.trained_tokens
    assert splits.train.stats.tokens == alone.train.stats.tokens
    assert splits.train.origins[0] == f"{a} line 1" and splits.train.origins[-1] == f"{b} line 4"  # file and line kept
    assert line == f"data mixture: {a} 6 × 1 = 6, {b} 4 × 1 = 4 (10 examples an epoch)"


def test_two_repeats_a_half_halves_seeded(tokenizer, tmp_path, sources):
    a, b, _ = sources
    splits, line = mixture(tokenizer, tmp_path, a, b, pa=2, pb=0.5)
    origins = Counter(splits.train.origins)
    assert len(splits.train.examples) == 14 and all(origins[f"{a} line {n}"] == 2 for n in range(1, 7))
    from_b = [origin for origin in splits.train.origins if origin.startswith(str(b))]
    assert len(from_b) == 2 and len(set(from_b)) == 2
    assert f"{a} 6 × 2 = 12, {b} 4 × 0.5 = 2 (14 examples an epoch)" in line
    again, _ = mixture(tokenizer, tmp_path, a, b, pa=2, pb=0.5)
    assert again.train.origins == splits.train.origins  # deterministic for a seed
    others = {tuple(mixture(tokenizer, tmp_path, a, b, pb=0.5, seed=seed)[0].train.origins) for seed in range(6)}
    assert len(others) > 1  # another seed, another half


def test_the_config_file_datasets_list_reaches_the_data_flags(tmp_path, sources):
    a, b, _ = sources
    config = write_yaml(tmp_path, [{"path": str(a)}, {"path": str(b), "proportion": 0.5}])
    data = parse_flags((DataConfig,), ["--config", str(config)], "minisft.train", "")[0]
    assert [entry["proportion"] for entry in data.datasets] == [1.0, 0.5]


def write_yaml(tmp_path: Path, datasets, **flags) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps({"datasets": datasets, **flags}), encoding="utf-8")  # JSON is YAML
    return path


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"proportion": 0}, "datasets[0] ({a}): proportion must be a number > 0, got 0"),
        ({"proportion": -1}, "proportion must be a number > 0, got -1"),
        ({"proportion": "half"}, "proportion must be a number > 0, got 'half'"),
        ({"proportion": True}, "proportion must be a number > 0, got True"),
        ({"weight": 2}, "datasets[0]: unknown keys ['weight']; an entry takes path, name, split, proportion"),
    ],
)
def test_a_bad_entry_is_one_line(tmp_path, sources, entry, message):
    a = sources[0]
    config = write_yaml(tmp_path, [{"path": str(a), **entry}])
    with pytest.raises(MixtureError) as refused:
        parse_flags((DataConfig,), ["--config", str(config)], "minisft.train", "")
    assert message.format(a=a) in str(refused.value) and "\n" not in str(refused.value)


def test_datasets_with_dataset_name_is_refused(tmp_path, sources):
    a, b, ab = sources
    config = write_yaml(tmp_path, [{"path": str(a)}], dataset_name=str(ab))
    with pytest.raises(ConfigError, match="--dataset_name and a datasets: mixture both name the data"):
        parse_flags((DataConfig,), ["--config", str(config)], "minisft.train", "")


def test_sources_the_masks_cannot_apply_to_are_refused(tokenizer, tmp_path, sources):
    a = sources[0]
    text = write(tmp_path / "text.jsonl", [{"text": "plain text, no turns"}])
    entries = [{"path": str(a), "name": None, "split": "train", "proportion": 1},
               {"path": str(text), "name": None, "split": "train", "proportion": 1}]  # fmt: skip
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"), assistant_only_loss=True)
    with pytest.raises(MixtureError, match="assistant_only_loss needs conversational data") as refused:
        prepare_mixture(entries, tokenizer, config, None, 42)
    assert str(text) in str(refused.value)


def test_a_resume_with_another_proportion_is_refused_and_the_same_is_exact(tiny_dir, tmp_path, sources):
    a, b, _ = sources
    quiet, said = Console(quiet=True), Console(file=io.StringIO(), width=300)
    config = run_config(tiny_dir, tmp_path / "out", max_steps=3, save_steps=1, per_device_train_batch_size=4)
    mix = [{"path": str(a)}, {"path": str(b), "proportion": 0.5}]
    config = dataclasses.replace(config, data=DataConfig(datasets=mix, max_length=256))
    train(config, said, on_event=lambda event, **info: event == "step_end" and info["step"] == 2)  # ends at 2 of 3
    assert f"data mixture: {a} 6 × 1 = 6, {b} 4 × 0.5 = 2 (8 examples an epoch)" in said.file.getvalue()
    changed = [{"path": str(a)}, {"path": str(b), "proportion": 2}]
    again = dataclasses.replace(
        config, data=DataConfig(datasets=changed, max_length=256),
        training=dataclasses.replace(config.training, resume_from_checkpoint="true"),
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"--datasets was .*0\.5.* there and is .*2.* here"):
        train(again, quiet)
    resumed = dataclasses.replace(again, data=config.data)
    assert train(resumed, quiet).steps == 3
    whole = dataclasses.replace(
        config, training=dataclasses.replace(config.training, output_dir=str(tmp_path / "whole"))
    )
    train(whole, quiet)
    assert same_weights(tmp_path / "out", tmp_path / "whole")  # the same mixture resumes exactly


def test_the_train_command_refuses_in_one_line(tmp_path, sources, capsys):
    a, b, ab = sources
    config = write_yaml(tmp_path, [{"path": str(a), "proportion": 0}])
    line, _ = refused_train(["--config", str(config)], capsys)
    assert "datasets[0]" in line and "proportion must be a number > 0, got 0" in line
    config = write_yaml(tmp_path, [{"path": str(a)}])
    line, _ = refused_train(["--config", str(config), "--dataset_name", str(ab)], capsys)
    assert "--dataset_name and a datasets: mixture both name the data" in line


def test_the_train_command_trains_a_config_files_mixture_not_the_demo(tmp_path, sources, tiny_dir, capsys):
    from minisft.machinery.cli import run
    from minisft.train import main

    a, b, ab = sources
    config = write_yaml(tmp_path, [{"path": str(a), "proportion": 1}, {"path": str(b), "proportion": 0.5}])
    argv = ["--config", str(config), "--model_name_or_path", tiny_dir, "--output_dir", str(tmp_path / "out")]
    run(main, [*argv, "--max_steps", "1", "--save_steps", "0"])
    err = capsys.readouterr().err
    assert f"data mixture: {a} 6 × 1 = 6, {b} 4 × 0.5 = 2 (8 examples an epoch)" in err
    assert "demo defaults" not in err and (tmp_path / "out" / "model.safetensors").is_file()


def test_inspect_refuses_a_mixture_rather_than_show_the_demo_data(tmp_path, sources, capsys):
    from minisft.inspect import main
    from minisft.machinery.cli import run

    a, b, ab = sources
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--config", str(write_yaml(tmp_path, [{"path": str(a)}, {"path": str(b)}]))])
    assert exit_info.value.code == 2
    assert "inspect shows one dataset, not a --config file's datasets: mixture" in capsys.readouterr().err
