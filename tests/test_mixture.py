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
    splits, line, _ = prepare_mixture(entries, tokenizer, config, None, seed)
    return splits, line


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
        (
            {"weight": 2},
            "datasets[0]: unknown keys ['weight']; an entry takes path, name, split, data_dir, data_files, columns",
        ),
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


# ----------------------------------------------------------------------------- TRL's entry keys


def stored(prepared) -> list[tuple]:
    """Each example's input_ids and labels, in order: what a mixture must equal."""
    return [
        tuple(tuple(values) for values in prepared.examples[index].values()) for index in range(len(prepared.examples))
    ]


def test_trls_data_files_columns_and_fraction_give_trls_rows(tokenizer, tmp_path, monkeypatch):
    """Parity with TRL's get_dataset on the same YAML entries: builder path, data_files, columns, fraction."""
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig, get_dataset

    extra = [dict(row, id=index, text=f"not the conversation {index}") for index, row in enumerate(ROWS)]
    write(tmp_path / "a.jsonl", extra[:6])
    write(tmp_path / "b.jsonl", extra[6:])
    monkeypatch.chdir(tmp_path)  # data_files relative to the working folder, as datasets reads them
    entries = [
        {"path": "json", "data_files": "a.jsonl", "columns": ["messages"], "fraction": 0.75},
        {"path": "json", "data_files": ["b.jsonl"], "columns": ["messages"], "fraction": 0.25},
    ]
    trl_rows = list(get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**entry) for entry in entries]))["train"])
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"))
    splits, line, counts = prepare_mixture(entries, tokenizer, config, None, 42)
    plain = load_and_prepare(write(tmp_path / "trl.jsonl", trl_rows), tokenizer, config)
    # TRL: weights 0.75/0.25, total = min(6/0.75, 4/0.25) = 8: the first 6 of a and the first 2 of b
    assert len(trl_rows) == 8 and [row["messages"] for row in trl_rows] == [
        row["messages"] for row in ROWS[:6] + ROWS[6:8]
    ]
    assert stored(splits.train) == stored(plain.train)  # the same input_ids and labels, in the same order
    assert splits.train.stats.trained_tokens == plain.train.stats.trained_tokens
    assert [(count["examples"], count["drawn"]) for count in counts] == [(6, 6), (4, 2)]
    assert "first 2 of 4 (fraction 0.25)" in line and splits.train.origins[-1].endswith("b.jsonl line 2")


def test_columns_choose_which_of_a_rows_forms_is_trained(tokenizer, tmp_path):
    """A row holding messages and a text column trains its messages; columns: [text] trains the text instead."""
    write(tmp_path / "both.jsonl", [dict(row, text=f"plain text {index}") for index, row in enumerate(ROWS)])
    texts = write(tmp_path / "texts.jsonl", [{"text": f"plain text {index}"} for index in range(len(ROWS))])
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"))
    whole, _, _ = prepare_mixture([{"path": str(tmp_path / "both.jsonl")}], tokenizer, config, None, 42)
    picked, _, _ = prepare_mixture([{"path": str(tmp_path), "data_files": "both.jsonl", "columns": ["text"]}],
                                   tokenizer, config, None, 42)  # fmt: skip
    assert stored(picked.train) == stored(load_and_prepare(texts, tokenizer, config).train) != stored(whole.train)
    with pytest.raises(Exception, match=r"both.jsonl line 1: no column 'conversation'") as refused:
        prepare_mixture([{"path": str(tmp_path), "data_files": "both.jsonl", "columns": ["conversation"]}],
                        tokenizer, config, None, 42)  # fmt: skip
    assert "\n" not in str(refused.value)


def test_data_dir_and_a_data_files_mapping_choose_the_splits(tokenizer, tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.jsonl", ROWS[:6])
    write(tmp_path / "data" / "test.jsonl", ROWS[6:])
    write(tmp_path / "other.jsonl", ROWS[:1])  # outside data_dir: not read
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"))
    by_dir, _, _ = prepare_mixture([{"path": str(tmp_path), "data_dir": "data"}], tokenizer, config, None, 42)
    assert len(by_dir.train.examples) == 6 and len(by_dir.eval.examples) == 4
    files = {"train": "data/train.jsonl", "test": ["data/test.jsonl"]}
    by_files, _, _ = prepare_mixture([{"path": str(tmp_path), "data_files": files}], tokenizer, config, None, 42)
    assert stored(by_files.train) == stored(by_dir.train) and stored(by_files.eval) == stored(by_dir.eval)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"path": "json", "data_files": "missing.jsonl"}], "data_files 'missing.jsonl': no such file"),
        ([{"path": "json"}], "path 'json' is a builder: name its files with data_files or data_dir"),
        ([{"path": "org/name", "columns": ["messages"]}], "need a local folder or one of the builders"),
        ([{"path": "json", "data_files": 3}], "data_files must be a file name, a list of them"),
        ([{"path": "json", "data_files": "a.jsonl", "columns": "messages"}], "columns must be a list of column names"),
        ([{"path": "a.jsonl", "fraction": 0.5}, {"path": "a.jsonl"}], "fraction must be set on every entry or on none"),
        ([{"path": "a.jsonl", "fraction": 0.5, "proportion": 2}], "give proportion (minisft's) or fraction (TRL's)"),
    ],
)
def test_trls_keys_refused_in_one_line_when_wrong(tokenizer, tmp_path, monkeypatch, entries, message):
    write(tmp_path / "a.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MixtureError) as refused:
        prepare_mixture(entries, tokenizer, config, None, 42)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_checkpoint_keeps_each_sources_count(tiny_dir, tmp_path, sources):
    a, b, _ = sources
    config = run_config(tiny_dir, tmp_path / "out", max_steps=2, save_steps=1, per_device_train_batch_size=4)
    mix = [{"path": str(a)}, {"path": str(b), "proportion": 0.5}]
    train(dataclasses.replace(config, data=DataConfig(datasets=mix, max_length=256)), Console(quiet=True))
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    recorded = [(entry["path"], entry["examples"], entry["drawn"]) for entry in state["data_order"]["datasets"]]
    assert recorded == [(str(a), 6, 6), (str(b), 4, 2)]


def test_an_output_dir_inside_a_mixtures_source_folder_is_refused(tiny_dir, tmp_path, sources):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.jsonl", ROWS)
    config = run_config(tiny_dir, tmp_path / "data" / "out", max_steps=1)
    mix = [{"path": str(sources[0])}, {"path": str(tmp_path), "data_dir": "data"}]
    with pytest.raises(ConfigError, match="is inside --dataset_name .*data: a folder dataset reads every data file"):
        train(dataclasses.replace(config, data=DataConfig(datasets=mix, max_length=256)), Console(quiet=True))
    assert not (tmp_path / "data" / "out").exists()


def test_the_rows_weights_survive_the_mixture(tokenizer, tmp_path):
    weighted = write(tmp_path / "w.jsonl", [dict(row, weight=index + 0.5) for index, row in enumerate(ROWS[:4])])
    plain = write(tmp_path / "p.jsonl", ROWS[4:6])
    config = DataConfig(max_length=256, cache_dir=str(tmp_path / "cache"))
    entries = [{"path": str(weighted), "proportion": 2}, {"path": str(plain)}]
    splits, _, _ = prepare_mixture(entries, tokenizer, config, None, 42)
    assert splits.train.examples.weights.tolist() == [0.5, 1.5, 2.5, 3.5] * 2 + [1.0, 1.0]
    alone, _, _ = prepare_mixture([{"path": str(plain)}], tokenizer, config, None, 42)
    assert alone.train.examples.weights is None  # all 1: the unweighted path


def test_fraction_from_a_config_file_is_checked_once_and_again_alike(tokenizer, tmp_path, monkeypatch):
    """The command line checks the entries as it reads the file, the run checks them again: both must agree."""
    write(tmp_path / "a.jsonl", ROWS[:6])
    monkeypatch.chdir(tmp_path)
    both = write_yaml(tmp_path, [{"path": "json", "data_files": "a.jsonl", "fraction": 0.5}, {"path": "a.jsonl"}])
    data = parse_flags((DataConfig,), ["--config", str(both)], "minisft.train", "")[0]
    with pytest.raises(MixtureError, match="fraction must be set on every entry or on none"):
        prepare_mixture(data.datasets, tokenizer, dataclasses.replace(data, cache_dir="none"), None, 42)
    shares = write_yaml(
        tmp_path, [{"path": "a.jsonl", "fraction": 1}, {"path": "json", "data_files": "a.jsonl", "fraction": 1}]
    )
    data = parse_flags((DataConfig,), ["--config", str(shares)], "minisft.train", "")[0]
    splits, line, _ = prepare_mixture(data.datasets, tokenizer, dataclasses.replace(data, cache_dir="none"), None, 42)
    assert len(splits.train.examples) == 12 and "first 6 of 6 (fraction 1)" in line
