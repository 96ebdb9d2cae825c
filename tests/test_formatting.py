"""Chat-template formatting: template choice, the ChatML fallback, EOS, and the completion boundary."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minisft.machinery.config import DataConfig
from minisft.machinery.models import fit_embeddings_to_tokenizer, tiny_model
from minisft.machinery.prepare import prepare_dataset
from minisft.sft.chat_template import (
    CHATML_TEMPLATE,
    FormattingError,
    format_example,
    resolve_eos_token,
    setup_chat_template,
)

from .tiny_runs import GEMMA_TEMPLATE, SEED


def word_level_tokenizer():
    """A tokenizer with no chat template and no ChatML tokens, like many base models'."""
    vocab = {"[UNK]": 0, "</s>": 1, "user": 2, "assistant": 3, "hello": 4, "hi": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_chatml_fallback_adds_tokens_and_the_model_grows():
    tokenizer = word_level_tokenizer()
    model = tiny_model(tokenizer)
    assert model.get_input_embeddings().num_embeddings == 6
    added = setup_chat_template(tokenizer)
    assert added == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    assert fit_embeddings_to_tokenizer(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 8
    conversation = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    ids = format_example(conversation, tokenizer, tokenizer.eos_token).input_ids
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 2
    assert ids == [start, 2, 4, end, start, 3, 5, end]


def test_a_tokenizer_that_has_a_template_keeps_it(fresh_tokenizer):
    template = fresh_tokenizer.chat_template
    assert setup_chat_template(fresh_tokenizer) == []
    assert fresh_tokenizer.chat_template == template


def test_chat_template_path_jinja_file(fresh_tokenizer, tmp_path):
    path = tmp_path / "gemma.jinja"
    path.write_text(GEMMA_TEMPLATE, encoding="utf-8")
    setup_chat_template(fresh_tokenizer, str(path))
    ids = format_example(SEED, fresh_tokenizer, fresh_tokenizer.eos_token).input_ids
    assert fresh_tokenizer.decode(ids) == (
        "<|im_start|><start_of_turn>user\n微调测试<end_of_turn>\n<start_of_turn>model\n我学会了<end_of_turn>\n"
    )


def test_chat_template_path_tokenizer_folder(fresh_tokenizer, tokenizer, tmp_path):
    donor = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    donor.chat_template = GEMMA_TEMPLATE
    donor.save_pretrained(tmp_path)
    setup_chat_template(fresh_tokenizer, str(tmp_path))
    assert fresh_tokenizer.chat_template == GEMMA_TEMPLATE


def test_chat_template_path_that_is_neither_is_an_error(fresh_tokenizer, tmp_path):
    with pytest.raises(FormattingError, match="neither a template file nor a loadable tokenizer"):
        setup_chat_template(fresh_tokenizer, str(tmp_path / "nothing-here"))


def test_template_errors_name_the_example(fresh_tokenizer):
    fresh_tokenizer.chat_template = GEMMA_TEMPLATE
    example = {"messages": [{"role": "system", "content": "x"}] + SEED["messages"], "origin": "chats.jsonl line 7"}
    with pytest.raises(FormattingError, match="chats.jsonl line 7.*System role not supported"):
        format_example(example, fresh_tokenizer, fresh_tokenizer.eos_token)


def test_eos_is_appended_once_to_text_and_completions(tokenizer):
    eos = tokenizer.eos_token_id
    for text in ("Hello world", "Hello world<|im_end|>"):
        ids = format_example({"text": text}, tokenizer, tokenizer.eos_token).input_ids
        assert ids[-1] == eos and ids.count(eos) == 1
    ids = format_example({"prompt": "Hi", "completion": " there"}, tokenizer, tokenizer.eos_token).input_ids
    assert ids[-1] == eos and ids.count(eos) == 1
    # A conversation ends with its template's end of turn; nothing is appended.
    conversation = format_example(SEED, tokenizer, tokenizer.eos_token).input_ids
    assert conversation == tokenizer.apply_chat_template(SEED["messages"], tokenize=True, return_dict=True)["input_ids"]


def test_eos_token_flag(tokenizer):
    assert resolve_eos_token(tokenizer, "<|endoftext|>") == "<|endoftext|>"
    prepared = prepare_dataset([{"text": "Hello"}], tokenizer, DataConfig(eos_token="<|endoftext|>"))
    assert prepared.examples[0]["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(FormattingError, match="not a token"):
        resolve_eos_token(tokenizer, "<not-a-token>")


def test_completion_starts_where_tokenizations_diverge(tokenizer):
    example = {"prompt": "The capital of Fr", "completion": "ance is Paris."}
    formatted = format_example(example, tokenizer, tokenizer.eos_token)
    prompt_ids = tokenizer(example["prompt"])["input_ids"]
    # "Fr" + "ance" merge into one token, so the prompt is not a prefix of prompt+completion.
    assert formatted.input_ids[: len(prompt_ids)] != prompt_ids
    assert formatted.input_ids[: formatted.completion_start] == prompt_ids[: formatted.completion_start]
    assert formatted.input_ids[formatted.completion_start] != prompt_ids[formatted.completion_start]


def test_conversational_prompt_ends_with_the_generation_prompt(tokenizer):
    example = {"prompt": SEED["messages"][:1], "completion": SEED["messages"][1:]}
    formatted = format_example(example, tokenizer, tokenizer.eos_token)
    completion = tokenizer.decode(formatted.input_ids[formatted.completion_start :])
    assert completion == "我学会了<|im_end|>\n"
