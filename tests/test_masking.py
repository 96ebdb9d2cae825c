"""Label masking: response templates (TRL's old DataCollatorForCompletionOnlyLM) and assistant-only loss."""

import pytest

from minisft.machinery.config import ConfigError, DataConfig
from minisft.machinery.prepare import prepare_dataset
from minisft.sft.labels import IGNORE_INDEX, MaskingError, template_variants

from .tiny_runs import GEMMA_TEMPLATE, SEED

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# SmolLM2's ChatML template with the assistant turn (content, end of turn and newline) inside
# {% generation %} tags, so transformers can mark assistant tokens itself.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}


def trained_spans(tokenizer, example):
    """The decoded text of each run of consecutive trained tokens."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def prepare_one(tokenizer, example, **flags):
    prepared = prepare_dataset([example], tokenizer, DataConfig(**flags))
    assert prepared.stats.examples == 1, prepared.stats
    return prepared.examples[0]


def test_chatml_response_template_trains_after_the_last_response(tokenizer):
    example = prepare_one(tokenizer, MULTI_TURN, response_template="<|im_start|>assistant\n")
    # Without an instruction template, only the last response has a known end: the old collator's rule.
    assert trained_spans(tokenizer, example) == ["Rome.<|im_end|>\n"]


def test_chatml_multi_turn_with_instruction_template(tokenizer):
    example = prepare_one(
        tokenizer, MULTI_TURN, response_template="<|im_start|>assistant\n", instruction_template="<|im_start|>user\n"
    )
    assert trained_spans(tokenizer, example) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


@pytest.mark.parametrize("gemma_tokens_are_special", [True, False])
def test_first_seed_gemma_template(fresh_tokenizer, gemma_tokens_are_special):
    tokenizer = fresh_tokenizer
    if gemma_tokens_are_special:  # as in Gemma's own tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_TEMPLATE
    example = prepare_one(tokenizer, SEED, response_template="<start_of_turn>model\n")
    assert trained_spans(tokenizer, example) == ["我学会了<end_of_turn>\n"]
    # Multi-turn, with the seed's templates on both sides.
    conversation = {"messages": MULTI_TURN["messages"][1:]}
    example = prepare_one(
        tokenizer,
        conversation,
        response_template="<start_of_turn>model\n",
        instruction_template="<start_of_turn>user\n",
    )
    assert trained_spans(tokenizer, example) == ["Paris.<end_of_turn>\n", "Rome.<end_of_turn>\n"]


def test_chinese_text_with_response_template(tokenizer):
    example = prepare_one(tokenizer, {"text": "### 问题：微调测试\n### 回答：我学会了"}, response_template="### 回答：")
    # Text gets EOS appended (as TRL does), and it is trained: the model must learn to stop.
    assert trained_spans(tokenizer, example) == ["我学会了<|im_end|>"]


def test_template_that_tokenizes_differently_in_context(tokenizer):
    text = "Question: what is the capital of France? hello Answer: Paris"
    alone = tokenizer.encode("Answer:", add_special_tokens=False)
    ids = tokenizer(text)["input_ids"]
    # The premise: the template's own tokens never appear in the example (" Answer" merges the space).
    assert not any(ids[i : i + len(alone)] == alone for i in range(len(ids)))
    example = prepare_one(tokenizer, {"text": text}, response_template="Answer:")
    assert trained_spans(tokenizer, example) == [" Paris<|im_end|>"]


def test_response_template_as_token_ids(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    by_string = prepare_one(tokenizer, MULTI_TURN, response_template="<|im_start|>assistant\n")
    by_ids = prepare_one(tokenizer, MULTI_TURN, response_template=str(ids))
    assert by_ids == by_string


def test_template_variants_include_the_in_context_tokenization(tokenizer):
    variants = template_variants(tokenizer, "Answer:")
    assert tokenizer.encode("Answer:", add_special_tokens=False) in variants
    assert tokenizer.encode(" Answer:", add_special_tokens=False) in variants


def test_missing_response_template_is_counted_and_dropped(tokenizer):
    examples = [{"text": f"Q: {n}?\n### Answer: {n}"} for n in range(3)] + [{"text": "no template here"}]
    prepared = prepare_dataset(examples, tokenizer, DataConfig(response_template="### Answer:"))
    assert prepared.stats.response_template_missing == 1
    assert prepared.stats.dropped == 1
    assert prepared.stats.drop_reasons == {"response template not found": 1}
    assert prepared.stats.examples == 3


def test_response_template_missing_from_most_examples_is_an_error(tokenizer):
    examples = [
        {"text": "nothing to see", "origin": "data.jsonl line 1"},
        {"text": "here either"},
        {"text": "### Answer: x"},
    ]
    with pytest.raises(MaskingError) as error:
        prepare_dataset(examples, tokenizer, DataConfig(response_template="### Answer:"))
    message = str(error.value)
    assert "'### Answer:'" in message and "2 of 3 examples" in message
    assert "tokenizes as" in message and "data.jsonl line 1" in message


def test_assistant_only_loss_with_a_known_family(tokenizer):
    # SmolLM2's own template has no {% generation %} tags: minisft uses the ChatML templates.
    example = prepare_one(tokenizer, MULTI_TURN, assistant_only_loss=True)
    assert trained_spans(tokenizer, example) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


def test_assistant_only_loss_family_rule_equals_generation_tags(fresh_tokenizer, tokenizer):
    by_family = prepare_dataset([MULTI_TURN, SEED], tokenizer, DataConfig(assistant_only_loss=True)).examples
    fresh_tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    by_tags = prepare_dataset([MULTI_TURN, SEED], fresh_tokenizer, DataConfig(assistant_only_loss=True)).examples
    assert by_tags == by_family


def test_assistant_only_loss_llama3_family(fresh_tokenizer):
    # Llama 3's own tokenizer has these as special tokens.
    special = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    fresh_tokenizer.add_special_tokens({"additional_special_tokens": special})
    fresh_tokenizer.chat_template = LLAMA3_TEMPLATE
    example = prepare_one(fresh_tokenizer, {"messages": MULTI_TURN["messages"][1:]}, assistant_only_loss=True)
    assert trained_spans(fresh_tokenizer, example) == ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]


def test_assistant_only_loss_unknown_family_asks_for_templates(fresh_tokenizer):
    fresh_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(MaskingError, match="--response_template"):
        prepare_dataset([SEED], fresh_tokenizer, DataConfig(assistant_only_loss=True))
    # With the user's templates it works.
    example = prepare_one(
        fresh_tokenizer, SEED, assistant_only_loss=True, response_template="assistant:", instruction_template="user:"
    )
    assert trained_spans(fresh_tokenizer, example) == [" 我学会了\n"]


def test_conversation_without_assistant_turn_is_dropped_and_counted(tokenizer):
    examples = [SEED, {"messages": [{"role": "user", "content": "hello?"}]}]
    prepared = prepare_dataset(examples, tokenizer, DataConfig(assistant_only_loss=True))
    assert prepared.stats.examples == 1 and prepared.stats.dropped == 1
    assert prepared.origins == ["example 0"]


def test_truncation_is_counted_and_untrained_leftovers_dropped(tokenizer):
    long_prompt = {"prompt": "word " * 50, "completion": " end."}
    short = {"prompt": "Hi", "completion": " there."}
    prepared = prepare_dataset([long_prompt, short], tokenizer, DataConfig(max_length=20))
    assert prepared.stats.truncated == 1
    assert prepared.stats.truncated_tokens == len(tokenizer("word " * 50 + " end.<|im_end|>")["input_ids"]) - 20
    assert prepared.stats.drop_reasons == {"every trained token was past max_length": 1}
    assert [len(example["input_ids"]) for example in prepared.examples] == [
        len(tokenizer("Hi there.<|im_end|>")["input_ids"])
    ]


@pytest.mark.parametrize(
    "example, flags, message",
    [
        ({"text": "hi"}, {"completion_only_loss": True}, "needs prompt/completion data"),
        ({"text": "hi"}, {"assistant_only_loss": True}, "needs conversational data"),
    ],
)
def test_flags_that_cannot_apply_are_errors(tokenizer, example, flags, message):
    with pytest.raises(MaskingError, match=message):
        prepare_dataset([example], tokenizer, DataConfig(**flags))


def test_an_instruction_template_alone_is_refused_with_the_flags():
    """It needs no data to refuse: DataConfig does, before anything is prepared (config.py)."""
    with pytest.raises(ConfigError, match="needs a --response_template"):
        DataConfig(instruction_template="x")
