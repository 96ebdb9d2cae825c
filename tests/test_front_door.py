"""The front door in TRL's shape (minisft/trainer.py): the seeds' own Python runs on it, it trains what the CLI's loop
trains, its callbacks hear the run, and what minisft does not have is refused in one line."""

import io
import json
import os

import pytest
import torch
from datasets import Dataset, DatasetDict
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import minisft
from minisft import (
    DataCollatorForCompletionOnlyLM,
    LoraConfig,
    SFTConfig,
    SFTTrainer,
    TrainingArguments,
    get_peft_model,
)
from minisft.errors import UserError
from minisft.machinery import loop
from minisft.machinery.config import LoraConfig as LoraFlags
from minisft.sft.chat_template import format_batch

from .tiny_runs import CONVERSATIONS, data_file_of, run_config

pytestmark = pytest.mark.usefixtures("one_thread")

RESPONSE_TEMPLATE = "<|im_start|>assistant\n"


def loaded(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def conversations() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CONVERSATIONS
    ]


def quiet_trainer(*args, **kwargs) -> SFTTrainer:
    """An SFTTrainer whose console (the run's lines, its summary) is kept in trainer.log instead of printed."""
    trainer = SFTTrainer(*args, **kwargs)
    trainer.log = io.StringIO()
    trainer.console = Console(file=trainer.log, width=200)
    return trainer


def test_the_first_seeds_code_shape_trains_the_model_in_memory(tiny_dir, tmp_path):
    """The first seed's cells, imports swapped to minisft: bfloat16 weights, get_peft_model, TrainingArguments with
    adamw_8bit, bf16 and tensorboard, the collator, a batch formatting_func, dataset_kwargs, tokenizer= and
    max_seq_length=."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    conversation = [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]
    chat = Dataset.from_dict({"conversation": [conversation]})

    def formatting_prompts_func(example):
        output_texts = []
        for c in example["conversation"]:
            text = tokenizer.apply_chat_template(c, tokenize=False) + tokenizer.eos_token
            output_texts.append(text)
        return output_texts

    args = TrainingArguments(
        per_device_train_batch_size=8, num_train_epochs=6, learning_rate=1e-2, optim="adamw_8bit", bf16=True,
        output_dir=str(tmp_path / "out"), report_to=["tensorboard"], logging_steps=1,
    )  # fmt: skip
    collator = DataCollatorForCompletionOnlyLM(tokenizer=tokenizer, response_template=RESPONSE_TEMPLATE)
    trainer = quiet_trainer(
        model, tokenizer=tokenizer, train_dataset=chat, max_seq_length=1024, args=args,
        formatting_func=formatting_prompts_func, data_collator=collator, dataset_kwargs={"add_special_tokens": False},
    )  # fmt: skip
    untrained = {name: weight.clone() for name, weight in model.named_parameters() if weight.requires_grad}
    output = trainer.train()

    assert trainer.model is model  # trained in place, ready for generate
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[name], weight) for name, weight in untrained.items() if "lora_B" in name)
    history = trainer.state.log_history
    assert [record["step"] for record in history] == list(range(1, 7)) and output.global_step == 6
    assert history[-1]["loss"] < history[0]["loss"]
    assert output.training_loss == pytest.approx(sum(record["loss"] for record in history) / 6)
    # The collator's masking: only what follows the response template is trained (the answer and its ends).
    answer = tokenizer("我学会了<|im_end|>\n<|im_end|>", add_special_tokens=False)["input_ids"]
    assert history[0]["num_tokens"] == len(answer)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 16
    assert list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))  # report_to=["tensorboard"]
    assert next(model.parameters()).dtype == torch.bfloat16  # trained in the dtype it was loaded in
    assert "run summary" in trainer.log.getvalue()
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer.encode(prompt, add_special_tokens=False, return_tensors="pt")
    assert model.generate(inputs, max_new_tokens=3, do_sample=False).shape == (1, inputs.shape[1] + 3)


def test_the_second_seeds_code_shape_packs_and_evaluates(tiny_dir, tmp_path):
    """SFTConfig with packing and eval_strategy="steps", processing_class=, a DatasetDict's two splits."""
    model, tokenizer = loaded(tiny_dir)
    ds = DatasetDict({"train": Dataset.from_list(conversations()[:8]), "test": Dataset.from_list(conversations()[8:])})
    training_args = SFTConfig(
        output_dir=str(tmp_path / "sft_output"), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-3,
        logging_steps=1, save_steps=2, eval_strategy="steps", eval_steps=2, packing=True, max_length=64,
    )  # fmt: skip
    trainer = quiet_trainer(
        model=model, args=training_args, train_dataset=ds["train"], eval_dataset=ds["test"], processing_class=tokenizer
    )
    trainer.train()

    log = trainer.log.getvalue()
    assert "data (train): 8 examples" in log and "packed into" in log and "data (eval): 2 examples" in log
    evaluated = [record["step"] for record in trainer.state.log_history if "eval_loss" in record]
    assert evaluated == [2, 4]
    assert (tmp_path / "sft_output" / "checkpoint-2").is_dir()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.log_history[-1]["eval_loss"])
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(saved, model.model.embed_tokens.weight)


def test_the_front_door_trains_what_the_loop_trains(tiny_dir, tmp_path):
    """A model and rows handed over in memory, LoRA from peft_config: the same weights, to the bit, as the loop
    given the model's folder and the data's file with the same flags."""
    settings = dict(max_steps=3, learning_rate=1e-3, logging_steps=1, save_steps=0, max_length=256)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    loop.train(
        run_config(tiny_dir, tmp_path / "cli", lora=LoraFlags(**lora.flags()), max_steps=3, learning_rate=1e-3),
        Console(file=io.StringIO()),
    )
    model, tokenizer = loaded(tiny_dir)
    trainer = quiet_trainer(
        model, args=SFTConfig(output_dir=str(tmp_path / "door"), **settings), train_dataset=conversations(),
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    trainer.train()

    cli = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    door = load_file(tmp_path / "door" / "adapter_model.safetensors")
    assert cli.keys() == door.keys() and len(cli) == 8
    assert all(torch.equal(cli[name], door[name]) for name in cli)
    # The CLI's route through the door too: the model and the data by name.
    by_name = quiet_trainer(
        tiny_dir, args=SFTConfig(output_dir=str(tmp_path / "named"), **settings),
        train_dataset=str(data_file_of(tiny_dir)), peft_config=lora,
    )  # fmt: skip
    by_name.train()
    named = load_file(tmp_path / "named" / "adapter_model.safetensors")
    assert all(torch.equal(cli[name], named[name]) for name in cli)
    assert by_name.model is not None and by_name.model.training is False  # loaded by the loop, handed back


class Recorder(TrainerCallback):
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_step_end(self, args, state, control, **kwargs):
        self.calls.append(("step_end", state.global_step))
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.calls.append(("log", logs["step"], len(state.log_history)))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.calls.append(("evaluate", state.global_step, round(metrics["eval_loss"], 6)))

    def on_save(self, args, state, control, **kwargs):
        saved = (args.output_dir and f"{args.output_dir}/checkpoint-{state.global_step}") or ""
        self.calls.append(("save", state.global_step, os.path.isdir(saved)))

    def on_train_end(self, args, state, control, **kwargs):
        self.calls.append(("train_end", state.global_step, kwargs["model"] is not None))


def test_callbacks_hear_the_run_and_can_stop_it(tiny_dir, tmp_path):
    model, tokenizer = loaded(tiny_dir)
    recorder, events = Recorder(), []
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, learning_rate=1e-3, logging_steps=2, eval_strategy="steps",
        eval_steps=4, save_steps=2, eval_split_size=0.2,
    )  # fmt: skip
    plain = lambda event, **info: events.append(event)  # noqa: E731
    trainer = quiet_trainer(model, args=args, train_dataset=conversations(), processing_class=tokenizer,
                            callbacks=[recorder, plain])  # fmt: skip
    trainer.train()

    eval_loss = round(trainer.state.log_history[-1]["eval_loss"], 6)
    assert recorder.calls == [
        ("step_end", 1), ("step_end", 2), ("log", 2, 1), ("save", 2, True), ("step_end", 3), ("step_end", 4),
        ("evaluate", 4, eval_loss), ("log", 4, 2), ("train_end", 4, True),
    ]  # fmt: skip
    assert events[0] == "train_begin" and events[-1] == "train_end" and events.count("step_end") == 4

    stopper = Recorder(stop_at=2)
    model, tokenizer = loaded(tiny_dir)
    args = SFTConfig(output_dir=str(tmp_path / "stopped"), max_steps=6, learning_rate=1e-3, save_steps=0)
    trainer = quiet_trainer(model, args=args, train_dataset=conversations(), processing_class=tokenizer,
                            callbacks=[stopper])  # fmt: skip
    output = trainer.train()
    assert output.global_step == 2 and stopper.calls[-1] == ("train_end", 2, True)
    assert (tmp_path / "stopped" / "model.safetensors").is_file()  # ended as a finished run ends: its model written


def test_fields_are_the_clis_flags_checked_as_the_cli_checks_them(tiny_dir, capsys):
    with pytest.raises(UserError, match=r"--eval_strategy must be one of no, steps, epoch, got \"step\""):
        SFTConfig(eval_strategy="step")
    with pytest.raises(
        UserError, match=r"\(learning_rte=\.\.\.\): minisft has no such field; the closest is learning_rate"
    ):
        SFTConfig(learning_rte=1e-4)
    assert SFTConfig(max_seq_length=77).max_length == 77
    assert SFTConfig(evaluation_strategy="epoch").eval_strategy == "epoch"
    assert TrainingArguments is SFTConfig
    assert SFTConfig(disable_tqdm=True, log_level="info").to_dict()["max_length"] == 1024
    assert (
        "note: SFTConfig: left out, as they do nothing in minisft: disable_tqdm, log_level" in capsys.readouterr().err
    )
    with pytest.raises(UserError, match="push_to_hub=True"):
        SFTConfig(push_to_hub=True)
    model, tokenizer = loaded(tiny_dir)
    rows, args = conversations(), SFTConfig(max_length=512)
    trainer = SFTTrainer(model, args=args, processing_class=tokenizer, train_dataset=rows, max_seq_length=64)
    assert trainer.args.max_length == 64 and trainer.args.model_name_or_path == tiny_dir
    with pytest.raises(UserError, match="compute_metrics"):
        SFTTrainer(model, train_dataset=conversations(), compute_metrics=lambda _: {})


def test_add_special_tokens_false_encodes_texts_without_them():
    """dataset_kwargs={"add_special_tokens": False}: the texts hold the template's tokens already (a BOS too)."""

    class BosTokenizer:  # a tokenizer that starts every text with a BOS (id 1) when asked to add special tokens
        eos_token = "</s>"

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1] * add_special_tokens + [len(text)] for text in texts]}

    rows = [{"text": "<s>hello</s>"}, {"prompt": "<s>a", "completion": "b</s>"}]
    for row in rows:
        assert format_batch([row], BosTokenizer(), "</s>")[0].input_ids[0] == 1
        assert format_batch([row], BosTokenizer(), "</s>", add_special_tokens=False)[0].input_ids[0] != 1
    assert SFTConfig(dataset_kwargs={"add_special_tokens": False}).add_special_tokens is False


def test_import_minisft_stays_cheap():
    import subprocess
    import sys

    code = "import sys, minisft; print('transformers' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False"] * 2
    assert minisft.SFTTrainer is SFTTrainer
    assert AutoTokenizer.from_pretrained(minisft.embedded_model_path()).chat_template  # the embedded model, local


def test_formatting_func_of_one_example_or_of_a_batch():
    """Both TRL generations' formatting functions: of a batch (a dict of columns, a list back), of one example."""
    from minisft.trainer import formatted

    rows = [{"question": "Two plus two?", "answer": "Four."}, {"question": "Sky?", "answer": "Blue."}]
    one = lambda example: f"Q: {example['question']} A: {example['answer']}"  # noqa: E731
    batch = lambda examples: [f"Q: {q} A: {a}" for q, a in zip(examples["question"], examples["answer"])]  # noqa: E731
    expected = [{"text": "Q: Two plus two? A: Four."}, {"text": "Q: Sky? A: Blue."}]
    assert formatted(rows, one, "text") == formatted(Dataset.from_list(rows), batch, "text") == expected


def test_a_model_given_with_its_lora_resumes_exactly(tiny_dir, tmp_path):
    """get_peft_model's adapters start random: a resume must know the base under them (not the adapters' own start)
    as the checkpoint's, and go on to the uninterrupted run's weights."""
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, learning_rate=1e-3, save_steps=2, logging_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ends = []
    for resume in (None, True):
        model, tokenizer = loaded(tiny_dir)
        model = get_peft_model(model, lora)
        trainer = quiet_trainer(model, args=args, train_dataset=conversations(), processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        ends.append(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    assert "resumed from" in trainer.log.getvalue() and [record["step"] for record in trainer.state.log_history] == [
        3,
        4,
    ]
    assert all(torch.equal(ends[0][name], ends[1][name]) for name in ends[0])
