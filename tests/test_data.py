"""Stage 1: every raw format and source becomes the one canonical form, and bad data fails clearly."""

import json
import re

import datasets
import huggingface_hub.constants
import pyarrow
import pyarrow.parquet
import pytest

from minisft.machinery.data_files import load_splits
from minisft.sft.examples import DataError, dataset_format, normalize_example, normalize_rows

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(index):
    return {"messages": [{"role": "user", "content": f"q{index}"}, {"role": "assistant", "content": f"a{index}"}]}


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("system", [False, True])
def test_messages_with_and_without_system(system):
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + CHAT
    example = normalize_example({"messages": messages, "id": 7}, "example 0")
    assert example == {"messages": messages, "origin": "example 0"}
    assert dataset_format(example) == "conversational"


def test_seed_conversation_maps_human_and_message():
    row = {
        "conversation": [
            {"role": "system", "message": "Be kind."},
            {"role": "human", "message": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    example = normalize_example(row, "seed.jsonl line 1")
    assert example["messages"] == [{"role": "system", "content": "Be kind."}] + CHAT
    assert example["origin"] == "seed.jsonl line 1"


def test_sharegpt_maps_from_value_human_gpt():
    row = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "tool", "value": "42"},
        ],
        "source": "sharegpt",
    }
    example = normalize_example(row, "example 3")
    assert example == {"messages": CHAT + [{"role": "tool", "content": "42"}], "origin": "example 3"}


def test_prompt_completion_strings():
    example = normalize_example({"prompt": "2+2=", "completion": "4", "label": 1}, "example 0")
    assert example == {"prompt": "2+2=", "completion": "4", "origin": "example 0"}
    assert dataset_format(example) == "prompt_completion"


def test_prompt_completion_messages():
    example = normalize_example({"prompt": CHAT[:1], "completion": CHAT[1:]}, "example 0")
    assert example == {"prompt": CHAT[:1], "completion": CHAT[1:], "origin": "example 0"}
    assert dataset_format(example) == "conversational_prompt_completion"


def test_text_with_custom_text_field():
    example = normalize_example({"body": "Once upon a time", "title": "x"}, "example 0", text_field="body")
    assert example == {"text": "Once upon a time", "origin": "example 0"}
    assert dataset_format(example) == "text"


def test_extra_message_keys_are_kept():
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    messages = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "content": "1", "name": "add"},
    ]
    assert normalize_example({"messages": messages}, "example 0")["messages"] == messages


# ----------------------------------------------------------------------------- sources


def test_jsonl_counts_blank_lines_and_names_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat(0)) + "\n\n   \n" + json.dumps(chat(1)) + "\n")
    splits = load_splits(path)
    assert [example["origin"] for example in splits.train] == [f"{path} line 1", f"{path} line 4"]
    assert splits.train[1]["messages"][0]["content"] == "q1"
    assert splits.skipped_blank_lines == 2
    assert splits.eval is None and splits.format == "conversational"


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    splits = load_splits(str(path))
    assert splits.train == [{"text": "a", "origin": f"{path} item 0"}, {"text": "b", "origin": f"{path} item 1"}]


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}] * 2)
    splits = load_splits(path)
    assert splits.train[1] == {"prompt": "p", "completion": "c", "origin": f"{path} line 2"}


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([chat(0), chat(1), chat(2)]), path)
    splits = load_splits(path)
    assert [example["messages"] for example in splits.train] == [chat(i)["messages"] for i in range(3)]
    assert splits.train[2]["origin"] == f"{path} row 2"


def test_csv_keeps_cells_as_text_and_names_lines(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"two\nlines",007\n\n2+2=,4\n')
    splits = load_splits(path)
    pairs = [(example["prompt"], example["completion"]) for example in splits.train]
    assert pairs == [("two\nlines", "007"), ("2+2=", "4")]
    assert [example["origin"] for example in splits.train] == [f"{path} line 2", f"{path} line 5"]
    assert splits.skipped_blank_lines == 1


def test_folder_assigns_files_to_splits_by_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat(0), chat(1)])
    write_jsonl(tmp_path / "test.jsonl", [chat(2)])
    write_jsonl(tmp_path / "extra-part.jsonl", [chat(3)])  # no split keyword: train
    write_jsonl(tmp_path / "my_dev_set.jsonl", [chat(4)])  # validation: unused unless asked for
    (tmp_path / "README.md").write_text("not data")
    splits = load_splits(tmp_path)
    assert sorted(example["messages"][0]["content"] for example in splits.train) == ["q0", "q1", "q3"]
    assert [example["messages"][0]["content"] for example in splits.eval] == ["q2"]
    assert splits.eval[0]["origin"] == f"{tmp_path / 'test.jsonl'} line 1"
    validation = load_splits(tmp_path, test_split="validation")
    assert [example["messages"][0]["content"] for example in validation.eval] == ["q4"]


def test_datasets_dataset_and_list_of_dicts():
    rows = [{"text": "a", "n": 1}, {"text": "b", "n": 2}]
    for source in (rows, datasets.Dataset.from_list(rows)):
        splits = load_splits(source)
        assert splits.train == [{"text": "a", "origin": "example 0"}, {"text": "b", "origin": "example 1"}]
        assert splits.eval is None


def test_dataset_dict_uses_its_test_split():
    source = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([chat(0), chat(1)]), "test": datasets.Dataset.from_list([chat(2)])}
    )
    splits = load_splits(source)
    assert [example["origin"] for example in splits.train] == ["train example 0", "train example 1"]
    assert splits.eval == [{**chat(2), "origin": "test example 0"}]


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    # Offline mode is read when datasets is imported, so setting the environment now is too late.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"someorg/no-such-dataset: could not load .*hub may be unreachable.*local"):
        load_splits("someorg/no-such-dataset")


# ----------------------------------------------------------------------------- eval splits


def test_eval_split_size_is_seeded_disjoint_and_sized():
    rows = [chat(index) for index in range(20)]
    first = load_splits(rows, eval_split_size=0.25, seed=1)
    again = load_splits(rows, eval_split_size=0.25, seed=1)
    other = load_splits(rows, eval_split_size=0.25, seed=2)
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert first.train == again.train and first.eval == again.eval
    train_origins, eval_origins = ({example["origin"] for example in split} for split in (first.train, first.eval))
    assert train_origins.isdisjoint(eval_origins) and len(train_origins | eval_origins) == 20
    assert {example["origin"] for example in first.eval} != {example["origin"] for example in other.eval}


def test_eval_split_size_overrides_own_test_split_and_holds_out_at_least_one(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat(0), chat(1), chat(2)])
    write_jsonl(tmp_path / "test.jsonl", [chat(9)])
    splits = load_splits(tmp_path, eval_split_size=0.01)
    assert (len(splits.train), len(splits.eval)) == (2, 1)
    assert "q9" not in [example["messages"][0]["content"] for example in splits.eval]


def test_eval_split_size_leaving_no_train_is_an_error():
    with pytest.raises(DataError, match="eval_split_size=0.5 of 1 examples leaves none to train on"):
        load_splits([chat(0)], eval_split_size=0.5)
    with pytest.raises(DataError, match=r"fraction in \[0, 1\)"):
        load_splits([chat(0)], eval_split_size=1.0)


# ----------------------------------------------------------------------------- errors


def jsonl_error(tmp_path, lines, **kwargs):
    """Load a train.jsonl whose second line is bad; return the DataError message."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load_splits(path, **kwargs)
    return str(error.value)


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"messages": [', r"not valid JSON \(Expecting value at column 15\)"),
        ('["a", "b"]', "expected an object with the example's fields, got a list"),
        ('{"messages": [{"content": "hi"}]}', r"messages\[0\] has no 'role'"),
        (
            '{"messages": [{"role": "bot", "content": "hi"}]}',
            r"messages\[0\] has unknown role 'bot'; accepted roles: system, user, assistant, tool",
        ),
        ('{"messages": [{"role": ["user"], "content": "hi"}]}', r"messages\[0\] has unknown role \['user'\]"),
        ('{"messages": []}', "messages is empty; a conversation needs at least one message"),
        ('{"messages": "hi"}', "messages must be a list of messages, got a string"),
        ('{"messages": [{"role": "user", "content": ["hi"]}]}', r"messages\[0\] content must be a string, got a list"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
        ('{"conversations": [{"from": "robot", "value": "hi"}]}', "unknown role 'robot'.*human, gpt"),
        ('{"conversation": [{"role": "human", "text": "hi"}]}', r"conversation\[0\] has no 'message' or 'content'"),
    ],
)
def test_conversation_errors_name_file_line_and_problem(tmp_path, bad_line, problem):
    message = jsonl_error(tmp_path, ["", bad_line])  # line 1 blank: line numbers count it
    assert re.search(re.escape(f"{tmp_path / 'train.jsonl'} line 2") + ": .*" + problem, message), message


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ({"prompt": "p", "completion": 4}, "'completion' must be a string or a list of messages, got a number"),
        ({"prompt": None, "completion": "c"}, "'prompt' must be a string or a list of messages, got null"),
        ({"prompt": "p", "completion": CHAT}, "'prompt' is a string but 'completion' is a list; both must be"),
        ({"prompt": CHAT[:1], "completion": [{"role": "assistant"}]}, "completion[0] has no 'content'"),
    ],
)
def test_prompt_completion_errors(tmp_path, bad_row, problem):
    path = tmp_path / "pc.jsonl"
    path.write_text("\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"pc.jsonl line 2: {problem}")):
        load_splits(path)


def test_text_field_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"body": "ok"}, {"body": 3}])
    with pytest.raises(DataError, match=r"train.jsonl line 2: the text field 'body' must be a string, got a number"):
        load_splits(path, text_field="body")


def test_unknown_format_lists_keys_formats_and_the_flag():
    with pytest.raises(DataError) as error:
        load_splits([{"question": "q", "answer": "a"}])
    message = str(error.value)
    assert message.startswith("example 0: unknown dataset format; the row has keys ['answer', 'question']")
    for known in ("'messages'", "'conversations' (ShareGPT)", "'prompt' + 'completion'", "--dataset_text_field"):
        assert known in message


def test_rows_in_different_formats(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat(0), {"text": "t"}])
    with pytest.raises(
        DataError,
        match=r"train.jsonl line 2: this row is in the 'text' format, but the first row "
        r"\(.*train.jsonl line 1\) is in the 'messages' format",
    ):
        load_splits(path)
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": CHAT[:1], "completion": CHAT[1:]}]
    with pytest.raises(DataError, match="example 1: .*'prompt/completion messages'.*'prompt/completion strings'"):
        normalize_rows((f"example {index}", row) for index, row in enumerate(rows))


def test_train_and_test_split_in_different_formats(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat(0)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t"}])
    problem = "test.jsonl line 1: the 'test' split is text but the 'train' split is conversational"
    with pytest.raises(DataError, match=problem):
        load_splits(tmp_path)


def test_json_array_errors(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]')
    with pytest.raises(DataError, match=r"data.json line 3: not valid JSON \(Expecting property name"):
        load_splits(path)
    path.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(DataError, match="data.json item 1: expected an object with the example's fields, got a str"):
        load_splits(path)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\na\nb,c\n")
    with pytest.raises(DataError, match="data.csv line 3: 2 fields, but the header has 1 columns"):
        load_splits(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match="data.parquet: not a readable parquet file"):
        load_splits(path)


def test_missing_file_or_folder(tmp_path):
    for missing in (tmp_path / "nope.jsonl", str(tmp_path / "nope"), "data/nope.jsonl", "nope.csv"):
        with pytest.raises(DataError, match="nope.*: no such file or folder"):
            load_splits(missing)


def test_unsupported_extension_and_folder_without_data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt'; use one of .jsonl, .json, .parquet"):
        load_splits(path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no .jsonl, .json, .parquet, .csv files in")):
        load_splits(tmp_path)


def test_empty_dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"train.jsonl: the 'train' split has no examples \(2 blank lines skipped\)"):
        load_splits(path)
    with pytest.raises(DataError, match="the given list: the 'train' split has no examples$"):
        load_splits([])


def test_missing_train_split_names_the_flag():
    source = datasets.DatasetDict({"validation": datasets.Dataset.from_list([chat(0)])})
    with pytest.raises(DataError, match=r"no split 'train'; its splits are \['validation'\].*--dataset_train_split"):
        load_splits(source)
    assert len(load_splits(source, train_split="validation").train) == 1
