"""Every flag's value is checked as the flags are parsed: one line naming the flag, the value and the accepted
range, exit status 2, before any data or model is read. And the flags under their TRL / transformers 5 names:
--dtype (auto included), --warmup_steps as a fraction, --lr_scheduler_kwargs."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments, get_scheduler

import minisft.machinery.config
import minisft.machinery.loop
from minisft.machinery.cli import parse_flags, run
from minisft.machinery.config import ConfigError, ModelConfig, notice
from minisft.machinery.models import tiny_model
from minisft.train import CONFIG_TYPES, main

from .tiny_runs import data_file_of, metrics


class ModelLoaded(Exception):
    """Raised in place of loading a model: a test that sees it got past every check before the model."""


def load_model_refused(*args, **kwargs):
    raise ModelLoaded


def parse(argv):
    return parse_flags(CONFIG_TYPES, argv, "minisft.train", "test")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--warmup_ratio", "2"], "--warmup_ratio must be a fraction of the run in [0, 1], got 2."),
        (
            ["--warmup_steps", "-1"],
            "--warmup_steps must be a whole number of steps, or a fraction of the run in [0, 1)",
        ),
        (["--warmup_steps", "2.5"], "got 2.5"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be positive, got 0."),
        (["--max_steps", "-2"], "--max_steps must be a number of steps, or -1"),
        (["--lora_dropout", "1.5"], "--lora_dropout must be a probability in [0, 1), got 1.5."),
        (["--lora_r", "0"], "--lora_r must be a rank of at least 1, got 0."),
        (["--lora_alpha", "-8"], "--lora_alpha must be positive, got -8."),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be 0 (no clipping) or more, got -1."),
        (["--weight_decay", "-1"], "--weight_decay must be 0 or more, got -1."),
        (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1), got 1.5."),
        (["--adam_beta2", "-0.1"], "--adam_beta2 must be in [0, 1), got -0.1."),
        (["--save_total_limit", "-1"], "--save_total_limit must be 0 (keep all) or more, got -1."),
        (["--save_steps", "-5"], "--save_steps must be a whole number of steps (0: never), or a fraction of the"),
        (["--save_steps", "2.5"], "--save_steps must be a whole number of steps (0: never), or a fraction"),
        (["--eval_steps", "0"], "--eval_steps must be a whole number of steps, or a fraction of the run in (0, 1)"),
        (["--logging_steps", "0"], "--logging_steps must be a whole number of steps, or a fraction of the run in"),
        (["--logging_steps", "1.5"], "--logging_steps must be a whole number of steps, or a fraction"),
        (["--neftune_noise_alpha", "0"], "--neftune_noise_alpha must be positive (the NEFTune paper uses 5 to 15)"),
        (["--max_length", "0"], "--max_length must be a positive number of tokens, got 0."),
        (["--eval_split_size", "1.5"], "--eval_split_size must be a fraction in [0, 1), got 1.5."),
        (["--learning_rate", "0"], "--learning_rate must be positive, got 0."),
        (["--pad_to_multiple_of", "0"], "--pad_to_multiple_of must be at least 1, got 0."),
        (["--lr_scheduler_kwargs", "{bad"], "--lr_scheduler_kwargs {bad: not valid JSON"),
        (["--lr_scheduler_kwargs", "[1]"], "--lr_scheduler_kwargs must be a JSON object of settings, got [1]."),
        (["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"min_lr": 1}'], "takes only num_cycles"),
        (["--lr_scheduler_type", "warmup_stable_decay"], "num_decay_steps, the steps of the final decay, is required"),
        (["--dtype", "float16"], "--dtype float16: float16 weights need a CUDA GPU"),
        (["--torch_dtype", "float16"], "--torch_dtype float16: float16 weights need a CUDA GPU"),
    ],
)
def test_a_bad_value_is_one_line_before_the_model_is_looked_for(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # float16 is refused without CUDA, so here too
    monkeypatch.setattr(minisft.machinery.loop, "load_model", load_model_refused)
    missing = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--dataset_name", str(tmp_path / "no.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        run(main, missing + ["--output_dir", str(tmp_path / "out")] + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # A deprecated alias (--warmup_ratio, --torch_dtype) adds its notice; the error is one line about the flag.
    errors = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert errors == [errors[0]] and errors[0].startswith("error: ") and message in errors[0], err
    assert "no-such-model" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_float16_is_accepted_where_cuda_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ModelConfig(dtype="float16").resolved_dtype() == "float16"


def test_eval_strategy_without_an_eval_split_is_refused_before_the_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minisft.machinery.loop, "load_model", load_model_refused)
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir)), "--max_length", "64"]
    flags += ["--output_dir", str(tmp_path / "out"), "--eval_strategy", "steps"]
    with pytest.raises(SystemExit) as exit_info:
        run(main, flags)  # one file: no test split, and nothing held out
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --eval_strategy steps: there is no eval split") and "--eval_split_size" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(ModelLoaded):  # a held-out fraction is an eval split: on to the model
        main(flags + ["--eval_split_size", "0.2", "--overwrite_output_dir"])


def test_torch_dtype_and_warmup_ratio_are_deprecated_aliases(capsys):
    notice.cache_clear()  # the notices print once per process
    model, *_, training = parse(["--torch_dtype", "bfloat16", "--warmup_ratio", "0.1"])
    assert model.resolved_dtype() == "bfloat16"
    assert training.warmup_ratio == 0.1 and training.warmup_steps == 0
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2 and all(line.startswith("note: ") for line in notes)
    assert "--torch_dtype is deprecated" in notes[0] and "--dtype" in notes[0]
    assert "--warmup_ratio is deprecated" in notes[1] and "--warmup_steps" in notes[1]
    model, *_, training = parse(["--dtype", "bfloat16", "--warmup_steps", "0.03"])
    assert model.resolved_dtype() == "bfloat16" and training.warmup_steps == 0.03
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float32])
def test_dtype_auto_is_the_dtype_transformers_reads_from_the_checkpoint(tokenizer, tmp_path, saved):
    tiny_model(tokenizer).to(saved).save_pretrained(tmp_path)
    by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype
    assert by_transformers == saved
    assert ModelConfig(model_name_or_path=str(tmp_path), dtype="auto").resolved_dtype() == str(saved).split(".")[1]


def test_dtype_auto_without_a_dtype_in_config_json_is_float32(tokenizer, tmp_path):
    tiny_model(tokenizer).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelConfig(model_name_or_path=str(tmp_path), dtype="auto").resolved_dtype() == "float32"


def test_dtype_auto_refuses_a_float16_checkpoint_without_cuda(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_model(tokenizer).to(torch.float16).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"--dtype auto \(float16 in the config.json of .*\): float16 weights need"):
        ModelConfig(model_name_or_path=str(tmp_path), dtype="auto").resolved_dtype()


def test_lr_scheduler_kwargs_from_the_command_line_or_a_config_file(tmp_path):
    kwargs = {"num_decay_steps": 3, "decay_type": "1-sqrt"}
    *_, training = parse(["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs", json.dumps(kwargs)])
    assert training.lr_scheduler_kwargs == kwargs
    config = tmp_path / "run.yaml"
    config.write_text("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs:\n  min_lr_rate: 0.1\n")
    *_, training = parse(["--config", str(config)])
    assert training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_help_lists_the_new_flags_and_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ["--dtype {float32,bfloat16,float16,auto}", "--torch_dtype", "--lr_scheduler_kwargs", "--warmup_ratio"]:
        assert text in out
    for value in ["adamw_torch_fused", "paged_adamw_32bit", "adafactor", "cosine_with_min_lr", "cosine_with_restarts"]:
        assert value in out
    assert "polynomial" in out and "warmup_stable_decay" in out
    for text in ["--save_strategy {no,steps,epoch}", "--neftune_noise_alpha", "--run_name", "--eval_on_start"]:
        assert text in out
    assert "--logging_first_step" in out


def test_a_run_follows_its_schedule_and_warmup_fraction(tiny_dir, tmp_path):
    """The loop reads the flags as transformers would: the learning rate of every logged step is get_scheduler's,
    the warmup a quarter of the run (--warmup_steps 0.25), under --dtype auto and --optim adafactor."""
    output_dir = tmp_path / "out"
    kwargs = {"min_lr_rate": 0.1}
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir)), "--max_length", "64"]
    flags += ["--output_dir", str(output_dir), "--max_steps", "8", "--logging_steps", "1", "--learning_rate", "1e-3"]
    flags += ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", json.dumps(kwargs)]
    flags += ["--warmup_steps", "0.25", "--dtype", "auto", "--optim", "adafactor", "--save_steps", "0"]
    main(flags)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, warmup_steps=0.25)
    reference = get_scheduler(
        "cosine_with_min_lr",
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
        num_warmup_steps=args.get_warmup_steps(8),
        num_training_steps=8,
        scheduler_specific_kwargs=kwargs,
    )
    expected = []
    for _ in range(8):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [record["learning_rate"] for record in metrics(output_dir)] == expected
    assert expected[:2] == [0.0, 0.0005]  # 2 warmup steps


def test_paged_adamw_32bit_without_bitsandbytes_is_one_line_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir))]
    with pytest.raises(SystemExit) as exit_info:
        run(main, flags + ["--output_dir", str(tmp_path / "out"), "--optim", "paged_adamw_32bit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --optim paged_adamw_32bit needs the bitsandbytes package: pip install")
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
