"""`python -m minisft.train`: flags, config files, TensorBoard, and clear errors."""

import json
import sys

import pytest

from minisft.machinery.cli import demo_dataset_path, run
from minisft.train import main


def test_flags_and_a_yaml_config_file(tiny_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_dir}\nmax_steps: 5\nlogging_steps: 1\nlearning_rate: 0.001\n")
    output_dir = tmp_path / "out"
    # The command line overrides the file: 2 steps, not 5.
    main(["--config", str(config), "--max_steps", "2", "--output_dir", str(output_dir), "--report_to", "tensorboard"])
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1, 2]  # 0: the demo's probes answered before training
    assert "eval_probe_match_trained" in records[0] and records[1]["learning_rate"] == 0.001
    assert list((output_dir / "runs" / "out").glob("events.out.tfevents.*"))  # the run name: output_dir's
    assert "done: 2 steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optim", "sgd"], "invalid choice: 'sgd' (choose from 'adamw_torch_fused', 'adamw_torch', 'adamw_8bit'"),
        (["--lr_scheduler_type", "step"], "choose from 'linear', 'cosine', 'constant', 'constant_with_warmup'"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    ],
)
def test_unknown_flag_or_value_lists_the_choices(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_with_an_unknown_key(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"learning_rate": 1e-4, "lerning_rate": 1e-4}))
    with pytest.raises(SystemExit):
        run(main, ["--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown flags ['lerning_rate']" in err and "Traceback" not in err


def test_bad_values_are_one_line(capsys):
    with pytest.raises(SystemExit):
        run(main, ["--per_device_train_batch_size", "0"])
    assert "--per_device_train_batch_size must be at least 1" in capsys.readouterr().err


def flash_attention_2_usable() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


@pytest.mark.parametrize(
    "flags, hidden_module, message",
    [
        (["--report_to", "tensorboard"], "torch.utils.tensorboard", "--report_to tensorboard needs the tensorboard"),
        (["--optim", "adamw_8bit"], "bitsandbytes", "--optim adamw_8bit needs the bitsandbytes package"),
        (["--use_peft", "--load_in_4bit"], "bitsandbytes", "--load_in_4bit needs the bitsandbytes package"),
    ],
)
def test_a_missing_optional_package_is_one_line_before_any_work(
    flags, hidden_module, message, tiny_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, hidden_module, None)  # `import hidden_module` now raises ImportError
    output_dir = tmp_path / "out"
    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(demo_dataset_path()), "--output_dir"]
    with pytest.raises(SystemExit) as exit_info:
        run(main, common + [str(output_dir), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "pip install" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not output_dir.exists()  # asked for before the run touched anything


@pytest.mark.skipif(flash_attention_2_usable(), reason="flash-attn and a CUDA GPU are here: nothing is missing")
def test_flash_attention_without_its_package_or_gpu_is_one_line(tiny_dir, tmp_path, capsys):
    flags = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(demo_dataset_path())]
    with pytest.raises(SystemExit) as exit_info:
        run(main, flags + ["--output_dir", str(tmp_path / "out"), "--attn_implementation", "flash_attention_2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--attn_implementation flash_attention_2 needs" in err and "Traceback" not in err
    # The fix it names: the package when it is missing, a GPU (or sdpa) when the package is there.
    assert "pip install flash-attn" in err or "CUDA GPU" in err
