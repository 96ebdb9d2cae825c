"""Parity of minisft's data preparation with TRL 1.16's SFTTrainer, on the same tokenizer and examples.

Every expected value here comes from running TRL itself (tests/trl_reference.py builds an SFTTrainer
and reads back its prepared train_dataset), never from numbers copied by hand, so the tests keep
meaning something when examples are added or the tokenizer changes.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="the parity tests compare against TRL: pip install 'minisft[test]'")

from minisft.machinery.config import DataConfig  # noqa: E402
from minisft.machinery.prepare import prepare_dataset  # noqa: E402
from tests.trl_reference import assert_same_examples, trl_prepared  # noqa: E402

EOS = "<|im_end|>"

# SmolLM2-135M-Instruct's ChatML template, with {% generation %} tags around what an assistant turn
# must learn to produce: its content and the <|im_end|> that stops it. The "\n" after <|im_end|> stays
# outside, as the model never has to generate it. Renders exactly like the original (checked below).
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def canonical(rows: list[dict], source: str) -> list[dict]:
    """Examples as minisft's loader hands them over: the format keys plus an "origin" TRL never sees."""
    return [{**row, "origin": f"{source}:{index}"} for index, row in enumerate(rows)]


TEXT = canonical(
    [
        {"text": "Hello world"},
        # Already ends with EOS: TRL must not append a second one.
        {"text": f"Fine-tuning is fun.{EOS}"},
        {"text": "微调测试：我学会了。"},
        {"text": f"我学会了{EOS}"},
        # TRL's check is a string endswith, so EOS followed by a newline gets another EOS.
        {"text": f"ends with EOS and a newline{EOS}\n"},
        # An EOS in the middle is tokenized as the special token, not as its characters.
        {"text": f"first part{EOS}second part"},
        {"text": "  leading spaces,\ttabs\n\nand blank lines  "},
        {"text": "emoji 🤗 and accents: café, naïve"},
    ],
    "text",
)

MESSAGES = canonical(
    [
        # No system turn: SmolLM2's template inserts its default system prompt.
        {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
        {
            "messages": [
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": "8"},
            ]
        },
        {"messages": [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]},
    ],
    "messages",
)

PROMPT_COMPLETION = canonical(
    [
        {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"},
        {"prompt": "Translate to Chinese: I learned it.\n", "completion": "我学会了"},
        # Completion already ends with EOS: not appended again.
        {"prompt": "Say hi.\n", "completion": f"Hi!{EOS}"},
        {"prompt": "Name a colour.\n", "completion": "Blue, like the sky."},
    ],
    "prompt_completion",
)

CONVERSATIONAL_PROMPT_COMPLETION = canonical(
    [
        {
            "prompt": [{"role": "user", "content": "Hi!"}],
            "completion": [{"role": "assistant", "content": "Hello! How can I help?"}],
        },
        {
            "prompt": [
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "completion": [{"role": "assistant", "content": "Paris."}],
        },
        # An assistant turn inside the prompt: the assistant mask covers it, the completion mask does not,
        # so with both masks only the completion's turn is trained.
        {
            "prompt": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "微调测试"},
            ],
            "completion": [{"role": "assistant", "content": "我学会了"}],
        },
    ],
    "conversational_prompt_completion",
)

# Prompts that end mid-word or on a space, so their last token merges with the completion's first:
# the tokenized prompt is not a prefix of the tokenized prompt+completion.
MERGING_PROMPT_COMPLETION = canonical(
    [
        {"prompt": "The capital of Fr", "completion": "ance is Paris."},
        {"prompt": "Hello wor", "completion": "ld!"},
        {"prompt": "Complete: un", "completion": "believable"},
        {"prompt": "Answer: ", "completion": "yes"},
        # And one that splits cleanly, for contrast.
        {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"},
    ],
    "merging",
)

TRUNCATION_MAX_LENGTH = 16
TRUNCATION = canonical(
    [
        {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"},  # fits
        {"prompt": "Q: 12+34?\nA:", "completion": " 46"},  # exactly max_length: kept whole
        {"prompt": "Q: What is 12+34?\nA:", "completion": " It is 46"},  # completion cut short
        # A 15-token prompt: one completion token survives truncation.
        {
            "prompt": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
            "completion": " sixteen seventeen",
        },
        # The prompt alone is longer than max_length: nothing left to train on, TRL drops it.
        {
            "prompt": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen",
            "completion": " eighteen",
        },
        {"prompt": "Name a colour.\n", "completion": "Blue, like the sky."},
    ],
    "truncation",
)


def minisft_prepared(examples, tokenizer, **config):
    config.setdefault("max_length", 1024)
    return prepare_dataset(examples, tokenizer, DataConfig(**config))


def reference(examples, tokenizer, **config):
    # max_length spelled out on both sides, so a change of either default cannot hide behind the other.
    config.setdefault("max_length", 1024)
    return trl_prepared(examples, tokenizer, **config)


def _masked_somewhere(rows):
    return any(-100 in row["labels"] for row in rows)


def test_text(tokenizer):
    theirs = reference(TEXT, tokenizer)
    assert not _masked_somewhere(theirs), "TRL trains on every token of text data"
    assert_same_examples(tokenizer, minisft_prepared(TEXT, tokenizer), theirs)


def test_text_and_prompt_completion_with_another_eos_token(tokenizer):
    # eos_token replaces the tokenizer's EOS as the token appended to text and completions.
    for examples in (TEXT, PROMPT_COMPLETION):
        theirs = reference(examples, tokenizer, eos_token="<|endoftext|>")
        assert all(row["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>") for row in theirs)
        assert_same_examples(tokenizer, minisft_prepared(examples, tokenizer, eos_token="<|endoftext|>"), theirs)


def test_messages(tokenizer):
    theirs = reference(MESSAGES, tokenizer)
    assert not _masked_somewhere(theirs), "without assistant_only_loss TRL trains on whole conversations"
    assert_same_examples(tokenizer, minisft_prepared(MESSAGES, tokenizer), theirs)


@pytest.mark.parametrize("completion_only_loss", [None, True, False])
def test_prompt_completion(tokenizer, completion_only_loss):
    theirs = reference(PROMPT_COMPLETION, tokenizer, completion_only_loss=completion_only_loss)
    # None means "on" for prompt/completion data.
    assert _masked_somewhere(theirs) == (completion_only_loss is not False)
    prepared = minisft_prepared(PROMPT_COMPLETION, tokenizer, completion_only_loss=completion_only_loss)
    assert_same_examples(tokenizer, prepared, theirs)


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_conversational_prompt_completion(tokenizer, completion_only_loss):
    examples = CONVERSATIONAL_PROMPT_COMPLETION
    theirs = reference(examples, tokenizer, completion_only_loss=completion_only_loss)
    assert _masked_somewhere(theirs) == (completion_only_loss is not False)
    prepared = minisft_prepared(examples, tokenizer, completion_only_loss=completion_only_loss)
    assert_same_examples(tokenizer, prepared, theirs)


def test_truncation_and_dropping(tokenizer):
    untruncated = reference(TRUNCATION, tokenizer, max_length=None)
    longer = sum(len(row["input_ids"]) > TRUNCATION_MAX_LENGTH for row in untruncated)
    theirs = reference(TRUNCATION, tokenizer, max_length=TRUNCATION_MAX_LENGTH)
    # The examples are built so that TRL truncates several and drops exactly the long-prompt one;
    # if a tokenizer change undid that, this test would stop testing what it says.
    assert len(untruncated) == len(TRUNCATION) and len(theirs) == len(TRUNCATION) - 1
    assert longer >= 3
    assert any(len(row["input_ids"]) == TRUNCATION_MAX_LENGTH for row in untruncated)

    prepared = minisft_prepared(TRUNCATION, tokenizer, max_length=TRUNCATION_MAX_LENGTH)
    assert_same_examples(tokenizer, prepared, theirs)
    stats = prepared.stats
    assert stats.dropped == 1
    assert stats.truncated == longer  # dropped examples count too: they were truncated first
    assert stats.examples == len(theirs)
    assert stats.tokens == sum(len(row["input_ids"]) for row in theirs)
    assert stats.trained_tokens == sum(label != -100 for row in theirs for label in row["labels"])


def test_generation_template_renders_like_smollm2(tokenizer):
    # The assistant-only tests below are only about masking if the tagged template renders the same text.
    conversations = [(example["messages"], False) for example in MESSAGES]
    conversations += [(example["prompt"], True) for example in CONVERSATIONAL_PROMPT_COMPLETION]
    for messages, add_generation_prompt in conversations:
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        rendered = tokenizer.apply_chat_template(messages, **kwargs)
        tagged = tokenizer.apply_chat_template(messages, chat_template=CHATML_GENERATION_TEMPLATE, **kwargs)
        assert tagged == rendered


@pytest.mark.parametrize("max_length", [1024, 40])
def test_assistant_only_loss_messages(fresh_tokenizer, max_length):
    fresh_tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    # With max_length=40 the default system prompt alone takes most of the budget: some conversations
    # lose their assistant turns to truncation and TRL drops them.
    examples = MESSAGES + canonical(
        [
            {
                "messages": [
                    {"role": "user", "content": "Please repeat after me a rather long sentence about nothing much."},
                    {"role": "assistant", "content": "A rather long sentence about nothing much."},
                ]
            }
        ],
        "long_user_turn",
    )
    theirs = reference(examples, fresh_tokenizer, assistant_only_loss=True, max_length=max_length)
    assert _masked_somewhere(theirs)
    if max_length == 40:
        assert len(theirs) < len(examples), "the long user turn should have left nothing to train on"
    prepared = minisft_prepared(examples, fresh_tokenizer, assistant_only_loss=True, max_length=max_length)
    assert_same_examples(tokenizer=fresh_tokenizer, prepared=prepared, theirs=theirs)
    assert prepared.stats.dropped == len(examples) - len(theirs)


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_assistant_only_loss_conversational_prompt_completion(fresh_tokenizer, completion_only_loss):
    fresh_tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    examples = CONVERSATIONAL_PROMPT_COMPLETION
    config = {"assistant_only_loss": True, "completion_only_loss": completion_only_loss}
    theirs = reference(examples, fresh_tokenizer, **config)
    assert _masked_somewhere(theirs)
    assert_same_examples(fresh_tokenizer, minisft_prepared(examples, fresh_tokenizer, **config), theirs)


def test_prompt_not_a_prefix_of_prompt_and_completion(tokenizer):
    examples = MERGING_PROMPT_COMPLETION
    merging = [
        example
        for example in examples
        if tokenizer(example["prompt"] + example["completion"]).input_ids[: len(tokenizer(example["prompt"]).input_ids)]
        != tokenizer(example["prompt"]).input_ids
    ]
    assert len(merging) >= 3, "these prompts were chosen to merge with their completion; they no longer do"
    theirs = reference(examples, tokenizer)
    prepared = minisft_prepared(examples, tokenizer)
    assert_same_examples(tokenizer, prepared, theirs)
