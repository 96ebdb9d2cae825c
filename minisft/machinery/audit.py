"""The pre-flight audit: what a whole prepared split will teach, summed before a run spends a GPU on it.

`python -m minisft.inspect` draws a few examples; the failures that cost a run hide in the rest, and
show only after training: the model never stops (its end-of-turn or EOS token is never a target),
most labels are -100, a response template matches only some examples, one file was read twice.
The audit reads every example of the prepared storage (minisft/machinery/storage.py) and counts:

- tokens and trained tokens per example, as quantiles (p50, p90, p99, max);
- the examples whose stop token is trained: the tokens generation stops on, the tokenizer's EOS and
  the template's end-of-turn (the token it puts right after an assistant message: <|im_end|>, <|eot_id|>);
- the examples where more than 95% of the tokens are masked;
- exact duplicates: examples whose input_ids equal an earlier example's (by hash);
- trained tokens by role, for a template family whose turns open with a header (ChatML, Llama 3,
  Gemma). Approximate: a turn runs from its header to the next one, so its end-of-turn token counts
  for it, and the tokens before the first header (a BOS, a template's preamble) count as "other";
- from preparation's figures (prepare.PrepareStats): response template not found, dropped, truncated.

Each count has a warning threshold, justified where it is set; `python -m minisft.inspect --audit`
shows the table, and a training run prints the warnings alone before step 1. The storage is read in
chunks of CHUNK_TOKENS with numpy, so the audit's memory is bounded and its cost is one pass over the
tokens plus one hash per example (measured: 100,000 examples in about a second).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from minisft.sft.chat_template import TEMPLATE_ERRORS
from minisft.sft.labels import IGNORE_INDEX

from .config import DataConfig, PackingConfig
from .prepare import PreparedDataset, load_and_prepare

CHUNK_TOKENS = 1 << 22  # tokens read at once: ~60 MB of working arrays, whatever the split's size

# In a clean preparation every example trains its stop token; only an example truncated to --max_length
# loses it, and truncation usually cuts a tail of a few percent. Under 90%, something structural is wrong (a
# response template that ends before the end-of-turn, text rows ending on a token generation does not stop
# on), or the cut eats the data: each example without a trained stop teaches the model to go on past its answer.
STOP_TRAINED_MIN = 0.9
MASKED_ABOVE = 0.95  # an example with more than this share of its tokens masked is "mostly masked"
# Long prompts with short answers (classification, retrieval) are mostly masked by design, so a few such
# examples are normal; when more than half are, the masks probably cut into the answers.
MOSTLY_MASKED_MAX = 0.5
# Exact copies are sometimes deliberate (the demo repeats its seed conversation; a mixture's proportion above 1
# repeats a source): a file read twice makes half of the examples copies, which this catches.
DUPLICATES_MAX = 0.2
# Cutting a long tail is what --max_length is for; cutting more than one example in twenty cuts the bulk.
TRUNCATED_MAX = 0.05
# An example dropped is data the user meant to train on; one in a hundred is a mask that does not fit the data.
DROPPED_MAX = 0.01

# How a template family opens a turn of a role (the marker that finds the family, as labels.TEMPLATE_FAMILIES
# does). Only the header's start is matched: the newline after it may merge with the message's first token.
TURN_HEADERS = {
    "<|im_start|>": "<|im_start|>{role}",
    "<|start_header_id|>": "<|start_header_id|>{role}<|end_header_id|>",
    "<start_of_turn>": "<start_of_turn>{role}",
}
# A role as templates name it -> as the audit counts it (Gemma calls the assistant "model"; Llama 3 calls tool
# results "ipython").
ROLE_NAMES = {
    "system": "system", "user": "user", "assistant": "assistant", "model": "assistant", "tool": "tool",
    "ipython": "tool",
}  # fmt: skip


@dataclass
class Audit:
    examples: int
    tokens: int
    trained_tokens: int
    length_quantiles: dict[str, int]  # tokens per example: p50, p90, p99, max
    trained_quantiles: dict[str, int]  # trained tokens per example, the same
    stop_tokens: list[str]  # the tokens generation stops on
    stop_trained: int  # examples where one of them is trained
    mostly_masked: int  # examples with more than MASKED_ABOVE of their tokens masked
    duplicates: int  # examples whose input_ids repeat an earlier example's
    template_missing: int
    dropped: int
    drop_reasons: dict[str, int]
    truncated: int
    truncated_tokens: int
    truncated_trained_tokens: int | None = None  # None: not measured (it costs a second preparation)
    trained_by_role: dict[str, int] | None = None  # None: not a template family with turn headers
    warnings: list[str] = field(default_factory=list)


def stop_token_ids(tokenizer) -> dict[int, str]:
    """{id: token} of the tokens generation stops on: EOS, and the template's end-of-turn token."""
    stops = {} if tokenizer.eos_token_id is None else {tokenizer.eos_token_id: tokenizer.eos_token}
    end = end_of_turn_id(tokenizer)
    if end is not None:
        stops[end] = tokenizer.convert_ids_to_tokens(end)
    return stops


def end_of_turn_id(tokenizer) -> int | None:
    """The first special token the chat template puts after an assistant message's text; None without one."""
    if not tokenizer.chat_template:
        return None
    marker = "minisft-audit-answer"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except TEMPLATE_ERRORS:  # a template that cannot render this probe: EOS alone is checked
        return None
    if marker not in text:
        return None
    after = tokenizer.encode(text.rsplit(marker, 1)[1], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((token for token in after if token in special), None)


def turn_headers(tokenizer) -> dict[str, list[list[int]]] | None:
    """{role: [header ids, ...]} of the template's family (see TURN_HEADERS); None for another template."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    header = next((header for marker, header in TURN_HEADERS.items() if template and marker in template), None)
    if header is None:
        return None
    headers: dict[str, list[list[int]]] = {}
    for name, role in ROLE_NAMES.items():
        headers.setdefault(role, []).append(tokenizer.encode(header.format(role=name), add_special_tokens=False))
    return headers


def audit_split(
    prepared: PreparedDataset, tokenizer, roles: bool = False, truncated_trained_tokens: int | None = None
) -> Audit:
    """The audit of a prepared split (its examples a storage.TokenStorage). roles: count trained tokens by role
    too (inspect's table; the run's warnings do not need it)."""
    storage, stats = prepared.examples, prepared.stats
    offsets, lengths = storage.offsets, storage.lengths
    stops = stop_token_ids(tokenizer)
    headers = turn_headers(tokenizer) if roles else None
    trained_counts = np.zeros(len(lengths), np.int64)
    stop_trained = np.zeros(len(lengths), bool)
    by_role = np.zeros(len(headers) + 1, np.int64) if headers else None  # the last: "other"
    seen, duplicates = set(), 0
    for first, last in _chunks(offsets):
        base = int(offsets[first])
        ids = storage.ids_between(base, int(offsets[last]))
        labels = storage.labels_between(base, int(offsets[last]))
        trained = labels != IGNORE_INDEX
        starts = (offsets[first:last] - base).astype(np.int64)
        trained_counts[first:last] = np.add.reduceat(trained.astype(np.int64), starts)
        stop_hits = (trained & np.isin(labels, list(stops))).astype(np.int64)
        stop_trained[first:last] = np.add.reduceat(stop_hits, starts) > 0
        for start, end in zip(starts, np.append(starts[1:], len(ids))):
            digest = hashlib.blake2b(ids[start:end].tobytes(), digest_size=16).digest()
            duplicates += digest in seen
            seen.add(digest)
        if by_role is not None:
            role_of = _roles_of(ids, starts, headers)
            by_role += np.bincount(role_of[trained], minlength=len(by_role))
    audit = Audit(
        examples=len(lengths),
        tokens=int(lengths.sum()),
        trained_tokens=int(trained_counts.sum()),
        length_quantiles=_quantiles(lengths),
        trained_quantiles=_quantiles(trained_counts),
        stop_tokens=list(stops.values()),
        stop_trained=int(stop_trained.sum()),
        mostly_masked=int((trained_counts < (1 - MASKED_ABOVE) * lengths).sum()),
        duplicates=duplicates,
        template_missing=stats.response_template_missing,
        dropped=stats.dropped,
        drop_reasons=dict(stats.drop_reasons),
        truncated=stats.truncated,
        truncated_tokens=stats.truncated_tokens,
        truncated_trained_tokens=truncated_trained_tokens,
    )
    if by_role is not None and by_role[:-1].any():  # no header anywhere: not conversations (text rows, say)
        audit.trained_by_role = dict(zip([*headers, "other"], by_role.tolist()))
    audit.warnings = audit_warnings(audit)
    return audit


def trained_tokens_cut(
    prepared: PreparedDataset, split: str, source, tokenizer, config: DataConfig, packing: PackingConfig, seed: int
) -> int | None:
    """The trained tokens that truncation to --max_length cut from `split`: the split prepared again whole (not
    cached), less what the cut kept. Preparation counts the tokens cut, not which were trained; this costs a second
    preparation, so inspect --audit pays it only when something was cut, and a run never does."""
    if not prepared.stats.truncated:
        return 0
    whole = load_and_prepare(source, tokenizer, replace(config, max_length=None, cache_dir="none"), packing, seed)
    uncut = whole.train if split == "train" else whole.eval
    # An example whose every trained token was cut is dropped from the truncated split: its tokens count here too.
    return uncut.stats.trained_tokens - prepared.stats.trained_tokens


def _chunks(offsets: np.ndarray):
    """(first, last) example ranges of about CHUNK_TOKENS tokens each (at least one example)."""
    first, count = 0, len(offsets) - 1
    while first < count:
        last = int(np.searchsorted(offsets, offsets[first] + CHUNK_TOKENS, side="right")) - 1
        last = min(max(last, first + 1), count)
        yield first, last
        first = last


def _roles_of(ids: np.ndarray, starts: np.ndarray, headers: dict[str, list[list[int]]]) -> np.ndarray:
    """Each token's role number (headers' order; len(headers) = "other"): that of the last header before it in
    its example. A header is found where its token ids appear in a row."""
    other = len(headers)
    opened = np.full(len(ids), -1, np.int64)
    opened[starts] = other  # each example starts as "other", so no role runs on into the next example
    for number, variants in enumerate(headers.values()):
        for header in variants:
            if not header or len(header) > len(ids):
                continue
            found = np.ones(len(ids) - len(header) + 1, bool)
            for offset, token in enumerate(header):
                found &= ids[offset : offset + len(found)] == token
            opened[: len(found)][found] = number
    # Forward-fill: each token takes the value set at the last position at or before it that set one.
    last_set = np.maximum.accumulate(np.where(opened >= 0, np.arange(len(ids)), 0))
    return opened[last_set]


def _quantiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(values.max())}


def audit_warnings(audit: Audit) -> list[str]:
    """One line per trap the audit found, each with its figure and the threshold it crossed."""
    warnings = []
    seen = audit.examples + audit.dropped  # the examples preparation read
    if audit.examples and audit.stop_trained < STOP_TRAINED_MIN * audit.examples:
        warnings.append(
            f"only {audit.stop_trained:,} of {audit.examples:,} examples ({audit.stop_trained / audit.examples:.0%}) "
            f"train a stop token ({' or '.join(audit.stop_tokens) or 'the tokenizer has none'}): the model may never "
            "learn to stop. Check that the masks reach the end-of-turn token (--response_template / "
            "--instruction_template), and --eos_token"
        )
    if audit.examples and audit.mostly_masked > MOSTLY_MASKED_MAX * audit.examples:
        warnings.append(
            f"{audit.mostly_masked:,} of {audit.examples:,} examples have more than {MASKED_ABOVE:.0%} of their "
            "tokens masked (-100): check the masking flags with python -m minisft.inspect"
        )
    if audit.template_missing:
        warnings.append(
            f"the response template was not found in {audit.template_missing:,} of {seen:,} examples: they train "
            "nothing and were dropped"
        )
    if seen and audit.dropped > DROPPED_MAX * seen:
        reasons = ", ".join(f"{count:,} {reason}" for reason, count in audit.drop_reasons.items())
        warnings.append(f"{audit.dropped:,} of {seen:,} examples were dropped ({reasons})")
    if seen and audit.truncated > TRUNCATED_MAX * seen:
        cut = "" if audit.truncated_trained_tokens is None else f", {audit.truncated_trained_tokens:,} of them trained"
        warnings.append(
            f"{audit.truncated:,} of {seen:,} examples ({audit.truncated / seen:.0%}) were truncated to --max_length "
            f"({audit.truncated_tokens:,} tokens cut{cut}): raise --max_length, or pack with bfd_split"
        )
    if audit.examples and audit.duplicates > DUPLICATES_MAX * audit.examples:
        warnings.append(
            f"{audit.duplicates:,} of {audit.examples:,} examples are exact copies of an earlier one: "
            "was a file read twice?"
        )
    return warnings
