"""--probe_prompts: asked before the first step, at every evaluation and at the end, answers in probes.jsonl, match
rates per kind in the eval metrics, the before/after table in the summary; a bad file refused before any work.

The tiny model learns one short answer ("Name a colour." → "Teal.") in 15 steps at a high learning rate: its probe
matches 0 times before and once after, so a run that never asked, or asked a model that had not changed, fails.
"""

import io
import json
import os
import subprocess
import sys
import types
from contextlib import nullcontext

import pytest
from rich.console import Console

from minisft.machinery.cli import run
from minisft.machinery.config import ConfigError, DataConfig, LoraConfig, ModelConfig, RunConfig, TrainingConfig
from minisft.machinery.generate import generate, load_for_chat
from minisft.machinery.loop import train
from minisft.machinery.models import tiny_model
from minisft.machinery.outputs import OWN_NAMES, read_manifest
from minisft.machinery.probes import ProbeError, Probes, open_probes, read_probes
from minisft.machinery.reporting import MetricsLog
from minisft.summary import main as summary_main
from minisft.summary import print_summary
from minisft.train import main

from .tiny_runs import GEMMA_TEMPLATE

pytestmark = pytest.mark.usefixtures("one_thread")

ROW = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]}
PROBES = [
    {"prompt": "Name a colour.", "expected": "teal", "kind": "trained"},  # any case: the answer is "Teal."
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, ROW["messages"][0]]},
    {"prompt": "Say hello.", "kind": "general"},  # no expected answer: asked and shown, never counted
]
LEARNS = dict(max_steps=15, learning_rate=3e-2, per_device_train_batch_size=1, logging_steps=5, save_steps=0)


def write_lines(path, rows) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def data(tmp_path):
    """A dataset folder whose train and test splits are the one conversation, and the probe file."""
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "train.jsonl", [ROW])
    write_lines(tmp_path / "data" / "test.jsonl", [ROW])
    return tmp_path / "data", write_lines(tmp_path / "probes.jsonl", PROBES)


def config(model_dir, dataset, output_dir, lora=None, **training) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model_name_or_path=model_dir),
        data=DataConfig(dataset_name=str(dataset), assistant_only_loss=True),
        lora=lora or LoraConfig(),
        training=TrainingConfig(output_dir=str(output_dir), **{**LEARNS, **training}),
    )


def lines(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "probes.jsonl").read_text(encoding="utf-8").splitlines()]


def test_probes_are_answered_before_at_each_evaluation_and_after(tiny_dir, data, tmp_path, capsys):
    dataset, probes = data
    output_dir = tmp_path / "out"
    run_config = config(tiny_dir, dataset, output_dir, eval_strategy="steps", eval_steps=5, probe_prompts=probes)
    train(run_config, Console(file=io.StringIO()))

    answered = lines(output_dir)
    assert [line["step"] for line in answered] == [0] * 3 + [5] * 3 + [10] * 3 + [15] * 3
    assert [line["kind"] for line in answered[:3]] == ["trained", "held_out", "general"]  # held_out: the default
    assert [line["prompt"] for line in answered[:3]] == ["Name a colour.", "Name a colour.", "Say hello."]
    assert set(answered[0]) == {"step", "kind", "prompt", "answer", "expected", "match"}
    first, last = answered[0], answered[-3]
    assert first["match"] is False and "teal" not in first["answer"].lower()
    assert last["match"] is True and last["answer"].startswith("Teal")  # learnt, and matched in any case
    assert answered[-1]["expected"] is None and answered[-1]["match"] is None

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "epoch": 0.0, "eval_probe_match_trained": 0.0}  # before the first step
    evaluated = [record for record in records if "eval_loss" in record]
    assert [record["step"] for record in evaluated] == [5, 10, 15]
    assert all("eval_probe_match_trained" in record for record in evaluated)
    assert evaluated[-1]["eval_probe_match_trained"] == 1.0
    assert not any("eval_probe_match_general" in record for record in records)  # no expected answers: no rate
    assert "probes.jsonl" in read_manifest(output_dir)["created"] and OWN_NAMES.fullmatch("probes.jsonl")

    capsys.readouterr()
    summary_main([str(output_dir)])  # python -m minisft.summary OUTPUT_DIR
    shown = " ".join(capsys.readouterr().out.split())  # a title or caption wider than the terminal is wrapped
    assert "before (step 0) and after (step 15) training" in shown and "matched: trained 0/1 → 1/1" in shown
    wide = Console(file=io.StringIO(), width=400)
    print_summary(output_dir, wide)
    [row] = [line for line in wide.file.getvalue().splitlines() if "│ trained " in line]
    assert [cell.strip()[:6] for cell in row.split("│")[1:-1]] == ["traine", "Name a", "teal", "✗", "✓ Teal"]


def test_without_an_evaluation_the_probes_are_asked_at_the_end(tiny_dir, data, tmp_path):
    dataset, probes = data
    output_dir = tmp_path / "out"
    train(config(tiny_dir, dataset, output_dir, max_steps=3, probe_prompts=probes), Console(file=io.StringIO()))
    assert [line["step"] for line in lines(output_dir)] == [0] * 3 + [3] * 3
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval_probe_match_trained" in records[-1] and records[-1]["step"] == 3 and "loss" in records[-1]


def test_lora_answers_come_from_the_adapters_in_eval_mode(chatty_dir, data, tmp_path):
    """The last in-run answers equal those of the saved adapter merged into its base (generate.load_for_chat):
    the adapters were in the forward pass, and LoRA's dropout (0.5 here) was off."""
    dataset, probes = data
    output_dir = tmp_path / "out"
    lora = LoraConfig(use_peft=True, lora_target_modules=["all-linear"], lora_dropout=0.5)
    train(config(chatty_dir, dataset, output_dir, lora, max_steps=4, probe_prompts=probes), Console(file=io.StringIO()))
    answered = lines(output_dir)
    model, tokenizer = load_for_chat(str(output_dir))
    saved = generate(model, tokenizer, [probe.messages for probe in read_probes(probes)], max_new_tokens=32)
    assert [line["answer"] for line in answered[3:]] == saved
    assert [line["answer"] for line in answered[:3]] != saved  # the adapters changed the answers


def test_asking_restores_the_models_mode(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    one_process = types.SimpleNamespace(is_main=True, distributed=False)
    asked = read_probes(write_lines(tmp_path / "p.jsonl", PROBES))
    probes = Probes(asked, tokenizer, tmp_path / "probes.jsonl", 4, 2, one_process, None, Console(file=io.StringIO()))
    for training in (True, False):
        model.train(training)
        probes.answer(model, 0, nullcontext)
        assert model.training is training
    assert len(lines(tmp_path)) == 6  # 3 probes, asked twice, each line appended


def test_a_resume_keeps_the_answers_up_to_its_checkpoint_and_drops_a_torn_line(tiny_dir, data, tmp_path):
    dataset, probes = data
    output_dir = tmp_path / "out"
    quiet = Console(file=io.StringIO())
    train(config(tiny_dir, dataset, output_dir, max_steps=6, save_steps=3, probe_prompts=probes), quiet)
    with open(output_dir / "probes.jsonl", "a", encoding="utf-8") as file:
        file.write('{"step": 6, "kind": "tra')  # a kill in the middle of a write
    resumed = config(tiny_dir, dataset, output_dir, max_steps=6, probe_prompts=probes)
    resumed.training.resume_from_checkpoint = str(output_dir / "checkpoint-3")
    console = Console(file=io.StringIO(), width=300)
    train(resumed, console)
    assert [line["step"] for line in lines(output_dir)] == [0] * 3 + [6] * 3  # step 0's kept, step 6's asked again
    assert "probes.jsonl line 7: dropped" in console.file.getvalue()


BAD_FILES = [
    ("not json\n", "line 1: not valid JSON"),
    ('{"prompt": "a"}\n["a"]\n', "line 2: a probe is a JSON object"),
    ('{"prompt": "a", "answer": "b"}\n', "line 1: unknown field 'answer'"),
    ('\n{"prompt": "a", "kind": "trained set"}\n', 'line 2: kind must be one of trained, held_out, general, got "'),
    ('{"prompt": "a", "messages": []}\n', "line 1: give the question as prompt"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "ending with a user"),
    ('{"prompt": "a", "expected": " "}\n', "line 1: expected must be non-empty text"),
    ('{"prompt": ""}\n', "line 1: prompt must be non-empty text"),
    ("\n\n", "no probes in it"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_a_bad_probe_file_is_one_line_before_any_work(tmp_path, capsys, text, message):
    path = tmp_path / "probes.jsonl"
    path.write_text(text, encoding="utf-8")
    # A model that does not exist: the probe file is refused before anything is loaded.
    flags = ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        run(main, [*flags, "--output_dir", str(tmp_path / "out"), "--probe_prompts", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error and str(path) in error
    assert not (tmp_path / "out").exists()


def test_the_answers_file_is_not_the_prompts_file_and_fsdp_is_refused(tmp_path, monkeypatch, capsys):
    path = write_lines(tmp_path / "probes.jsonl", PROBES)
    with pytest.raises(SystemExit):
        run(main, ["--dataset_name", path, "--output_dir", str(tmp_path), "--probe_prompts", path])
    assert "is where the run writes its answers (probes.jsonl in --output_dir)" in capsys.readouterr().err
    assert json.loads((tmp_path / "probes.jsonl").read_text().splitlines()[0]) == PROBES[0]  # untouched
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--probe_prompts cannot run with --fsdp"):
        RunConfig(training=TrainingConfig(output_dir=str(tmp_path / "o"), fsdp=True, probe_prompts=path))


def test_the_trackers_get_the_answers_as_a_table(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []
    wandb = types.ModuleType("wandb")
    wandb.init, wandb.finish = (lambda **kwargs: None), (lambda: None)
    wandb.log = lambda figures, step: calls.append((figures, step))
    wandb.Table = lambda columns, data: ("Table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    log = MetricsLog(tmp_path, 0, ["tensorboard", "wandb"], "run", {})
    log.write_table("probes", ["kind", "answer", "match"], [["trained", "Teal | blue", True]], 3)
    log.close()
    assert calls == [({"eval/probes": ("Table", ["kind", "answer", "match"], [["trained", "Teal | blue", True]])}, 3)]
    events = EventAccumulator(str(tmp_path / "runs" / "run"), size_guidance={"tensors": 0})
    events.Reload()
    [text] = events.Tensors("eval/probes/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert (
        text.step == 3 and "| kind | answer | match |" in markdown and "| trained | Teal \\| blue | True |" in markdown
    )


def test_under_torchrun_rank_0_answers_once_and_both_processes_finish(tiny_dir, data, tmp_path):
    dataset, probes = data
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minisft.train",
        "--model_name_or_path", tiny_dir, "--dataset_name", str(dataset), "--output_dir", str(output_dir),
        "--max_steps=2", "--save_steps=0", "--eval_strategy=steps", "--eval_steps=1", "--assistant_only_loss",
        "--per_device_train_batch_size=1", "--probe_prompts", probes,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in lines(output_dir)] == [0] * 3 + [1] * 3 + [2] * 3  # once: rank 0's
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "eval_probe_match_trained" in record] == [0, 1, 2]


def test_the_demo_probes_ask_the_held_out_questions(tokenizer):
    """The demo's probe file (minisft/demo_probes.jsonl) reads as probes, and asks test.jsonl's held-out questions."""
    from minisft.machinery.cli import demo_dataset_path
    from minisft.machinery.data_files import load_splits
    from minisft.train import DEMO_PROBES

    demo = read_probes(DEMO_PROBES)
    held_out = [example["messages"][-2]["content"] for example in load_splits(demo_dataset_path()).eval]
    assert [probe.prompt for probe in demo if probe.kind == "held_out"] == held_out
    assert [probe.kind for probe in demo] == ["trained", "trained", "held_out", "held_out", "held_out", "general"]
    assert all(probe.expected for probe in demo)
    assert all(tokenizer.apply_chat_template(probe.messages, tokenize=False) for probe in demo)


def test_a_probe_the_chat_template_refuses_is_named_before_the_first_step(fresh_tokenizer, tmp_path):
    """Gemma's template refuses a system turn: said with the probe's line when the run opens its probes."""
    fresh_tokenizer.chat_template = GEMMA_TEMPLATE
    system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    path = write_lines(tmp_path / "p.jsonl", [PROBES[0], system])
    args = TrainingConfig(output_dir=str(tmp_path / "out"), probe_prompts=path)
    one_process = types.SimpleNamespace(is_main=True, distributed=False)
    with pytest.raises(ProbeError, match=r"p\.jsonl line 2: the chat template cannot render this probe: System role"):
        open_probes(args, tmp_path, 0, fresh_tokenizer, one_process, None, Console(file=io.StringIO()))
