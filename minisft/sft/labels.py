"""Label masking: which tokens the model is trained to predict.

The loss is cross-entropy on `labels`. A label of -100 (PyTorch's ignore_index) takes a
token out of the loss, so it still feeds the context but is never a target:

    tokens   <|im_start|> user \\n 微调 测试 <|im_end|> \\n <|im_start|> assistant \\n 我 学会 了 <|im_end|> \\n
    labels    -100        -100  ...                     -100 ...                   我 学会 了 <|im_end|> \\n

Each rule below yields a boolean mask over the tokens (True = trained); labels keep the
token id where every active mask is True:

- completion only    prompt/completion data: tokens from the completion start onwards.
- generation tags    the template marks assistant text with {% generation %}; transformers
                     turns that into a per-token mask.
- response template  TRL's former DataCollatorForCompletionOnlyLM: train after each
                     response template (e.g. "<start_of_turn>model\\n") up to the next
                     instruction template (e.g. "<start_of_turn>user\\n"). Without an
                     instruction template, only after the last response template.
- everything         no mask: every token is trained (TRL's default for text and messages).

Templates are matched on token ids, not text. A string can tokenize differently in context
than alone ("\\n### Assistant:" vs "### Assistant:"), so several tokenizations are tried:
the template alone, and the template after a few typical contexts with the context's tokens
stripped (a token that straddles the boundary is kept whole). What matters most is where a
match *ends*, which all of them agree on.
"""

from __future__ import annotations

import json

from minisft.errors import UserError

IGNORE_INDEX = -100

# Text a template commonly stands between; encoding it there finds in-context tokenizations.
_BEFORE = ("", "\n", " ", "\n\n", ".", ":", "a")
_AFTER = ("", "x", "X", " x", "1", "\n", "我")

# Response / instruction templates of common chat-template families, found by a marker in the
# template text. The instruction template is the start of any next turn, whatever its role,
# so each assistant turn is trained up to and including its end-of-turn token.
TEMPLATE_FAMILIES = {
    "chatml": ("<|im_start|>", "<|im_start|>assistant\n", "<|im_start|>"),
    "llama3": ("<|start_header_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|start_header_id|>"),
    "gemma": ("<start_of_turn>", "<start_of_turn>model\n", "<start_of_turn>"),
}


class MaskingError(UserError, ValueError):
    """A masking option cannot be applied; the message says why and what to do."""


def parse_template(template: str | list[int] | None) -> str | list[int] | None:
    """A template from the command line: a JSON list of token ids, or else the string itself."""
    if isinstance(template, str) and template.lstrip().startswith("["):
        try:
            ids = json.loads(template)
        except json.JSONDecodeError:
            return template
        if isinstance(ids, list) and ids and all(isinstance(token, int) for token in ids):
            return ids
    return template


def template_variants(tokenizer, template: str | list[int]) -> list[list[int]]:
    """Token-id sequences that the template can appear as, longest first."""
    if isinstance(template, list):
        return [list(template)]
    variants = {tuple(tokenizer.encode(template, add_special_tokens=False))}
    for before in _BEFORE:
        for after in _AFTER:
            encoded = tokenizer(before + template + after, add_special_tokens=False, return_offsets_mapping=True)
            template_end = len(before) + len(template)
            tokens = [
                (token, start, end)
                for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
                # A token straddling the template's end also holds the first trained token: left out.
                if len(before) < end <= template_end
            ]
            # A token straddling its start (" Answer" after a space) is how the template reads
            # there: keep it whole. Also try without it, if what is left still covers most of
            # the template (a lone ":" would match anywhere).
            variants.add(tuple(token for token, _, _ in tokens))
            inside = [(token, start, end) for token, start, end in tokens if start >= len(before)]
            if inside and (inside[-1][2] - inside[0][1]) * 2 > len(template):
                variants.add(tuple(token for token, _, _ in inside))
    variants.discard(())
    return [list(variant) for variant in sorted(variants, key=len, reverse=True)]


def find_template(input_ids: list[int], variants: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) of every non-overlapping occurrence of any variant, left to right."""
    matches = []
    position = 0
    while position < len(input_ids):
        for variant in variants:
            if input_ids[position : position + len(variant)] == variant:
                matches.append((position, position + len(variant)))
                position += len(variant)
                break
        else:
            position += 1
    return matches


def response_template_mask(
    input_ids: list[int], response_variants: list[list[int]], instruction_variants: list[list[int]] | None
) -> list[bool] | None:
    """Train after each response template up to the next instruction template. None: never found."""
    responses = find_template(input_ids, response_variants)
    if not responses:
        return None
    mask = [False] * len(input_ids)
    if not instruction_variants:
        # Without an instruction template the end of a response is unknown except for the last one.
        responses = responses[-1:]
    instruction_starts = [start for start, _ in find_template(input_ids, instruction_variants or [])]
    for _, response_end in responses:
        stop = next((start for start in instruction_starts if start >= response_end), len(input_ids))
        for position in range(response_end, stop):
            mask[position] = True
    return mask


def completion_mask(length: int, completion_start: int) -> list[bool]:
    return [position >= completion_start for position in range(length)]


def family_templates(chat_template: str | None) -> tuple[str, str] | None:
    """(response, instruction) templates of a known template family, or None."""
    for marker, response, instruction in TEMPLATE_FAMILIES.values():
        if chat_template and marker in chat_template:
            return response, instruction
    return None


def labels_from_masks(input_ids: list[int], masks: list[list[bool]]) -> list[int]:
    """The token id where every mask trains it, -100 elsewhere. No mask: train everything."""
    return [
        token if all(mask[position] for mask in masks) else IGNORE_INDEX for position, token in enumerate(input_ids)
    ]
