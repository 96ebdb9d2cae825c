"""Chat-template formatting: a canonical example becomes token ids.

A chat model was trained on conversations rendered in one exact text layout, its chat
template (a Jinja program shipped with the tokenizer). Fine-tuning must render in the same
layout, or the model learns a format it will never see at inference. For SmolLM2 (ChatML):

    [{"role": "user", "content": "微调测试"},          <|im_start|>user
     {"role": "assistant", "content": "我学会了"}]  →   微调测试<|im_end|>
                                                       <|im_start|>assistant
                                                       我学会了<|im_end|>

Per format, as TRL does it:
- messages             the template renders the whole conversation; its end-of-turn token
                       closes it, so no EOS is appended.
- prompt/completion    the prompt is tokenized alone (with the generation prompt when it is a
                       conversation) and then prompt+completion. The completion starts where the
                       two token lists first differ, which is usually len(prompt) but not always:
                       tokens can merge across the boundary ("Fr" + "ance" → "France").
- text                 plain text; EOS is appended when missing, so the model learns to stop.
                       Text and prompt/completion are encoded with the tokenizer's special tokens (a
                       BOS, for tokenizers that add one) unless add_special_tokens=False says the
                       texts hold them already (TRL's dataset_kwargs, for texts a template rendered).
- tokenized            the row's own input_ids, as they are. All this stage does for them is
                       check that every id is a token of this tokenizer: rows tokenized with
                       another tokenizer would train on meaningless (or out-of-range) ids
                       (their own labels are checked the same way, in labels.py).

A conversation's `tools` and `chat_template_kwargs` go to the template with its messages, as
TRL passes them. A template renders only what it mentions, so tool calls given to a template
that never reads `tool_calls`, or reasoning traces to one that never reads `reasoning_content`,
would vanish from the training text without a word: refused, naming the example (or --drop_reasoning).

A chat template is a program the user supplies, and it can fail: a template that is not Jinja
is refused once, by name, when it is set up (check_template); one that fails on a conversation
({{ 1 + 'a' }}, messages[99], a range past Jinja's sandbox limit) is refused naming the row.
FormattingError carries only its message, so it pickles, and crosses from a preparation worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from jinja2 import TemplateError

from minisft.errors import UserError

from .examples import dataset_format

# The layout of SmolLM2, Qwen and many others; used for a tokenizer that has no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# What a chat template's own mistakes raise as it renders: Jinja's errors, and the Python errors of the expressions it
# evaluates ({{ 1 + 'a' }}: TypeError; {{ 1 / 0 }}: ZeroDivisionError; range(10**9) in Jinja's sandbox: OverflowError;
# a template that calls itself: RecursionError). A template is the user's program: any of them is the user's to fix.
TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError)


class FormattingError(UserError, ValueError):
    """An example cannot be rendered or tokenized; the message names the example."""


@dataclass
class Formatted:
    """Token ids of one example, and what masking needs to know about where its parts are."""

    input_ids: list[int]
    completion_start: int | None = None  # prompt/completion: index of the first completion token
    # 1 on tokens inside the template's {% generation %} blocks, or a pre-tokenized row's assistant_masks
    assistant_mask: list[int] | None = None
    completion_mask: list[int] | None = None  # a pre-tokenized row's completion_mask: 1 on completion tokens
    labels: list[int] | None = None  # a pre-tokenized row's own labels, trained as they are


def has_generation_tags(chat_template: str | None) -> bool:
    return bool(chat_template) and "{% generation %}" in chat_template.replace("{%-", "{%").replace("-%}", "%}")


def setup_chat_template(tokenizer, chat_template_path: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """Give the tokenizer the chat template to train with. Returns the special tokens it had to add.

    - `chat_template_path` a .jinja/.j2 file: its text becomes the template.
    - `chat_template_path` a tokenizer folder (or hub id): that tokenizer's template is used.
    - no template at all: ChatML, with <|im_start|>/<|im_end|> added as special tokens. The
      model's embeddings must then grow to the new vocabulary size
      (models.fit_embeddings_to_tokenizer).
    """
    if chat_template_path is not None:
        if os.path.isfile(chat_template_path):
            tokenizer.chat_template = read_template_file(chat_template_path)
        else:
            from transformers import AutoTokenizer

            try:
                donor = AutoTokenizer.from_pretrained(chat_template_path, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as error:
                raise FormattingError(
                    f"--chat_template_path {chat_template_path!r} is neither a template file nor a loadable "
                    f"tokenizer: {error}"
                ) from error
            if not donor.chat_template:
                raise FormattingError(
                    f"The tokenizer at --chat_template_path {chat_template_path!r} has no chat template."
                )
            tokenizer.chat_template = donor.chat_template
        check_template(tokenizer.chat_template, f"--chat_template_path {chat_template_path}")
        return []
    if tokenizer.chat_template:
        check_template(tokenizer.chat_template, "the tokenizer's chat template")
        return []
    missing = [token for token in ("<|im_start|>", "<|im_end|>") if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHATML_TEMPLATE
    # The end of a turn is where generation must stop.
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    return missing


def read_template_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as template_file:
            return template_file.read()
    except UnicodeDecodeError as error:
        raise FormattingError(
            f"--chat_template_path {path}: not a text file in UTF-8 (byte {error.start} is "
            f"0x{error.object[error.start]:02x}); it takes a Jinja chat template (.jinja), or a tokenizer folder"
        ) from None


def check_template(template, where: str) -> None:
    """A template that is not valid Jinja is refused once, by name, rather than once per example."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if not isinstance(template, str):  # a dict of named templates: each is compiled when it is used
        return
    try:
        _compile_jinja_template(template)  # apply_chat_template's own compiler, which caches what it compiles
    except TemplateError as error:
        line = f" line {error.lineno}" if getattr(error, "lineno", None) else ""
        raise FormattingError(f"{where}{line}: not a valid Jinja template ({error.message or error})") from None


def resolve_eos_token(tokenizer, eos_token: str | None) -> str | None:
    """The EOS string appended to text and completions: --eos_token, else the tokenizer's own."""
    if eos_token is None:
        return tokenizer.eos_token
    if eos_token not in tokenizer.get_vocab():
        raise FormattingError(f"--eos_token {eos_token!r} is not a token of this tokenizer's vocabulary.")
    return eos_token


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    shorter = min(len(ids), len(other_ids))
    return next((index for index, (a, b) in enumerate(zip(ids, other_ids)) if a != b), shorter)


def format_example(
    example: dict, tokenizer, eos_token: str | None, assistant_mask: bool = False, add_special_tokens: bool = True
) -> Formatted:
    """Render and tokenize one canonical example (see the module docstring)."""
    return format_batch([example], tokenizer, eos_token, assistant_mask, add_special_tokens)[0]


def format_batch(
    examples: list[dict], tokenizer, eos_token: str | None, assistant_mask: bool = False,
    add_special_tokens: bool = True,
) -> list[Formatted]:  # fmt: skip
    """Render and tokenize examples of one format, with one tokenizer call for the whole batch.

    A fast tokenizer encodes a list of texts in one call (in Rust, on several threads), far faster than
    one call per text. The templates are rendered one conversation at a time (each has its own tools),
    then tokenized together exactly as apply_chat_template tokenizes its own rendering (no special
    tokens added). Only {% generation %} masks need transformers' per-conversation path, which maps
    the rendered spans back onto tokens.
    """
    kind = dataset_format(examples[0])
    if kind == "tokenized":
        vocab_size = len(tokenizer)
        return [_tokenized(example, vocab_size) for example in examples]
    if kind == "text":
        texts = [_with_eos(example["text"], eos_token, example) for example in examples]
        ids = _encode(tokenizer, texts, add_special_tokens)
        return [Formatted(input_ids=example_ids) for example_ids in ids]
    if kind == "prompt_completion":
        prompts = [example["prompt"] for example in examples]
        prompt_ids = _encode(tokenizer, prompts, add_special_tokens)
        completions = [_with_eos(example["completion"], eos_token, example) for example in examples]
        texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
        ids = _encode(tokenizer, texts, add_special_tokens)
        return [Formatted(input_ids=i, completion_start=common_prefix_length(p, i)) for p, i in zip(prompt_ids, ids)]
    if assistant_mask:
        return [_format_with_generation_mask(example, tokenizer, kind) for example in examples]
    if kind == "conversational":
        texts = [_render(tokenizer, example, example["messages"]) for example in examples]
        return [Formatted(input_ids=ids) for ids in _encode(tokenizer, texts, add_special_tokens=False)]
    # conversational prompt/completion: the prompt is rendered as the model sees it at
    # inference, ending with the generation prompt (e.g. "<|im_start|>assistant\n").
    prompts = [_render(tokenizer, example, example["prompt"], add_generation_prompt=True) for example in examples]
    texts = [_render(tokenizer, example, example["prompt"] + example["completion"]) for example in examples]
    prompt_ids = _encode(tokenizer, prompts, add_special_tokens=False)
    ids = _encode(tokenizer, texts, add_special_tokens=False)
    return [Formatted(input_ids=i, completion_start=common_prefix_length(p, i)) for p, i in zip(prompt_ids, ids)]


def _encode(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _tokenized(example: dict, vocab_size: int) -> Formatted:
    check_token_ids(example["input_ids"], vocab_size, f"{_origin(example)}: input_ids")
    return Formatted(
        input_ids=list(example["input_ids"]),
        assistant_mask=example.get("assistant_masks"),
        completion_mask=example.get("completion_mask"),
        labels=example.get("labels"),
    )


def _format_with_generation_mask(example: dict, tokenizer, kind: str) -> Formatted:
    """One conversation through transformers' own tokenizing path, which returns the {% generation %} mask."""
    if kind == "conversational":
        ids, mask = _render_tokens(tokenizer, example, example["messages"])
        return Formatted(input_ids=ids, assistant_mask=mask)
    prompt_ids = _encode(tokenizer, [_render(tokenizer, example, example["prompt"], add_generation_prompt=True)], False)
    ids, mask = _render_tokens(tokenizer, example, example["prompt"] + example["completion"])
    return Formatted(input_ids=ids, completion_start=common_prefix_length(prompt_ids[0], ids), assistant_mask=mask)


def check_token_ids(ids: list[int], vocab_size: int, where: str, allowed: int | None = None) -> None:
    """A pre-tokenized row's ids must be tokens of this tokenizer: 0 <= id < vocab_size. `allowed`: the one other
    value a label may be (labels.IGNORE_INDEX, which labels.check_own_labels passes)."""
    in_range = [token for token in ids if token != allowed] if allowed is not None else ids
    if not in_range or (min(in_range) >= 0 and max(in_range) < vocab_size):
        return
    position = next(index for index, token in enumerate(ids) if not (0 <= token < vocab_size or token == allowed))
    raise FormattingError(
        f"{where}[{position}] is {ids[position]}, not a token of this tokenizer (its ids run from 0 to "
        f"{vocab_size - 1}{'' if allowed is None else f'; a label may also be {allowed}'}). Were these rows "
        "tokenized with another tokenizer?"
    )


def _render(tokenizer, example: dict, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation `messages` of `example` laid out by the chat template, with its tools and kwargs."""
    return _apply_template(tokenizer, example, messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_tokens(tokenizer, example: dict, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and the {% generation %} mask of `messages`, from transformers' apply_chat_template."""
    encoded = _apply_template(
        tokenizer, example, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def _apply_template(tokenizer, example: dict, messages: list[dict], **options):
    template = tokenizer.chat_template
    if not template:
        raise FormattingError("The tokenizer has no chat template; call setup_chat_template first.")
    tools = example.get("tools")
    held = {"tools": tools, **{key: any(m.get(key) for m in messages) for key in ("tool_calls", "reasoning_content")}}
    for name in (name for name, present in held.items() if present and name not in template):
        remedy = (
            "Pass --chat_template_path with a template that renders them (<think>...</think>, as Qwen3's does), "
            "or --drop_reasoning to train without them."
            if name == "reasoning_content"
            else "Pass --chat_template_path with a template that renders tools and tool calls (the model's own, "
            "if it was trained for tool calling)."
        )
        raise FormattingError(
            f"{_origin(example)}: this conversation has {name}, but the chat template never reads {name!r}, "
            f"so they would be left out of the training text. {remedy}"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, **example.get("chat_template_kwargs", {}), **options
        )
    except TEMPLATE_ERRORS as error:
        raise FormattingError(f"{_origin(example)}: the chat template rejected this conversation: {error}") from None


def _with_eos(text: str, eos_token: str | None, example: dict) -> str:
    if eos_token is None:
        raise FormattingError(
            f"{_origin(example)}: the tokenizer has no EOS token to end this text with; pass --eos_token."
        )
    return text if text.endswith(eos_token) else text + eos_token


def _origin(example: dict) -> str:
    return example.get("origin", "an example")
