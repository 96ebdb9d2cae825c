"""The forms real datasets come in (issue 14): tool calls, content parts, pre-tokenized rows, files as saved.

Each is read into the canonical example, or refused with one line that names the row (the file and line)
and what is wrong. TRL parity for tool calls and pre-tokenized rows is in test_tools_parity_trl.py and
test_tokenized_parity_trl.py; this file is about reading, checking and showing them.
"""

from __future__ import annotations

import json
import re

import pytest

from minisft.inspect import main as inspect_main
from minisft.machinery.cli import run
from minisft.machinery.config import DataConfig
from minisft.machinery.data_files import load_splits
from minisft.machinery.prepare import prepare_dataset
from minisft.sft.chat_template import FormattingError
from minisft.sft.examples import DataError
from minisft.sft.labels import IGNORE_INDEX, MaskingError

CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def load_error(tmp_path, rows) -> str:
    """The DataError of a train.jsonl whose rows are `rows`."""
    with pytest.raises(DataError) as error:
        load_splits(write_jsonl(tmp_path / "train.jsonl", rows))
    return str(error.value)


def chat(*messages, **columns) -> dict:
    return {"messages": list(messages), **columns}


USER = {"role": "user", "content": "1+2?"}
ANSWER = {"role": "assistant", "content": "3"}


# ----------------------------------------------------------------------------- tool calling


def test_tool_calls_without_content_and_the_rows_tools_and_kwargs(tmp_path):
    rows = [
        chat(
            USER,
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "content": "3"},
            ANSWER,
            tools=[TOOL],
            chat_template_kwargs={"enable_thinking": False},
        ),
        # As parquet and the hub give it: content null, every key on every message, tools as a JSON string.
        chat(
            {**USER, "tool_calls": None, "name": None},
            {"role": "assistant", "content": None, "tool_calls": [CALL], "name": None},
            tools=json.dumps([TOOL]),
            chat_template_kwargs={"enable_thinking": None},
        ),
    ]
    train = load_splits(write_jsonl(tmp_path / "train.jsonl", rows)).train
    assert train[0]["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert train[0]["tools"] == train[1]["tools"] == [TOOL]
    assert train[0]["chat_template_kwargs"] == {"enable_thinking": False}
    # Null is a key left out: Arrow's fill for keys that other messages (or rows) have.
    assert train[1]["messages"] == [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    assert train[1]["chat_template_kwargs"] == {}


@pytest.mark.parametrize(
    "row, problem",
    [
        (
            chat(USER, {"role": "assistant", "content": None}),
            "messages[1] has no 'content' (the content); only an assistant turn with tool_calls may leave it out",
        ),
        (chat({"role": "user", "tool_calls": [CALL]}), "messages[0] has no 'content'"),
        (chat(USER, {"role": "assistant", "tool_calls": []}), "messages[1] has no 'content'"),
        (
            chat(USER, {"role": "assistant", "tool_calls": "add(1, 2)"}),
            "messages[1] tool_calls must be a list of objects, got a string",
        ),
        (chat(USER, ANSWER, tools="[{"), "'tools' is a string but not valid JSON"),
        (chat(USER, ANSWER, tools={"add": TOOL}), "'tools' must be a list of function definitions"),
        (chat(USER, ANSWER, chat_template_kwargs="x"), "'chat_template_kwargs' must be an object"),
        (
            chat(USER, ANSWER, chat_template_kwargs={"add_generation_prompt": True}),
            "'chat_template_kwargs' sets 'add_generation_prompt', which minisft sets itself",
        ),
        (chat(USER, ANSWER, chat_template_kwargs={"tools": [TOOL]}), "give the tools in the row's 'tools' column"),
    ],
)
def test_tool_calling_errors_name_the_line(tmp_path, row, problem):
    message = load_error(tmp_path, [chat(USER, ANSWER), row])
    assert message.startswith(f"{tmp_path / 'train.jsonl'} line 2: ") and problem in message, message


def test_a_tool_template_error_names_the_example(fresh_tokenizer):
    # A template that reads tool_calls, but adds them to a string: jinja raises a TypeError there, not a
    # TemplateError. It is one line naming the example, not a traceback.
    fresh_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + m['tool_calls'] }}{% endfor %}"
    examples = load_splits([chat({"role": "assistant", "tool_calls": [CALL]})]).train
    with pytest.raises(FormattingError, match=r"^example 0: the chat template rejected this conversation: can only"):
        prepare_dataset(examples, fresh_tokenizer)


# ----------------------------------------------------------------------------- content as a list of parts


def test_text_parts_are_joined_with_newlines(tmp_path, tokenizer):
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "微调测试"}]
    rows = [chat({"role": "user", "content": parts}, {"role": "assistant", "content": [parts[1]]})]
    train = load_splits(write_jsonl(tmp_path / "train.jsonl", rows)).train
    assert train[0]["messages"] == [
        {"role": "user", "content": "First part.\n微调测试"},
        {"role": "assistant", "content": "微调测试"},
    ]
    as_strings = load_splits([chat(*train[0]["messages"])]).train
    assert prepare_dataset(train, tokenizer).examples == prepare_dataset(as_strings, tokenizer).examples
    prompt_completion = load_splits([{"prompt": rows[0]["messages"][:1], "completion": rows[0]["messages"][1:]}])
    assert prompt_completion.train[0]["prompt"] == train[0]["messages"][:1]


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "x.png"}}],
            "messages[0] content[1] is of type 'image_url'; minisft trains text models and reads only 'text' parts",
        ),
        ([{"type": "image"}], "messages[0] content[0] is of type 'image'"),
        ([{"text": "no type"}], "messages[0] content must be a string, got a list whose item 0 is an object"),
        ([{"type": "text", "text": 7}], "messages[0] content[0] is a 'text' part whose 'text' is a number"),
        ({"type": "text", "text": "hi"}, "messages[0] content must be a string or a list of content parts"),
    ],
)
def test_non_text_parts_are_refused_naming_the_row(tmp_path, content, problem):
    message = load_error(tmp_path, [chat(USER, ANSWER), chat({"role": "user", "content": content}, ANSWER)])
    assert message.startswith(f"{tmp_path / 'train.jsonl'} line 2: ") and problem in message, message


# ----------------------------------------------------------------------------- pre-tokenized rows


def test_pre_tokenized_rows_win_over_other_keys_and_keep_their_columns():
    rows = [
        {
            "input_ids": [5, 6, 7],
            "labels": [-100, 6, 7],
            "assistant_masks": [0, 1, 1],
            "messages": "ignored",
            "attention_mask": [1, 1, 1],
            "length": 3,
        }
    ]
    splits = load_splits(rows)
    assert splits.format == "tokenized"
    assert splits.train == [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "assistant_masks": [0, 1, 1], "origin": "example 0"}
    ]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"input_ids": []}, "'input_ids' is empty"),
        ({"input_ids": "1 2 3"}, "'input_ids' must be a list of token ids, got a string"),
        ({"input_ids": [1, 2.0, 3]}, "'input_ids'[1] is 2.0; each entry must be an integer"),
        ({"input_ids": [1, True]}, "'input_ids'[1] is True; each entry must be an integer"),
        ({"input_ids": [1, 2], "labels": [1]}, "'labels' has 1 entries but 'input_ids' has 2; each token needs one"),
        ({"input_ids": [1, 2], "completion_mask": [0, 2]}, "'completion_mask'[1] is 2; each entry must be 0 or 1"),
        ({"input_ids": [1, 2], "attention_mask": [1, 0]}, "'attention_mask' has zeros: the row holds padding"),
    ],
)
def test_pre_tokenized_errors_name_the_line(tmp_path, row, problem):
    first = {key: [1, 1] for key in ("input_ids", "labels", "completion_mask") if key == "input_ids" or key in row}
    message = load_error(tmp_path, [first, row])
    assert message.startswith(f"{tmp_path / 'train.jsonl'} line 2: ") and problem in message, message


def test_pre_tokenized_rows_must_share_their_columns(tmp_path):
    message = load_error(tmp_path, [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3]}])
    assert "line 2: this row is in the 'tokenized (input_ids)' format, but the first row" in message
    assert "'tokenized (input_ids, labels)' format" in message


@pytest.mark.parametrize(
    "row, problem",
    [
        (
            {"input_ids": [1, 49152]},
            r"example 1: input_ids\[1\] is 49152, not a token of this tokenizer \(its ids "
            r"run from 0 to 49151\)\. Were these rows tokenized with another tokenizer\?",
        ),
        ({"input_ids": [-1, 2]}, r"example 1: input_ids\[0\] is -1"),
        ({"input_ids": [1, 2], "labels": [-100, -7]}, r"example 1: labels\[1\] is -7, .*; a label may also be -100"),
    ],
)
def test_pre_tokenized_ids_outside_the_vocabulary(tokenizer, row, problem):
    first = {"input_ids": [1, 2], **({"labels": [-100, 2]} if "labels" in row else {})}
    with pytest.raises(FormattingError, match=problem):
        prepare_dataset(load_splits([first, row]).train, tokenizer)


@pytest.mark.parametrize(
    "row, flags, problem",
    [
        (
            {"input_ids": [1, 2], "assistant_masks": [0, 1]},
            {"assistant_only_loss": True},
            "--assistant_only_loss needs conversations; these rows are pre-tokenized. Their 'assistant_masks' "
            "column, if they have one, is applied without the flag.",
        ),
        ({"input_ids": [1, 2]}, {"completion_only_loss": True}, "needs their 'completion_mask' column"),
        (
            {"input_ids": [1, 2], "labels": [1, 2]},
            {"completion_only_loss": True},
            "carry their own labels, which are trained as they are; drop --completion_only_loss",
        ),
    ],
)
def test_masking_flags_pre_tokenized_rows_cannot_honour(tokenizer, row, flags, problem):
    with pytest.raises(MaskingError, match=re.escape(problem)):
        prepare_dataset(load_splits([row]).train, tokenizer, DataConfig(**flags))


def test_pre_tokenized_rows_through_a_response_template(tokenizer):
    ids = tokenizer("### Question: 2+2?\n### Answer: 4")["input_ids"]
    prepared = prepare_dataset(
        load_splits([{"input_ids": ids}]).train, tokenizer, DataConfig(response_template="### Answer:")
    )
    trained = [label for label in prepared.examples[0]["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " 4"


def test_inspect_shows_pre_tokenized_rows(tmp_path, capsys, tokenizer):
    ids = tokenizer("微调测试 我学会了")["input_ids"]
    rows = [{"input_ids": ids, "completion_mask": [0] * 3 + [1] * (len(ids) - 3)}, {"input_ids": ids[:4]}]
    rows[1]["completion_mask"] = [0, 0, 1, 1]
    data = write_jsonl(tmp_path / "tokens.jsonl", rows)
    inspect_main(["--dataset_name", str(data)])
    out = capsys.readouterr().out
    assert f"{data} line 1: {len(ids)} tokens, {len(ids)} trained" in out and "我学会了" in out
    assert "completion_mask not applied" in out and "--completion_only_loss applies it" in out
    inspect_main(["--dataset_name", str(data), "--json", "--completion_only_loss"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [
        {
            "input_ids": row["input_ids"],
            "labels": [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])],
        }
        for row in rows
    ]


# ----------------------------------------------------------------------------- files as people save them


@pytest.mark.parametrize(
    "name, text",
    [
        ("train.jsonl", json.dumps(chat(USER, ANSWER)) + "\n"),
        ("train.json", json.dumps([chat(USER, ANSWER)])),
        ("train.csv", "prompt,completion\n1+2?,3\n"),
    ],
)
def test_a_byte_order_mark_is_skipped(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Windows Notepad saves "UTF-8 with BOM"
    example = load_splits(path).train[0]
    assert example.get("messages") == [USER, ANSWER] or (example["prompt"], example["completion"]) == ("1+2?", "3")


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv"])
def test_another_encoding_names_file_line_and_byte(tmp_path, name):
    path = tmp_path / name
    lines = (
        ["prompt,completion", "Say café,Café!"]
        if name.endswith(".csv")
        else [
            json.dumps({"prompt": "1+2?", "completion": "3"}),
            json.dumps({"prompt": "Say café", "completion": "Café!"}, ensure_ascii=False),
        ]
    )
    data = "\n".join(lines).encode("cp1252")  # é is the single byte 0xe9 there, not UTF-8's 0xc3 0xa9
    path.write_bytes(data)
    offset = data.index("é".encode("cp1252"))
    with pytest.raises(DataError) as error:
        load_splits(path)
    assert str(error.value) == (
        f"{path} line 2: byte {offset} (0xe9) is not UTF-8. minisft reads UTF-8: save the file as "
        "UTF-8 (e.g. iconv -f cp1252 -t utf-8)."
    )


def test_utf16_is_recognised_and_the_run_exits_with_2(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat(USER, ANSWER)) + "\n", encoding="utf-16")  # starts with the BOM ff fe
    with pytest.raises(SystemExit) as exit_info:
        run(inspect_main, ["--dataset_name", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"{path} line 1: byte 0 (0xff) is not UTF-8" in err and "It starts like UTF-16" in err
