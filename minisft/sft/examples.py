"""Canonical examples: chat datasets come in several dialects that all say the same thing, so each
row is translated once, here, into one canonical example; nothing downstream sees a raw format:

    raw row (detected by its keys)                         canonical example
    ---------------------------------------------------    -----------------------------------------
    {"messages": [{"role", "content"}]}          (TRL)  -> {"messages": [{"role", "content"}]}
    {"conversation": [{"role", "message"}]}  human=user -> {"messages": ...}
    {"conversations": [{"from", "value"}]}     ShareGPT -> {"messages": ...}   human=user, gpt=assistant
    {"instruction", "output", "input"?, "system"?, "history"?} -> {"messages": ...}   Alpaca: [system,] user, assistant
    {"prompt": str, "completion": str}                  -> {"prompt": str, "completion": str}
    {"prompt": [msgs], "completion": [msgs]}            -> {"prompt": [msgs], "completion": [msgs]}
    {"text": str}          (or --dataset_text_field)    -> {"text": str}
    {"input_ids": [int], "labels"?, "completion_mask"?,
     "assistant_masks"?}                  pre-tokenized -> the same, checked: its ids are not re-made

Later stages branch on these five forms only (dataset_format); all rows of a dataset share one. A row holding
`input_ids` is pre-tokenized, whatever else it holds, as TRL decides. Roles are system, user, assistant, tool. Each
example carries an "origin" ("train.jsonl line 17") naming its row in later errors; a bad row raises DataError.
A row's own `weight` (a number ≥ 0, 1 if left out) goes on as the example's "weight": how much its token losses
count (loss.py). It is not a message's `weight` (0 or 1, inside the messages: is that turn trained? labels.py).

Conversations come as people and tools save them, and each is reduced to what a text chat template reads:
- tool calling: an assistant message may hold `tool_calls` and no content (null or left out); a row's `tools`
  (JSON-schema function definitions, as a list or a JSON string) and `chat_template_kwargs` (extra template
  variables) travel with the example to the template;
- content as a list of parts (the OpenAI and multimodal layout): the text parts are joined with "\\n", as vLLM
  joins them when it serves a text-only template; any other part (an image, audio) is refused, since a text
  model cannot be trained on it;
- reasoning traces: an assistant turn's `reasoning_content` (a string, Qwen3's <think>) goes on like any other key;
- a key whose value is null is a key left out: Arrow (parquet, the hub) gives every message every key that any
  message has, and every chat_template_kwargs every variable of any row.
"""

from __future__ import annotations

import json
from typing import Iterable

from minisft.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
# The seed's `conversation` and ShareGPT's `conversations` name two of the roles differently.
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
# raw key -> (key holding the role, keys that may hold the content, extra role names)
CONVERSATION_FORMATS = {
    "messages": ("role", ("content",), {}),
    "conversation": ("role", ("message", "content"), ROLE_ALIASES),
    "conversations": ("from", ("value",), ROLE_ALIASES),
}
# Columns a pre-tokenized row may hold beside input_ids (TRL's names). labels: -100 where not trained;
# completion_mask / assistant_masks: 1 on the tokens to train, as TRL's own tokenization writes them.
TOKENIZED_COLUMNS = ("labels", "completion_mask", "assistant_masks")
# apply_chat_template arguments that minisft sets itself: a row's chat_template_kwargs may not set them too.
RESERVED_TEMPLATE_KWARGS = ("conversation", "tools", "chat_template", "add_generation_prompt", "tokenize",
                            "return_dict", "return_assistant_tokens_mask")  # fmt: skip


class DataError(UserError, ValueError):
    """A problem with the user's data, worded for the user: where it is, and what is wrong."""


def dataset_format(example: dict) -> str:
    """Which canonical form a normalised example has; downstream stages branch on this."""
    if "input_ids" in example:
        return "tokenized"
    if "messages" in example:
        return "conversational"
    if "text" in example:
        return "text"
    return "conversational_prompt_completion" if isinstance(example["prompt"], list) else "prompt_completion"


def kind_of(value) -> str:
    """A value's type as someone who wrote the data (often as JSON) would name it."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


def detect_format(row: dict, origin: str, text_field: str = "text") -> str:
    """The raw format of one row, decided by its keys (and, for prompt/completion, the prompt's type)."""
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected an object with the example's fields, got {kind_of(row)}")
    if "input_ids" in row:
        # The columns are part of the format: every row must carry the same ones.
        return f"tokenized ({', '.join(['input_ids', *(key for key in TOKENIZED_COLUMNS if present(row, key))])})"
    for key in CONVERSATION_FORMATS:
        if key in row:
            return key
    if "prompt" in row and "completion" in row:
        return "prompt/completion messages" if isinstance(row["prompt"], list) else "prompt/completion strings"
    if "instruction" in row:
        return "alpaca"
    if text_field in row:
        return "text"
    raise DataError(f"{origin}: unknown dataset format; the row has keys {sorted(row)}. Known formats: 'messages', "
                    "'conversation', 'conversations' (ShareGPT), 'prompt' + 'completion', 'instruction' + 'output' "
                    f"(Alpaca), 'input_ids' (pre-tokenized), or plain text in the field {text_field!r} (another: "
                    "--dataset_text_field)")  # fmt: skip


def normalize_messages(messages, where: str, role_key: str, content_keys: tuple, aliases: dict) -> list[dict]:
    """Check a list of chat messages and rename its keys and roles to role/content and ROLES."""
    if not isinstance(messages, list):
        raise DataError(f"{where} must be a list of messages, got {kind_of(messages)}")
    if not messages:
        raise DataError(f"{where} is empty; a conversation needs at least one message")
    accepted = ", ".join([*ROLES, *aliases])
    normalized = []
    for index, message in enumerate(messages):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with {role_key!r} and content, got {kind_of(message)}")
        if role_key not in message:
            raise DataError(f"{at} has no {role_key!r} (the role); its keys are {sorted(message)}")
        raw_role = message[role_key]
        role = aliases.get(raw_role, raw_role) if isinstance(raw_role, str) else None
        if role not in ROLES:
            raise DataError(f"{at} has unknown role {raw_role!r}; accepted roles: {accepted}")
        extras = {k: v for k, v in message.items() if k not in (role_key, *content_keys) and v is not None}
        content = next((message[key] for key in content_keys if present(message, key)), None)
        calls, reasoning = extras.get("tool_calls", []), extras.get("reasoning_content", "")
        if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
            raise DataError(f"{at} tool_calls must be a list of objects, got {kind_of(calls)}")
        if not isinstance(reasoning, str):
            raise DataError(f"{at} reasoning_content must be a string (the reasoning trace), got {kind_of(reasoning)}")
        if content is None and not (role == "assistant" and extras.get("tool_calls")):
            raise DataError(f"{at} has no {' or '.join(map(repr, content_keys))} (the content); only an assistant "
                            "turn with tool_calls may leave it out")  # fmt: skip
        content = None if content is None else content_text(content, f"{at} content")
        normalized.append({"role": role, "content": content, **extras})
    return normalized


def present(mapping: dict, key: str) -> bool:
    """Whether `mapping` holds `key` with a value: null means left out (see the module docstring)."""
    return mapping.get(key) is not None


def content_text(content, where: str) -> str:
    """A message's content as one string: a string as it is, a list of text parts joined with "\\n"."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where} must be a string or a list of content parts, got {kind_of(content)}")
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise DataError(f"{where} must be a string, got a list whose item {index} is {kind_of(part)} rather than "
                            'a content part such as {"type": "text", "text": "..."}')  # fmt: skip
        if part["type"] != "text":
            raise DataError(f"{where}[{index}] is of type {part['type']!r}; minisft trains text models and reads only "
                            "'text' parts: leave the others out of this dataset")  # fmt: skip
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}[{index}] is a 'text' part whose 'text' is {kind_of(part.get('text'))}")
    return "\n".join(part["text"] for part in content)


def template_inputs(row: dict, origin: str) -> dict:
    """The row's `tools` and `chat_template_kwargs`, checked: what its chat template is given beside the messages."""
    inputs = {}
    tools = row.get("tools")
    if isinstance(tools, str):  # parquet and hub datasets often hold the schemas as one JSON string, as TRL reads it
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"{origin}: 'tools' is a string but not valid JSON ({error.msg} at column {error.colno})")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            raise DataError(f"{origin}: 'tools' must be a list of function definitions (JSON-schema objects), "
                            f"got {kind_of(tools)}")  # fmt: skip
        inputs["tools"] = tools
    kwargs = row.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise DataError(f"{origin}: 'chat_template_kwargs' must be an object of template variables, "
                            f"got {kind_of(kwargs)}")  # fmt: skip
        reserved = [key for key in kwargs if key in RESERVED_TEMPLATE_KWARGS]
        if reserved:
            tools = "; give the tools in the row's 'tools' column" if "tools" in reserved else ""
            raise DataError(f"{origin}: 'chat_template_kwargs' sets {', '.join(map(repr, reserved))}, which minisft "
                            f"sets itself{tools}")  # fmt: skip
        inputs["chat_template_kwargs"] = {key: value for key, value in kwargs.items() if value is not None}
    return inputs


def token_column(row: dict, key: str, origin: str, length: int | None = None, bits: bool = False) -> list[int]:
    """One column of a pre-tokenized row, checked: a list of integers (0/1 for a mask), one per token."""
    values = row[key]
    where = f"{origin}: {key!r}"
    if not isinstance(values, list):
        raise DataError(f"{where} must be a list of {'0/1 flags' if bits else 'token ids'}, got {kind_of(values)}")
    allowed = (lambda value: value in (0, 1)) if bits else (lambda value: type(value) is int)
    bad = next((index for index, value in enumerate(values) if not allowed(value)), None)
    if bad is not None:
        raise DataError(f"{where}[{bad}] is {values[bad]!r}; each entry must be {'0 or 1' if bits else 'an integer'}")
    if length is not None and len(values) != length:
        raise DataError(f"{where} has {len(values)} entries but 'input_ids' has {length}; each token needs one")
    return values


def normalize_tokenized(row: dict, origin: str) -> dict:
    """A pre-tokenized row: input_ids and the optional TOKENIZED_COLUMNS, checked for type and length."""
    input_ids = token_column(row, "input_ids", origin)
    if not input_ids:
        raise DataError(f"{origin}: 'input_ids' is empty; there is nothing to train on")
    example = {"input_ids": input_ids}
    for key in TOKENIZED_COLUMNS:
        if present(row, key):
            example[key] = token_column(row, key, origin, len(input_ids), bits=key != "labels")
    if present(row, "attention_mask") and 0 in token_column(row, "attention_mask", origin, len(input_ids), bits=True):
        # TRL ignores attention_mask and would train on the padding as if it were text.
        raise DataError(f"{origin}: 'attention_mask' has zeros: the row holds padding. minisft pads batches itself; "
                        "give the rows without their padding")  # fmt: skip
    return example


def normalize_prompt_completion(row: dict, origin: str) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{origin}: {name!r} must be a string or a list of messages, got {kind_of(value)}")
    if type(prompt) is not type(completion):
        raise DataError(f"{origin}: 'prompt' is {kind_of(prompt)} but 'completion' is {kind_of(completion)}; "
                        "both must be strings or both lists of messages")  # fmt: skip
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion}
    messages = lambda key: normalize_messages(row[key], f"{origin}: {key}", *CONVERSATION_FORMATS["messages"])  # noqa: E731
    return {"prompt": messages("prompt"), "completion": messages("completion"), **template_inputs(row, origin)}


def normalize_alpaca(row: dict, origin: str) -> dict:
    """An Alpaca row as the conversation it stands for: [system,] the earlier turns of LLaMA-Factory's `history`
    ([instruction, response] pairs), user (instruction, blank line, input), assistant (output)."""
    for key in ("instruction", "output", "input", "system"):  # input and system may be left out (or null)
        if (present(row, key) or key in ("instruction", "output")) and not isinstance(row.get(key), str):
            got = kind_of(row[key]) if present(row, key) else f"none (the row's keys are {sorted(row)})"
            raise DataError(f"{origin}: the Alpaca row's {key!r} must be a string, got {got}")
    history = row.get("history") or []
    pairs = isinstance(history, list) and all(isinstance(pair, list) and len(pair) == 2 for pair in history)
    if not pairs or not all(isinstance(text, str) for pair in history for text in pair):
        raise DataError(f"{origin}: the Alpaca row's 'history' must be a list of [instruction, response] pairs of "
                        f"strings, got {history!r:.80}")  # fmt: skip
    earlier = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return {"messages": [*system, *earlier, {"role": "user", "content": user},
                         {"role": "assistant", "content": row["output"]}]}  # fmt: skip


def normalize_example(row: dict, origin: str, text_field: str = "text") -> dict:
    """One raw row -> one canonical example (plus its origin). Keys outside the format are dropped
    (a conversation keeps its tools and chat_template_kwargs: the template reads them)."""
    raw_format = detect_format(row, origin, text_field)
    if raw_format.startswith("tokenized"):
        example = normalize_tokenized(row, origin)
    elif raw_format in CONVERSATION_FORMATS:
        role_key, content_keys, aliases = CONVERSATION_FORMATS[raw_format]
        messages = normalize_messages(row[raw_format], f"{origin}: {raw_format}", role_key, content_keys, aliases)
        example = {"messages": messages, **template_inputs(row, origin)}
    elif raw_format == "text":
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{origin}: the text field {text_field!r} must be a string, got {kind_of(text)}")
        example = {"text": text}
    elif raw_format == "alpaca":
        example = normalize_alpaca(row, origin)
    else:
        example = normalize_prompt_completion(row, origin)
    return {**example, **row_weight(row, origin), "origin": origin}


def row_weight(row: dict, origin: str) -> dict:
    """{"weight": w} for a row with a weight of its own, a finite number ≥ 0 (or text that reads as one: a CSV cell
    is text); {} for a row without."""
    value = row.get("weight")
    try:
        weight = float(value) if type(value) in (int, float, str) else -1.0
    except (ValueError, OverflowError):  # not a number, or an integer past float's range
        weight = -1.0
    if value is not None and not 0 <= weight < float("inf"):
        raise DataError(f"{origin}: 'weight' is {value!r}; an example's weight is a finite number ≥ 0 (1 if left out)")
    return {} if value is None else {"weight": weight}


def check_same_format(row, origin: str, text_field: str, first: tuple[str, str]) -> None:
    """A row must share the format of the dataset's first row; `first` is (that format, its origin)."""
    row_format = detect_format(row, origin, text_field)
    if row_format != first[0]:
        raise DataError(f"{origin}: this row is in the {row_format!r} format, but the first row ({first[1]}) is in "
                        f"the {first[0]!r} format; all rows of a dataset must share one format")  # fmt: skip


def normalize_rows(rows: Iterable[tuple], text_field: str = "text", first: tuple | None = None) -> list[dict]:
    """Normalise (origin, raw row) pairs, insisting that all rows share the format of the first (or of `first`)."""
    examples = []
    for origin, row in rows:
        first = first or (detect_format(row, origin, text_field), origin)
        check_same_format(row, origin, text_field, first)
        examples.append(normalize_example(row, origin, text_field))
    return examples
