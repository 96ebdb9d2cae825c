"""Generation: ask a model a question, the way its chat template expects, and read the answer.

A chat model answers text laid out in its chat template, ending with the opening of an assistant
turn (`add_generation_prompt`). Then it predicts one token at a time, each fed back as input,
until it emits its end-of-turn token or runs out of `max_new_tokens`:

    greedy                 next = argmax p(token | text so far)       the same answer every time
    temperature T, top_p   sample from p^(1/T), kept to the smallest set of tokens whose mass is top_p

The loop itself is transformers' `model.generate`. What minisft adds is loading any of the three
things a run leaves behind: a full model folder, a peft-format adapter folder (its base model
plus the adapter, merged), or the embedded model's name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minisft.errors import UserError
from minisft.sft.lora import merge_lora

from .models import EMBEDDED_MODEL_NAME, fit_embeddings_to_tokenizer, load_model, load_tokenizer
from .peft_files import ADAPTER_CONFIG, load_adapter


class GenerationError(UserError, ValueError):
    """A generation setting that cannot work; the message names the flag."""


def load_for_chat(name_or_path: str, trust_remote_code: bool = False):
    """(model, tokenizer), ready for generation, from a model folder, an adapter folder or a model name."""
    adapter_config = Path(name_or_path) / ADAPTER_CONFIG
    if not adapter_config.is_file():
        model = load_model(name_or_path, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        return model.eval(), tokenizer
    base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise GenerationError(f"{adapter_config} names no base_model_name_or_path, so the base model is unknown.")
    if Path(base).name.lower() == EMBEDDED_MODEL_NAME and not Path(base).is_dir():
        # The embedded model's converted folder on the machine that trained it (peft needs a path): here, the alias
        # converts it again into this machine's cache.
        base = EMBEDDED_MODEL_NAME
    model = load_model(base, trust_remote_code=trust_remote_code)
    # A run saves its tokenizer beside the adapter; it may have grown (the ChatML fallback).
    has_tokenizer = (Path(name_or_path) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(name_or_path if has_tokenizer else base, trust_remote_code=trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)
    load_adapter(model, name_or_path)
    merge_lora(model)  # W + B·A·scale in place: generation then costs what the base model costs
    return model.eval(), tokenizer


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise GenerationError(f"--temperature must be 0 (greedy) or more, got {temperature}.")
    if not 0 < top_p <= 1:
        raise GenerationError(f"--top_p must be in (0, 1], got {top_p}.")
    if max_new_tokens <= 0:
        raise GenerationError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> list[str]:
    """The assistant's next turn for each conversation, as text. Temperature 0 is greedy decoding.

    The conversations are generated as one batch, padded on the left so that every prompt ends
    where its answer begins.
    """
    check_sampling(temperature, top_p, max_new_tokens)
    texts = [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in conversations
    ]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        # The template already wrote any BOS it wants; tokenizing must not add another.
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    # Eager even under --torch_compile: a key-value cache that grows every token would be a new graph each time.
    with torch.compiler.set_stance("force_eager"):
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=end_of_turn_ids(tokenizer),
            streamer=streamer,
            # greedy unless asked: the model's generation_config may carry sampling defaults of its own
            top_k=None,
            **sampling,
        )
    answers = output[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn: EOS, and the template's end-of-turn token where it has one."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(token_id for token_id in ids if token_id is not None)
