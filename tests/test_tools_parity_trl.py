"""Tool-calling conversations: minisft prepares them as TRL 1.16 does, and trains the calls, never the results.

A row holds `tools` (JSON-schema function definitions, as a list or a JSON string), assistant messages
with `tool_calls` and no content, `tool` messages with the results, and optionally `chat_template_kwargs`.
The template is tests/chatml_tools.jinja, a tool-capable ChatML in the style of Qwen2.5's with
{% generation %} blocks. Every expected value comes from a real `trl.SFTTrainer` on the same raw rows.

The raw rows go to TRL through `datasets.Dataset.from_list`, which gives every struct in a column the
union of all their keys (missing ones as null). Rows here keep one shape per column (the same tool
schema, the same argument keys), or hold the schemas and arguments as JSON strings, as hub datasets do,
so that this Arrow rewrite leaves the rendered text alone and the comparison is about preparation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the parity tests compare against TRL: pip install 'minisft[test]'")

from minisft.machinery.config import DataConfig  # noqa: E402
from minisft.machinery.data_files import load_splits  # noqa: E402
from minisft.machinery.prepare import prepare_dataset  # noqa: E402
from minisft.sft.chat_template import FormattingError  # noqa: E402
from minisft.sft.labels import IGNORE_INDEX  # noqa: E402
from tests.trl_reference import assert_same_examples, trl_prepared_rows  # noqa: E402

TOOLS_TEMPLATE = (Path(__file__).parent / "chatml_tools.jinja").read_text(encoding="utf-8")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}


def call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


# Tools as a list of objects (one schema), arguments as objects. Content of a calling turn: null, or left out.
TOOL_CONVERSATIONS = [
    {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call("Paris")]},
            {"role": "tool", "content": '{"temperature": 18, "sky": "sunny"}', "name": "get_weather"},
            {"role": "assistant", "content": "It is 18°C and sunny in Paris."},
        ],
    },
    {  # two calls at once, their two results in one user-side turn, then a second round
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "You answer with the weather."},
            {"role": "user", "content": "Compare Oslo and Rome."},
            {"role": "assistant", "tool_calls": [call("Oslo"), call("Rome")]},
            {"role": "tool", "content": '{"temperature": -3, "sky": "snow"}', "name": "get_weather"},
            {"role": "tool", "content": '{"temperature": 14, "sky": "cloudy"}', "name": "get_weather"},
            {"role": "assistant", "content": "Oslo is snowy at -3°C; Rome is cloudy at 14°C."},
            {"role": "user", "content": "And 微调?"},
            {"role": "assistant", "tool_calls": [call("微调")]},
            {"role": "tool", "content": '{"error": "unknown city"}', "name": "get_weather"},
            {"role": "assistant", "content": "I do not know a city called 微调."},
        ],
    },
    {  # text beside a call
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Is it raining in Lima?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call("Lima")]},
            {"role": "tool", "content": '{"temperature": 19, "sky": "dry"}', "name": "get_weather"},
            {"role": "assistant", "content": "No, it is not raining in Lima."},
        ],
    },
    {  # tools offered, none called
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! Ask me the weather."},
        ],
    },
    {  # no tools at all in this row
        "tools": None,
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
    },
]

# The OpenAI layout: tools as one JSON string (two different schemas), call ids, arguments as JSON strings,
# and a chat_template_kwargs column that changes the default system prompt.
OPENAI_STYLE = [
    {
        "tools": json.dumps([WEATHER, TIME]),
        "chat_template_kwargs": {"default_system": "You are a terse assistant."},
        "messages": [
            {"role": "user", "content": "Time and weather in Tokyo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "21:04"}'},
            {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": 22, "sky": "clear"}'},
            {"role": "assistant", "content": "21:04, 22°C and clear."},
        ],
    },
    {
        "tools": json.dumps([TIME]),
        "chat_template_kwargs": {"default_system": "You tell the time."},
        "messages": [
            {"role": "user", "content": "What time is it in Lagos?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"timezone": "Africa/Lagos"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_9", "content": '{"time": "13:30"}'},
            {"role": "assistant", "content": "It is 13:30 in Lagos."},
        ],
    },
]

# Conversational prompt/completion: the completion is the next action, a tool call.
TOOL_PROMPT_COMPLETION = [
    {
        "tools": [WEATHER],
        "prompt": [{"role": "user", "content": "Weather in Nairobi?"}],
        "completion": [{"role": "assistant", "content": None, "tool_calls": [call("Nairobi")]}],
    },
    {
        "tools": [WEATHER],
        "prompt": [
            {"role": "user", "content": "Weather in Quito?"},
            {"role": "assistant", "content": None, "tool_calls": [call("Quito")]},
            {"role": "tool", "content": '{"temperature": 12, "sky": "drizzle"}', "name": "get_weather"},
        ],
        "completion": [{"role": "assistant", "content": "12°C with drizzle in Quito."}],
    },
]

# What the tools answered: JSON, which no assistant answer repeats, so a trained result would show.
TOOL_RESULTS = [
    message["content"]
    for row in TOOL_CONVERSATIONS + OPENAI_STYLE
    for message in row["messages"]
    if message["role"] == "tool"
]


@pytest.fixture
def tools_tokenizer(fresh_tokenizer):
    fresh_tokenizer.chat_template = TOOLS_TEMPLATE
    return fresh_tokenizer


def minisft_prepared(rows, tokenizer, **config):
    config.setdefault("max_length", 1024)
    return prepare_dataset(load_splits(rows).train, tokenizer, DataConfig(**config))


def reference(rows, tokenizer, **config):
    config.setdefault("max_length", 1024)
    return trl_prepared_rows(rows, tokenizer, **config)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example["labels"] if label != IGNORE_INDEX])


@pytest.mark.parametrize("rows", [TOOL_CONVERSATIONS, OPENAI_STYLE], ids=["tool-list", "openai-style"])
@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_tool_conversations_match_trl(tools_tokenizer, rows, assistant_only_loss):
    theirs = reference(rows, tools_tokenizer, assistant_only_loss=assistant_only_loss)
    rendered = [tools_tokenizer.decode(row["input_ids"]) for row in theirs]
    # The comparison means something only if TRL rendered the tools, the calls and the results.
    assert all("<tools>" in text and "<tool_call>" in text and "<tool_response>" in text for text in rendered[:2])
    if rows is OPENAI_STYLE:
        # Their chat_template_kwargs were read: each row's own default system prompt.
        assert [text.split("\n")[1] for text in rendered] == ["You are a terse assistant.", "You tell the time."]
    prepared = minisft_prepared(rows, tools_tokenizer, assistant_only_loss=assistant_only_loss)
    assert_same_examples(tools_tokenizer, prepared, theirs)


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_tool_prompt_completion_matches_trl(tools_tokenizer, assistant_only_loss):
    theirs = reference(TOOL_PROMPT_COMPLETION, tools_tokenizer, assistant_only_loss=assistant_only_loss)
    assert any(IGNORE_INDEX in row["labels"] for row in theirs)
    prepared = minisft_prepared(TOOL_PROMPT_COMPLETION, tools_tokenizer, assistant_only_loss=assistant_only_loss)
    assert_same_examples(tools_tokenizer, prepared, theirs)


@pytest.mark.parametrize("tags", [True, False], ids=["generation-tags", "chatml-response-template"])
def test_assistant_only_loss_trains_calls_and_answers_never_results(tools_tokenizer, tags):
    if not tags:  # the same layout without {% generation %}: the ChatML family's response template masks instead
        tools_tokenizer.chat_template = TOOLS_TEMPLATE.replace("{% generation %}", "").replace(
            "{% endgeneration %}", ""
        )
    prepared = minisft_prepared(TOOL_CONVERSATIONS + OPENAI_STYLE, tools_tokenizer, assistant_only_loss=True)
    trained = [trained_text(tools_tokenizer, example) for example in prepared.examples]
    everything = "\n".join(trained)
    for city in ("Paris", "Oslo", "Rome", "微调", "Lima"):
        assert f'"arguments": {{"city": "{city}"}}' in everything
    assert '"arguments": {"timezone": "Asia/Tokyo"}' in everything
    assert "Oslo is snowy at -3°C; Rome is cloudy at 14°C." in trained[1] and "Let me check." in trained[2]
    assert trained[1].count("<|im_end|>") == 4  # each of the four assistant turns learns to stop
    for result in TOOL_RESULTS:
        assert result not in everything
    assert "<tool_response>" not in everything and "<tools>" not in everything


def test_a_template_that_cannot_render_tool_calls_is_refused(tokenizer):
    # SmolLM2's own template never reads tool_calls: the calls would silently vanish from the training text.
    with pytest.raises(FormattingError, match=r"example 0: this conversation has tools, but the chat template never"):
        minisft_prepared(TOOL_CONVERSATIONS[:1], tokenizer)
    row = {key: value for key, value in TOOL_CONVERSATIONS[0].items() if key != "tools"}
    with pytest.raises(FormattingError, match=r"example 0: this conversation has tool_calls, .*--chat_template_path"):
        minisft_prepared([row], tokenizer)
