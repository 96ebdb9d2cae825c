"""Whole assistant turns switched on and off: --mask_history (only the last turn trained) and each message's own
`weight` (0/1) or `train` (false/true), on ChatML, Llama 3 and Gemma templates, by template families and by
{% generation %} tags. Every case is compared with the same conversation under the assistant masks alone."""

import pytest

from minisft.machinery.config import ConfigError, DataConfig
from minisft.machinery.prepare import prepare_dataset
from minisft.sft.examples import normalize_example
from minisft.sft.labels import IGNORE_INDEX, MaskingError

from .test_masking import CHATML_GENERATION_TEMPLATE, LLAMA3_TEMPLATE, trained_spans
from .tiny_runs import GEMMA_TEMPLATE

CONVERSATION = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]
ANSWERS = ["Paris.", "Rome.", "Madrid."]
TEMPLATES = ["chatml", "chatml_generation_tags", "chatml_response_templates", "llama3", "gemma"]


@pytest.fixture(params=TEMPLATES)
def setup(request, tokenizer, fresh_tokenizer):
    """(tokenizer, the flags that make its assistant masks) for each template."""
    flags = {"assistant_only_loss": True}
    if request.param == "chatml":  # SmolLM2's own template: the ChatML family's templates
        return tokenizer, flags
    if request.param == "chatml_response_templates":
        return tokenizer, {"response_template": "<|im_start|>assistant\n", "instruction_template": "<|im_start|>"}
    if request.param == "chatml_generation_tags":
        fresh_tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    elif request.param == "llama3":  # Llama 3's and Gemma's own tokenizers hold these as special tokens
        fresh_tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
        )
        fresh_tokenizer.chat_template = LLAMA3_TEMPLATE
    else:
        fresh_tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        fresh_tokenizer.chat_template = GEMMA_TEMPLATE
    return fresh_tokenizer, flags


def switched(**switches: dict) -> dict:
    """CONVERSATION with `switches` (message index -> keys) added to its messages."""
    return {"messages": [{**message, **switches.get(f"m{index}", {})} for index, message in enumerate(CONVERSATION)]}


def prepared(tokenizer, example, **flags):
    return prepare_dataset([example], tokenizer, DataConfig(**flags))


def turns_trained(tokenizer, example, **flags) -> list[str]:
    """Which answers' turns are trained, checked to be those turns' tokens exactly as the masks alone train them."""
    dataset = prepared(tokenizer, example, **flags)
    assert dataset.stats.examples == 1, dataset.stats
    plain_flags = {key: value for key, value in flags.items() if key != "mask_history"}
    plain = prepared(tokenizer, {"messages": CONVERSATION}, **plain_flags).examples[0]
    ours = dataset.examples[0]
    assert ours["input_ids"] == plain["input_ids"]  # the switches never reach the rendered text
    whole = trained_spans(tokenizer, plain)
    assert len(whole) == 3 and all(answer in turn for answer, turn in zip(ANSWERS, whole))
    spans = trained_spans(tokenizer, ours)
    assert all(span in whole for span in spans)  # each trained span is one whole turn, as the masks find it
    return [answer for answer, turn in zip(ANSWERS, whole) if turn in spans]


def test_mask_history_trains_only_the_last_turn(setup):
    tokenizer, flags = setup
    assert turns_trained(tokenizer, switched(), **flags) == ANSWERS
    assert turns_trained(tokenizer, switched(), mask_history=True, **flags) == ["Madrid."]


@pytest.mark.parametrize(
    "switches, mask_history, trained",
    [
        ({"m3": {"weight": 0}}, False, ["Paris.", "Madrid."]),  # a middle turn made context
        ({"m1": {"train": False}}, False, ["Rome.", "Madrid."]),
        ({"m1": {"weight": 1}}, True, ["Paris.", "Madrid."]),  # a turn the history mask leaves out, trained
        ({"m3": {"train": True}, "m5": {"train": False}}, True, ["Rome."]),
        ({"m0": {"weight": 0}, "m1": {"weight": 0.0}, "m2": {"weight": 0}, "m3": {"weight": 1}}, False,
         ["Rome.", "Madrid."]),  # axolotl's files say weight 0 on the user turns too: what the masks do already
    ],
)  # fmt: skip
def test_a_message_switches_exactly_its_own_turn(setup, switches, mask_history, trained):
    tokenizer, flags = setup
    assert turns_trained(tokenizer, switched(**switches), mask_history=mask_history, **flags) == trained


def test_weight_0_on_the_last_turn_under_mask_history_leaves_nothing_and_drops_it(tokenizer):
    dataset = prepared(tokenizer, switched(m5={"weight": 0}), assistant_only_loss=True, mask_history=True)
    assert dataset.stats.examples == 0 and dataset.stats.drop_reasons == {"no token to train on": 1}


def test_switches_survive_reading_the_rows(tokenizer):
    """A ShareGPT row as axolotl's docs write it: the switches are read with the messages, not dropped."""
    row = {"conversations": [
        {"from": "human", "value": "Capital of France?", "weight": 0}, {"from": "gpt", "value": "Paris.", "weight": 0},
        {"from": "human", "value": "And of Italy?", "weight": 0}, {"from": "gpt", "value": "Rome.", "weight": 1},
    ]}  # fmt: skip
    example = normalize_example(row, "data.jsonl line 1")
    assert [message.get("weight") for message in example["messages"]] == [0, 0, 0, 1]
    labels = prepared(tokenizer, example, assistant_only_loss=True).examples[0]
    assert trained_spans(tokenizer, labels) == ["Rome.<|im_end|>\n"]


def test_mask_history_needs_conversations(tokenizer):
    flags = {"response_template": "Answer:", "instruction_template": "Question:", "mask_history": True}
    with pytest.raises(MaskingError, match="--mask_history needs conversational data; this dataset is text"):
        prepared(tokenizer, {"text": "Question: 1+1? Answer: 2"}, **flags)


@pytest.mark.parametrize("flags", [{}, {"response_template": "<|im_start|>assistant\n"}])
def test_mask_history_needs_an_assistant_mask(flags):
    with pytest.raises(ConfigError, match="add --assistant_only_loss, or --response_template with --instruction"):
        DataConfig(mask_history=True, **flags)


@pytest.mark.parametrize(
    "switches, flags, message",
    [
        ({"m1": {"weight": 0.5}}, {"assistant_only_loss": True}, r"example 0: message 1 \(assistant\) has {'weight'"),
        ({"m1": {"train": "yes"}}, {"assistant_only_loss": True}, r"message 1 \(assistant\) has {'train': 'yes'}"),
        ({"m1": {"weight": True}}, {"assistant_only_loss": True}, "a weight is 0 or 1"),
        ({"m1": {"weight": 1, "train": False}}, {"assistant_only_loss": True}, "and the two agree"),
        ({"m2": {"train": True}}, {"assistant_only_loss": True}, r"message 2 \(user\) is marked to be trained"),
        ({"m1": {"weight": 0}}, {}, "message 1 .* needs each assistant turn located: add --assistant_only_loss"),
        ({"m0": {"weight": 0}}, {}, "message 0 .* needs each assistant turn located"),  # the user turn is trained
        # A response template alone finds the last turn only: the earlier ones cannot be matched to messages.
        ({"m1": {"weight": 0}}, {"response_template": "<|im_start|>assistant\n"}, "needs each assistant turn located"),
    ],
)
def test_switches_that_cannot_be_honoured_are_refused_naming_the_row(tokenizer, switches, flags, message):
    with pytest.raises(MaskingError, match=message):
        prepared(tokenizer, switched(**switches), **flags)


def test_switches_on_turns_the_masks_count_otherwise_are_refused(tokenizer):
    # The answer quotes a turn opener: the masks see four assistant turns where the row has three messages.
    messages = [*CONVERSATION[:3], {"role": "assistant", "content": "Rome.\n<|im_start|>assistant\nRoma."}]
    with pytest.raises(MaskingError, match="example 0: its 2 assistant messages .* the masks find 3 assistant turns"):
        prepared(tokenizer, {"messages": [messages[0], {**messages[1], "weight": 0}, *messages[2:]]},
                 assistant_only_loss=True)  # fmt: skip
    # Without switches the conversation is trained as the masks find it, as before.
    assert prepared(tokenizer, {"messages": messages}, assistant_only_loss=True).stats.examples == 1


def test_mask_history_composes_with_a_packed_row_and_labels_stay_token_ids(tokenizer):
    example = prepared(tokenizer, switched(), assistant_only_loss=True, mask_history=True).examples[0]
    trained = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Madrid.<|im_end|>\n"


def test_a_prompt_turn_switched_on_is_trained_beside_the_completion(tokenizer):
    """Conversational prompt/completion: the prompt's turns come first in the count; 1/true trains one that the
    completion-only mask leaves out, and --mask_history leaves the completion's turn."""
    prompt = [
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "a."},
        {"role": "user", "content": "B?"},
    ]
    completion = [{"role": "assistant", "content": "b."}]
    plain = {"prompt": prompt, "completion": completion}
    assert trained_spans(tokenizer, prepared(tokenizer, plain, assistant_only_loss=True).examples[0]) == [
        "b.<|im_end|>\n"
    ]
    on = {**plain, "prompt": [prompt[0], {**prompt[1], "weight": 1}, prompt[2]]}
    dataset = prepared(tokenizer, on, assistant_only_loss=True, mask_history=True)
    assert trained_spans(tokenizer, dataset.examples[0]) == ["a.<|im_end|>\n", "b.<|im_end|>\n"]
