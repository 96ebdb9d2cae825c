"""Labels: which tokens the model is trained to predict. Every such decision is made here.

The loss is cross-entropy on `labels`. A label of -100 (PyTorch's ignore_index) takes a token out of the loss,
so it still feeds the context but is never a target:

    tokens   <|im_start|> user \\n 微调 测试 <|im_end|> \\n <|im_start|> assistant \\n 我 学会 了 <|im_end|> \\n
    labels    -100        -100  ...                     -100 ...                   我 学会 了 <|im_end|> \\n

Each rule below yields a boolean mask over the tokens (True = trained); labels keep the token id where every
active mask is True (plan_masks picks the rules once per dataset):

- completion only    prompt/completion data: tokens from the completion start onwards.
- generation tags    the template marks assistant text with {% generation %}; transformers turns that into a
                     per-token mask.
- response template  TRL's former DataCollatorForCompletionOnlyLM: train after each response template (e.g.
                     "<start_of_turn>model\\n") up to the next instruction template (e.g. "<start_of_turn>user\\n").
                     Without an instruction template, only after the last response template.
- everything         no mask: every token is trained (TRL's default for text and messages).

Then whole assistant turns are switched (switch_turns): the runs of the generation-tag mask, or the spans from
each response template to the next instruction template, the k-th being the k-th assistant message's. With
--mask_history (LLaMA-Factory's name) all but the last are context; a message's own `weight` (0 or 1) or `train`
(false or true), as axolotl reads them, decides for its turn. A switch matching no turn is refused, not ignored.

Pre-tokenized rows are trained as TRL 1.16 trains them: their own `labels` as they are, when they have them;
otherwise their `assistant_masks` always, and their `completion_mask` only with --completion_only_loss (TRL's
documented default leaves it unused: counted, so it is seen).

Templates are matched on token ids, not text. A string can tokenize differently in context than alone
("\\n### Assistant:" vs "### Assistant:"), so several tokenizations are tried: the template alone, and the
template after a few typical contexts with the context's tokens stripped (a token that straddles the boundary
is kept whole). What matters most is where a match *ends*, which all of them agree on.

Then, per example: the cut keeps its first max_length tokens (and their labels); an example left with no
trained token is dropped, with the reason (drop_reason). In a packed row each sequence's first token follows
another sequence's last, so it is not trained (boundary_labels). The loss divides by the trained tokens a
position predicts, labels[1:] != -100 (count_trained_tokens): the first token of a row has nothing before it
to be predicted from.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisft.errors import UserError

from .chat_template import Formatted, check_token_ids, has_generation_tags

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
    matches, position = [], 0
    while position < len(input_ids):
        for variant in variants:
            if input_ids[position : position + len(variant)] == variant:
                matches.append((position, position + len(variant)))
                position += len(variant)
                break
        else:
            position += 1
    return matches


def response_spans(
    input_ids: list[int], response_variants: list[list[int]], instruction_variants: list[list[int]] | None
) -> list[tuple[int, int]]:
    """(start, stop) of each trained response: after its response template up to the next instruction template.
    Without an instruction template the end of a response is unknown except for the last one: only that one."""
    responses = find_template(input_ids, response_variants)
    if not instruction_variants:
        responses = responses[-1:]
    starts = [start for start, _ in find_template(input_ids, instruction_variants or [])]
    return [(end, next((start for start in starts if start >= end), len(input_ids))) for _, end in responses]


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each run of trained positions: the turns that {% generation %} tags mark."""
    bits = [False, *map(bool, mask), False]  # padded, so each run has a rising and a falling edge
    edges = [position for position in range(len(mask) + 1) if bits[position] != bits[position + 1]]
    return list(zip(edges[::2], edges[1::2]))


def family_templates(chat_template: str | None) -> tuple[str, str] | None:
    """(response, instruction) templates of a known template family, or None."""
    known = [templates for marker, *templates in TEMPLATE_FAMILIES.values() if marker in (chat_template or "")]
    return tuple(known[0]) if known else None


def labels_from_masks(input_ids: list[int], masks: list[list[bool]]) -> list[int]:
    """The token id where every mask trains it, -100 elsewhere. No mask: train everything."""
    if not masks:  # the common case (whole-sequence loss), without a loop in Python over every token
        return list(input_ids)
    return [token if all(trains) else IGNORE_INDEX for token, *trains in zip(input_ids, *masks, strict=True)]


# ----------------------------------------------------------------------------- the rules, planned once per dataset
@dataclass
class MaskPlan:
    """Which masks apply to a dataset, decided once from its format and the flags."""

    completion_only: bool
    generation_tags: bool
    response_variants: list[list[int]] | None
    instruction_variants: list[list[int]] | None
    response_template: str | list[int] | None
    mask_history: bool = False  # train only each conversation's last assistant turn
    locates_turns: bool = False  # the masks find each assistant turn, as a message's weight/train switch needs


def plan_masks(
    kind: str,
    columns: set[str],
    tokenizer,
    *,
    completion_only_loss: bool | None,
    assistant_only_loss: bool,
    response_template: str | list[int] | None,
    instruction_template: str | list[int] | None,
    mask_history: bool = False,
) -> MaskPlan:
    """The masks for a dataset of this format; `columns` are its first example's keys (all share them). A template
    is a string, or the token ids it appears as."""
    is_prompt_completion = kind in ("prompt_completion", "conversational_prompt_completion")
    is_conversation = kind in ("conversational", "conversational_prompt_completion")
    if kind == "tokenized":
        # As TRL decides it: "on for prompt/completion data" means rows with a prompt and a completion, which
        # pre-tokenized rows are not, so their completion_mask needs the flag (flags they cannot honour: refused).
        completion_only = bool(completion_only_loss) and "completion_mask" in columns
    else:
        if completion_only_loss and not is_prompt_completion:
            raise MaskingError(
                f"--completion_only_loss needs prompt/completion data; this dataset is {kind}. "
                "For conversations use --assistant_only_loss; for text, --response_template."
            )
        completion_only = is_prompt_completion and completion_only_loss is not False
    generation_tags = False
    response, instruction = response_template, instruction_template
    if assistant_only_loss:
        if not is_conversation:
            raise MaskingError(f"--assistant_only_loss needs conversational data; this dataset is {kind}.")
        if has_generation_tags(tokenizer.chat_template):
            generation_tags = True
        elif response is None:
            known = family_templates(tokenizer.chat_template)
            if known is None:
                raise MaskingError(
                    "--assistant_only_loss: the chat template has no {% generation %} tags and is not a family "
                    "minisft knows (ChatML, Llama 3, Gemma). Pass --response_template (the text that opens an "
                    "assistant turn) and --instruction_template (the text that opens any other turn)."
                )
            response, instruction = known
    if mask_history and not is_conversation:  # (DataConfig has refused it without an assistant mask already)
        raise MaskingError(f"--mask_history needs conversational data; this dataset is {kind}.")
    return MaskPlan(
        completion_only=completion_only,
        generation_tags=generation_tags,
        response_variants=template_variants(tokenizer, response) if response is not None else None,
        instruction_variants=template_variants(tokenizer, instruction) if instruction is not None else None,
        response_template=response,
        mask_history=mask_history,
        locates_turns=generation_tags or instruction is not None,
    )


# ----------------------------------------------------------------------------- one example's labels
def example_labels(
    formatted: Formatted, plan: MaskPlan, switches: list[bool | None] = (), origin: str = "the example"
) -> tuple[list[int], bool, bool]:
    """One formatted example's labels; and whether its response template was missing (nothing is trained then),
    and whether it held a completion_mask left unused: the caller counts both, so neither goes unseen.
    `switches`: its assistant messages' own weight/train, True, False or None (as the masks say)."""
    if formatted.labels is not None:  # a pre-tokenized row's own labels win over any mask it holds, as in TRL
        return list(formatted.labels), False, False
    input_ids = formatted.input_ids
    masks, spans = [], []
    if plan.completion_only:
        if formatted.completion_mask is not None:
            masks.append([bool(bit) for bit in formatted.completion_mask])
        else:
            masks.append([position >= formatted.completion_start for position in range(len(input_ids))])
    if formatted.assistant_mask is not None:  # {% generation %} tags, or a pre-tokenized row's assistant_masks
        masks.append([bool(bit) for bit in formatted.assistant_mask])
    if plan.response_variants:
        spans = response_spans(input_ids, plan.response_variants, plan.instruction_variants)
        inside = {position for start, stop in spans for position in range(start, stop)}
        masks.append([position in inside for position in range(len(input_ids))])
    labels = labels_from_masks(input_ids, masks)
    # The turns: the {% generation %} runs, or the response spans (without an instruction template, only the last).
    turns = runs(formatted.assistant_mask) if plan.generation_tags else spans
    if plan.mask_history or any(switch is not None for switch in switches):
        labels = switch_turns(labels, input_ids, turns, switches, plan.mask_history, origin)
    completion_mask_unused = not plan.completion_only and formatted.completion_mask is not None
    return labels, bool(plan.response_variants) and not spans, completion_mask_unused


def switch_turns(labels, input_ids, turns, switches, mask_history: bool, origin: str) -> list[int]:
    """`labels` with whole assistant turns switched: the k-th assistant message's switch sets the k-th of `turns`
    ((start, stop) each); a turn without one, under mask_history, is context unless it is the last."""
    if any(switch is not None for switch in switches) and len(turns) != len(switches):
        raise MaskingError(
            f"{origin}: its {len(switches)} assistant messages have weight/train switches, but the masks find "
            f"{len(turns)} assistant turns, so they cannot be matched (inspect shows the turns found)"
        )
    labels = list(labels)
    for index, (start, stop) in enumerate(turns):
        switch = switches[index] if len(switches) == len(turns) else None
        if switch is not None or (mask_history and index < len(turns) - 1):
            labels[start:stop] = input_ids[start:stop] if switch else [IGNORE_INDEX] * (stop - start)
    return labels


def check_own_labels(labels: list[int], vocab_size: int, origin: str) -> None:
    """A pre-tokenized row's own labels are trained as they are: each is IGNORE_INDEX or a token of this tokenizer."""
    check_token_ids(labels, vocab_size, f"{origin}: labels", allowed=IGNORE_INDEX)


def cut(input_ids: list[int], labels: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """The first max_length tokens, as TRL truncates; None: whole, for a packer that splits it over rows instead."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, labels
    return input_ids[:max_length], labels[:max_length]


def drop_reason(trained: int, uncut_labels: list[int], plan: MaskPlan, template_missing: bool = True) -> str | None:
    """Why an example whose labels train `trained` tokens after the cut is dropped; None: it is kept. Training on an
    example without a trained token would only add its length to the batch. template_missing: example_labels' say."""
    if trained:
        return None
    if any(label != IGNORE_INDEX for label in uncut_labels):
        return "every trained token was past max_length"
    if plan.response_variants and template_missing:
        return "response template not found"
    return "no token to train on"


# ----------------------------------------------------------------------------- packed rows, and the count
def boundary_labels(labels):
    """`labels` (a list or an array) of a sequence in a packed or padding-free row, its first position not trained."""
    labels = labels.copy()
    # The first token of a sequence has no context of its own to be predicted from.
    labels[0] = IGNORE_INDEX
    return labels


def count_trained_tokens(labels) -> int:
    """The trained tokens of a batch's labels (a tensor): those a position predicts, labels[..., 1:] != -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def count_trained_tokens_of(units: list[dict]) -> int:
    """count_trained_tokens of the batch these examples or packed rows collate to, counted before collating. Each
    unit's first label has no predecessor to predict it; inside a packed row every example's first label is -100
    already (boundary_labels), so the sums agree."""
    return sum(sum(label != IGNORE_INDEX for label in unit["labels"][1:]) for unit in units)
