"""Preparation: canonical examples become what training consumes, `input_ids` and `labels`.

    canonical example ──formatting──▶ token ids ──masking──▶ labels ──truncate──▶ drop untrained
                                                                       (keep the start)

Every decision is counted, never silent: examples truncated to --max_length (and the tokens
cut), examples dropped because no token is left to train on (and why), examples where a
response template was never found. `python -m minisft.inspect` prints exactly this output.

Pre-tokenized rows are trained as TRL 1.16 trains them: their own `labels` as they are, when
they have them; otherwise their `assistant_masks` always, and their `completion_mask` only with
--completion_only_loss (TRL's documented default leaves it unused: counted, so it is seen).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import DataConfig, PackingConfig
from .data import dataset_format, load_splits
from .formatting import Formatted, format_example, has_generation_tags, resolve_eos_token, setup_chat_template
from .masking import (
    MaskingError,
    completion_mask,
    family_templates,
    labels_from_masks,
    parse_template,
    response_template_mask,
    template_variants,
)


@dataclass
class PrepareStats:
    examples: int = 0  # kept: what training will see
    tokens: int = 0  # in kept examples, after truncation
    trained_tokens: int = 0  # labels != -100
    truncated: int = 0  # examples longer than max_length
    truncated_tokens: int = 0  # tokens cut off by truncation
    dropped: int = 0
    drop_reasons: Counter = field(default_factory=Counter)
    response_template_missing: int = 0
    completion_mask_unused: int = 0  # pre-tokenized rows whose completion_mask --completion_only_loss would apply


@dataclass
class PreparedDataset:
    examples: list[dict]  # {"input_ids": [...], "labels": [...]}
    stats: PrepareStats
    origins: list[str] = field(default_factory=list)  # where each kept example came from


@dataclass
class _MaskPlan:
    """Which masks apply to this dataset, decided once from its format and the flags."""

    completion_only: bool
    generation_tags: bool
    response_variants: list[list[int]] | None
    instruction_variants: list[list[int]] | None
    response_template: str | list[int] | None


def prepare_dataset(
    examples: list[dict], tokenizer, config: DataConfig | None = None, truncate: bool = True
) -> PreparedDataset:
    """Format, mask, truncate to max_length (unless packing will cut instead: truncate=False), drop, count."""
    config = config or DataConfig()
    if not examples:
        return PreparedDataset([], PrepareStats())
    plan = _plan_masks(dataset_format(examples[0]), set(examples[0]), tokenizer, config)
    eos_token = resolve_eos_token(tokenizer, config.eos_token)
    stats = PrepareStats()
    prepared, origins = [], []
    for index, example in enumerate(examples):
        formatted = format_example(example, tokenizer, eos_token, assistant_mask=plan.generation_tags)
        input_ids = formatted.input_ids
        if formatted.labels is not None:  # a pre-tokenized row's own labels win over any mask it holds, as in TRL
            labels = list(formatted.labels)
        else:
            labels = labels_from_masks(input_ids, _masks(formatted, plan, stats))
        trained_before_truncation = any(label != -100 for label in labels)
        if truncate and config.max_length is not None and len(input_ids) > config.max_length:
            stats.truncated += 1
            stats.truncated_tokens += len(input_ids) - config.max_length
            input_ids, labels = input_ids[: config.max_length], labels[: config.max_length]
        if all(label == -100 for label in labels):
            stats.dropped += 1
            stats.drop_reasons[_drop_reason(plan, trained_before_truncation)] += 1
            continue
        stats.examples += 1
        stats.tokens += len(input_ids)
        stats.trained_tokens += sum(label != -100 for label in labels)
        prepared.append({"input_ids": input_ids, "labels": labels})
        origins.append(example.get("origin", f"example {index}"))
    if plan.response_variants and stats.response_template_missing * 2 > len(examples):
        raise MaskingError(_template_not_found_message(plan, examples, tokenizer, eos_token, stats))
    return PreparedDataset(prepared, stats, origins)


def _masks(formatted: Formatted, plan: _MaskPlan, stats: PrepareStats) -> list[list[bool]]:
    """The masks that apply to one formatted example (True = trained); what no rule finds is counted."""
    input_ids = formatted.input_ids
    masks = []
    if plan.completion_only:
        if formatted.completion_mask is not None:
            masks.append([bool(bit) for bit in formatted.completion_mask])
        else:
            masks.append(completion_mask(len(input_ids), formatted.completion_start))
    elif formatted.completion_mask is not None:
        stats.completion_mask_unused += 1
    if formatted.assistant_mask is not None:  # {% generation %} tags, or a pre-tokenized row's assistant_masks
        masks.append([bool(bit) for bit in formatted.assistant_mask])
    if plan.response_variants:
        mask = response_template_mask(input_ids, plan.response_variants, plan.instruction_variants)
        if mask is None:
            stats.response_template_missing += 1
            mask = [False] * len(input_ids)
        masks.append(mask)
    return masks


def _plan_masks(kind: str, columns: set[str], tokenizer, config: DataConfig) -> _MaskPlan:
    """The masks for a dataset of this format; `columns` are its first example's keys (all share them)."""
    is_prompt_completion = kind in ("prompt_completion", "conversational_prompt_completion")
    is_conversation = kind in ("conversational", "conversational_prompt_completion")
    if kind == "tokenized":
        _check_tokenized_flags(columns, config)
        # As TRL decides it: "on for prompt/completion data" means rows with a prompt and a completion, which
        # pre-tokenized rows are not, so their completion_mask needs the flag.
        completion_only = bool(config.completion_only_loss)
    else:
        if config.completion_only_loss and not is_prompt_completion:
            raise MaskingError(
                f"--completion_only_loss needs prompt/completion data; this dataset is {kind}. "
                "For conversations use --assistant_only_loss; for text, --response_template."
            )
        completion_only = is_prompt_completion and config.completion_only_loss is not False
    generation_tags = False
    response, instruction = parse_template(config.response_template), parse_template(config.instruction_template)
    if instruction is not None and response is None:
        raise MaskingError("--instruction_template needs a --response_template.")
    if config.assistant_only_loss:
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
    return _MaskPlan(
        completion_only=completion_only,
        generation_tags=generation_tags,
        response_variants=template_variants(tokenizer, response) if response is not None else None,
        instruction_variants=template_variants(tokenizer, instruction) if instruction is not None else None,
        response_template=response,
    )


def _check_tokenized_flags(columns: set[str], config: DataConfig) -> None:
    """Masking flags that pre-tokenized rows cannot honour are errors, not silently ignored flags."""
    if config.assistant_only_loss:
        raise MaskingError(
            "--assistant_only_loss needs conversations; these rows are pre-tokenized. Their 'assistant_masks' "
            "column, if they have one, is applied without the flag."
        )
    if "labels" in columns:
        given = [
            flag
            for flag, value in (
                ("--completion_only_loss", config.completion_only_loss),
                ("--response_template", config.response_template),
            )
            if value
        ]
        if given:
            raise MaskingError(
                "These pre-tokenized rows carry their own labels, which are trained as they are; "
                f"drop {' and '.join(given)}."
            )
    elif config.completion_only_loss and "completion_mask" not in columns:
        raise MaskingError(
            "--completion_only_loss on pre-tokenized rows needs their 'completion_mask' column (1 on completion "
            "tokens); these rows have none."
        )


def _drop_reason(plan: _MaskPlan, trained_before_truncation: bool) -> str:
    if trained_before_truncation:
        return "every trained token was past max_length"
    if plan.response_variants:
        return "response template not found"
    return "no token to train on"


def _template_not_found_message(plan: _MaskPlan, examples, tokenizer, eos_token, stats: PrepareStats) -> str:
    sample = format_example(examples[0], tokenizer, eos_token).input_ids[:60]
    shown = " ".join(f"{token}:{tokenizer.decode([token])!r}" for token in sample)
    variants = " or ".join(str(variant) for variant in plan.response_variants)
    return (
        f"The response template {plan.response_template!r} was not found in {stats.response_template_missing} of "
        f"{len(examples)} examples, so they have nothing to train on.\n"
        f"It tokenizes as {variants}.\n"
        f"The first example ({examples[0].get('origin', 'example 0')}) tokenizes as:\n  {shown}\n"
        "Pick a template whose token ids appear in the examples, or pass the ids as they appear there, "
        "as a JSON list: --response_template '[id, id, ...]'."
    )


@dataclass
class PreparedSplits:
    train: PreparedDataset
    eval: PreparedDataset | None
    added_tokens: list[str]  # special tokens the ChatML fallback added: the model's embeddings must grow
    skipped_blank_lines: int


def load_and_prepare(source, tokenizer, config: DataConfig, packing: PackingConfig | None = None) -> PreparedSplits:
    """From a dataset source to prepared train and eval splits: the whole data side of a run.

    A split that will be packed is not truncated here: the packer truncates (bfd) or splits
    (bfd_split, wrapped) what is longer than max_length, as TRL does.
    """
    packing = packing or PackingConfig()
    splits = load_splits(
        source,
        dataset_config=config.dataset_config,
        train_split=config.dataset_train_split,
        test_split=config.dataset_test_split,
        eval_split_size=config.eval_split_size,
        seed=config.seed,
        text_field=config.dataset_text_field,
    )
    needs_template = config.chat_template_path is not None or "conversational" in splits.format
    added_tokens = setup_chat_template(tokenizer, config.chat_template_path) if needs_template else []
    train = prepare_dataset(splits.train, tokenizer, config, truncate=not packing.packs("train"))
    evaluation = (
        prepare_dataset(splits.eval, tokenizer, config, truncate=not packing.packs("eval")) if splits.eval else None
    )
    return PreparedSplits(train, evaluation, added_tokens, splits.skipped_blank_lines)
