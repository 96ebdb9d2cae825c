"""Two forms the peers' users bring (issue 30): Alpaca rows, and assistant turns with reasoning traces.

An Alpaca row is the conversation it stands for, so it prepares to exactly the tokens, labels and figures of that
conversation written as `messages`. A reasoning trace (`reasoning_content`) is rendered by a template that reads
it, Qwen3-style (tests/qwen3_style.jinja), and trained with its answer; a template that never reads it would drop
every trace without a word, so that is refused, unless --drop_reasoning leaves them out on purpose, and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minisft.inspect import main as inspect_main
from minisft.machinery.cli import run
from minisft.machinery.config import DataConfig
from minisft.machinery.data_files import load_splits
from minisft.machinery.prepare import load_and_prepare, prepare_dataset
from minisft.sft.chat_template import FormattingError
from minisft.sft.examples import DataError, normalize_example
from minisft.sft.labels import IGNORE_INDEX
from minisft.train import main as train_main

QWEN3_STYLE = str(Path(__file__).parent / "qwen3_style.jinja")

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name the capital.", "input": "France", "output": "Paris", "system": "Answer in one word."},
    # As parquet and the hub give them: every column on every row, null where a row has none.
    {"instruction": "Add the numbers.", "input": None, "output": "7", "system": None},
    {"instruction": "微调测试", "input": "请回答", "output": "我学会了", "system": ""},
]
# The same five, as the conversations they stand for.
MESSAGES = [
    [{"role": "user", "content": "Give three tips for staying healthy."}, "Eat well, sleep, move."],
    [{"role": "user", "content": "Translate to French.\n\nGood morning"}, "Bonjour"],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name the capital.\n\nFrance"},
     "Paris"],
    [{"role": "user", "content": "Add the numbers."}, "7"],
    [{"role": "user", "content": "微调测试\n\n请回答"}, "我学会了"],
]  # fmt: skip
MESSAGES = [{"messages": [*turns[:-1], {"role": "assistant", "content": turns[-1]}]} for turns in MESSAGES]

QUESTION = {"role": "user", "content": "What is 17 * 3?"}
TRACE = "17 * 3 is 10 * 3 + 7 * 3 = 30 + 21."
THINKING = [
    {"messages": [QUESTION, {"role": "assistant", "content": "51", "reasoning_content": TRACE}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},  # no trace
    {"messages": [QUESTION, {"role": "assistant", "content": "51", "reasoning_content": "Multiply."}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def prepared(path: Path, tokenizer, **flags):
    """The train split of the file, prepared as a run prepares it (streamed, nothing cached)."""
    return load_and_prepare(path, tokenizer, DataConfig(cache_dir="none", **flags))


def examples_of(splits) -> list[dict]:
    return [splits.train.examples[index] for index in range(len(splits.train.examples))]


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


# ----------------------------------------------------------------------------- Alpaca


def test_an_alpaca_row_is_the_conversation_it_stands_for():
    for row, conversation in zip(ALPACA, MESSAGES):
        assert normalize_example(row, "alpaca.jsonl line 1") == {**conversation, "origin": "alpaca.jsonl line 1"}


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_alpaca_rows_prepare_exactly_as_the_same_conversations(tmp_path, fresh_tokenizer, assistant_only_loss):
    flags = {"assistant_only_loss": assistant_only_loss}
    alpaca = prepared(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), fresh_tokenizer, **flags)
    plain = prepared(write_jsonl(tmp_path / "messages.jsonl", MESSAGES), fresh_tokenizer, **flags)
    assert examples_of(alpaca) == examples_of(plain)
    assert alpaca.train.stats == plain.train.stats and alpaca.train.stats.examples == len(ALPACA)
    assert alpaca.train.origins[2] == f"{tmp_path / 'alpaca.jsonl'} line 3"
    if assistant_only_loss:  # the answers are trained, the instructions and inputs are not
        assert trained_text(fresh_tokenizer, examples_of(alpaca)[1]) == "Bonjour<|im_end|>\n"


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"instruction": "Say hi.", "input": ""}, "line 2: the Alpaca row's 'output' must be a string, got none"),
        ({"instruction": "Say hi.", "output": None}, "line 2: the Alpaca row's 'output' must be a string, got none"),
        ({"instruction": ["Say hi."], "output": "hi"}, "line 2: the Alpaca row's 'instruction' must be a string"),
        ({"instruction": "Say hi.", "input": 3, "output": "hi"}, "line 2: the Alpaca row's 'input' must be a string"),
    ],
)
def test_a_bad_alpaca_row_is_refused_naming_the_row(tmp_path, row, problem):
    with pytest.raises(DataError, match=problem):
        load_splits(write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA[0], row]))


def test_an_alpaca_rows_history_comes_before_its_instruction():
    """LLaMA-Factory's `history`: [instruction, response] pairs, the conversation's earlier turns, in order."""
    row = {"system": "Be brief.", "instruction": "And 3 + 3?", "output": "6",
           "history": [["What is 1 + 1?", "2"], ["And 2 + 2?", "4"]]}  # fmt: skip
    turns = [("system", "Be brief."), ("user", "What is 1 + 1?"), ("assistant", "2"), ("user", "And 2 + 2?"),
             ("assistant", "4"), ("user", "And 3 + 3?"), ("assistant", "6")]  # fmt: skip
    assert normalize_example(row, "a.jsonl line 1")["messages"] == [{"role": r, "content": c} for r, c in turns]
    for history in (["What is 1 + 1?", "2"], [["What is 1 + 1?"]], [["What is 1 + 1?", 2]], "none"):
        with pytest.raises(DataError, match="line 1: the Alpaca row's 'history' must be a list of"):
            normalize_example({**row, "history": history}, "a.jsonl line 1")


def test_inspect_shows_an_alpaca_row_as_its_conversation(tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    inspect_main(["--dataset_name", str(data), "--cache_dir", "none", "--num_examples", "3"])
    out = capsys.readouterr().out
    assert f"{data} line 3" in out
    assert "system↵\nAnswer in one word." in out and "Name the capital.↵\n↵\nFrance" in out and "Paris" in out


# ----------------------------------------------------------------------------- reasoning traces


@pytest.mark.parametrize("generation_tags", [True, False])
def test_a_trace_is_rendered_and_trained_with_its_answer(tmp_path, fresh_tokenizer, generation_tags):
    template = Path(QWEN3_STYLE).read_text(encoding="utf-8")
    if not generation_tags:  # as Qwen3's own: --assistant_only_loss finds the turns by ChatML's markers instead
        template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (tmp_path / "qwen3.jinja").write_text(template, encoding="utf-8")
    data = write_jsonl(tmp_path / "thinking.jsonl", THINKING)
    splits = prepared(data, fresh_tokenizer, chat_template_path=str(tmp_path / "qwen3.jinja"), assistant_only_loss=True)
    first = examples_of(splits)[0]
    assert TRACE in fresh_tokenizer.decode(first["input_ids"])
    trained = trained_text(fresh_tokenizer, first)
    assert trained.startswith(f"<think>\n{TRACE}\n</think>\n\n51<|im_end|>")  # the trace, then its answer
    assert QUESTION["content"] not in trained
    assert splits.train.stats.reasoning_dropped == 0


def test_a_template_that_never_reads_traces_is_refused_naming_the_row_and_the_flag(tmp_path, tokenizer, capsys):
    # SmolLM2's ChatML renders role and content only: every trace would vanish from the training text.
    data = write_jsonl(tmp_path / "thinking.jsonl", THINKING[1:])
    with pytest.raises(FormattingError, match=r"thinking.jsonl line 2: this conversation has reasoning_content, but "
                       r"the chat template never reads 'reasoning_content'.* or --drop_reasoning"):  # fmt: skip
        prepared(data, tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        run(inspect_main, ["--dataset_name", str(data), "--cache_dir", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "line 2: this conversation has reasoning_content" in err and "--drop_reasoning" in err


def test_a_trace_that_is_not_a_string_is_refused(tmp_path):
    row = {"messages": [QUESTION, {"role": "assistant", "content": "51", "reasoning_content": ["Multiply."]}]}
    with pytest.raises(DataError, match=r"line 1: messages\[1\] reasoning_content must be a string .* got a list"):
        load_splits(write_jsonl(tmp_path / "thinking.jsonl", [row]))


def test_drop_reasoning_prepares_the_conversations_without_their_traces(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "thinking.jsonl", THINKING)
    without = [{"messages": [{k: v for k, v in m.items() if k != "reasoning_content"} for m in row["messages"]]}
               for row in THINKING]  # fmt: skip
    for flags in ({}, {"assistant_only_loss": True}):
        dropped = prepared(data, tokenizer, drop_reasoning=True, **flags)
        plain = prepared(write_jsonl(tmp_path / "plain.jsonl", without), tokenizer, **flags)
        assert examples_of(dropped) == examples_of(plain)
        assert dropped.train.stats.reasoning_dropped == 2 and plain.train.stats.reasoning_dropped == 0
        assert dropped.cache_note.endswith("; --drop_reasoning left out 2 reasoning traces")
    # From Python, the caller's examples are left as they were.
    examples = load_splits(data).train
    assert prepare_dataset(examples, tokenizer, DataConfig(drop_reasoning=True)).stats.reasoning_dropped == 2
    assert examples[0]["messages"][1]["reasoning_content"] == TRACE


def test_a_run_with_drop_reasoning_says_how_many_traces_it_left_out(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "thinking.jsonl", THINKING)
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data), "--max_steps", "1", "--cache_dir", "none"]
    train_main([*flags, "--output_dir", str(tmp_path / "out"), "--drop_reasoning"])
    said = " ".join(capsys.readouterr().err.split())  # the console wraps long lines at its width
    assert "--drop_reasoning left out 2 reasoning traces" in said and "done: 1 steps" in said
