"""Batches: the units of a micro-batch as the tensors the model takes, for each attention implementation.

A micro-batch takes one of three forms (here examples a, b, c of 6, 3 and 1 tokens, d of 8):

  padded (collate_padded): each example a row, padded to the longest; attention_mask 0 on padding

    input_ids  a a a a a a . .      attention_mask  1 1 1 1 1 1 0 0
               b b b . . . . .                      1 1 1 0 0 0 0 0
               c . . . . . . .                      1 0 0 0 0 0 0 0
               d d d d d d d d                      1 1 1 1 1 1 1 1

  packed rows (collate_rows): rows of pack(), padded to the longest row; the padding is a document of its own

    input_ids  a a a a a a b b b c  position_ids  0 1 2 3 4 5 0 1 2 0  document_ids  0 0 0 0 0 0 1 1 1 2
               d d d d d d d d . .                0 1 2 3 4 5 6 7 0 1                0 0 0 0 0 0 0 0 1 1

  padding-free (padding_free_row): unpacked examples, the micro-batch's laid end to end as one packed row

    input_ids  a a a a a a b b b c d d d d d d d d   position_ids  0 1 2 3 4 5 0 1 2 0 0 1 2 3 4 5 6 7

A padded batch is the same for every attention implementation: input_ids and attention_mask, from
which transformers builds the causal mask. A packed row (padding-free is one too) carries its
boundaries in the form each implementation reads (packed_inputs; attention.py builds them):

    eager               input_ids, position_ids, attention_mask: the block-causal mask, 0 / -inf
    flex_attention      input_ids, position_ids, attention_mask: a BlockMask of the same rule
    sdpa_by_example,    the rows laid end to end as one row, padding removed (flatten_rows), and
    flash_attention_*   cu_seq_lens = [0, 6, 9, 10, 18]: where each example starts (varlen_inputs)

Labels follow the inputs: -100 on padding, and laid end to end when the rows are. So do the loss
weights, where examples have a weight or --loss_normalization is sample: each position's ω
(loss_weights; loss.py says what it does), 0 on padding. The loop's collate does all of it
just before a micro-batch's forward, on the run's device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .attention import FLATTENED, SUPPORTED, block_causal_mask, flex_block_mask
from .labels import IGNORE_INDEX, count_trained_tokens_of
from .packing import PackingError, make_row


def setup_pad_token(tokenizer, pad_token: str | None = None) -> str | None:
    """Give the tokenizer the token batches are padded with. Returns a line for the run's log when it had none.

    As TRL chooses it: --pad_token, else the tokenizer's own pad token, else its EOS. Llama 3, Mistral
    and Qwen base tokenizers have no pad token. Which token pads never changes the loss: a padded
    position has label -100, and no real token attends to it (attention_mask 0, or a document of its
    own in a packed row). The tokenizer keeps the choice, so the saved tokenizer pads the same way.
    """
    own = tokenizer.pad_token
    chosen = pad_token or own or tokenizer.eos_token
    if chosen is None:
        raise PackingError("The tokenizer has neither a pad token nor an EOS token to pad batches with; "
                           "pass --pad_token.")  # fmt: skip
    if chosen not in tokenizer.get_vocab():
        raise PackingError(f"--pad_token {chosen!r} is not a token of this tokenizer's vocabulary.")
    tokenizer.pad_token = chosen
    if chosen == own:
        return None
    if own is None and pad_token is None:
        return f"padding: the tokenizer has no pad token, so batches are padded with its EOS {chosen!r}, as TRL does"
    return f"padding: with {chosen!r} (--pad_token)"


def round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def collate_padded(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Unpacked examples padded to the longest of the batch: input_ids, labels, attention_mask."""
    width = round_up(max(len(example["input_ids"]) for example in examples), pad_to_multiple_of)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for index, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[index, :length] = torch.tensor(example["input_ids"])
        labels[index, :length] = torch.tensor(example["labels"])
        attention_mask[index, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def positions_of(seq_lengths: torch.Tensor) -> torch.Tensor:
    """The position of every token of a row whose sequences have these lengths: 0, 1, ... again in each."""
    starts = torch.cumsum(seq_lengths, 0) - seq_lengths
    return torch.arange(int(seq_lengths.sum())) - torch.repeat_interleave(starts, seq_lengths)


def collate_rows(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Packed rows padded to the longest of the batch, with their boundaries.

    `document_ids` number the sequences of each row (0, 1, ...); the padding at the end of a row
    is one more document of its own, so padded positions attend only to padding and never
    produce an empty (NaN) attention row.
    """
    width = round_up(max(len(row["input_ids"]) for row in rows), pad_to_multiple_of)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "document_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        batch["input_ids"][index, :length] = torch.tensor(row["input_ids"])
        batch["labels"][index, :length] = torch.tensor(row["labels"])
        lengths = torch.tensor(row["seq_lengths"] + [width - length])
        batch["document_ids"][index] = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        batch["position_ids"][index] = positions_of(lengths)
    batch["seq_lengths"] = [row["seq_lengths"] for row in rows]
    return batch


def padding_free_row(examples: list[dict]) -> dict:
    """A batch of unpacked examples as one row: packing at batch level, with the same boundaries."""
    return make_row([(example["input_ids"], example["labels"]) for example in examples])


def packed_inputs(batch: dict, model) -> tuple[dict, torch.Tensor]:
    """The keyword arguments of model(...) for a batch of packed rows (collate_rows), and its labels.

    The boundaries take the form the model's attention implementation reads. Flattened implementations
    take the batch's rows laid end to end as one row, so the labels are laid out the same way.
    """
    implementation = model.config._attn_implementation
    if implementation == "sdpa":  # transformers' own sdpa would ignore cu_seq_lens
        raise ValueError("packed rows under sdpa: call use_sdpa_by_example(model) once before the first batch")
    if implementation in FLATTENED:
        flat = flatten_rows(batch)
        return varlen_inputs(flat, batch["seq_lengths"]), flat["labels"]
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    document_ids = batch["document_ids"]
    if implementation == "eager":
        allowed = block_causal_mask(document_ids)
        blocked = torch.finfo(model.dtype).min  # the most negative number: exp() of it is 0
        inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, blocked)
    elif implementation == "flex_attention":
        inputs["attention_mask"] = flex_block_mask(document_ids)
    else:
        raise ValueError(
            f"minisft does not know how to keep packed examples apart with attn_implementation="
            f"{implementation!r}; use one of {', '.join(SUPPORTED)}."
        )
    return inputs, batch["labels"]


def varlen_inputs(flat: dict, seq_lengths: list[list[int]]) -> dict:
    """One flattened row (flatten_rows) and where its examples start (cu_seq_lens), for sdpa_by_example and
    flash varlen, which both take a single row."""
    lengths = [length for row in seq_lengths for length in row]
    counts = torch.tensor(lengths, dtype=torch.int32, device=flat["input_ids"].device)
    cumulative = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
    longest = max(lengths)  # from the list: reading it off the device tensor would wait for the GPU
    ends = {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}
    return {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"], **ends}


def flatten_rows(batch: dict) -> dict:
    """The rows of a packed batch, padding removed, laid end to end as one row."""
    return {key: laid_flat(batch[key], batch["seq_lengths"]) for key in ("input_ids", "labels", "position_ids")}


def laid_flat(rows: torch.Tensor, seq_lengths: list[list[int]]) -> torch.Tensor:
    return torch.cat([row[: sum(lengths)] for row, lengths in zip(rows, seq_lengths)])[None]


def collate(
    units: list[dict], model, pad_token_id: int, padding_free: bool, pad_to_multiple_of: int | None,
    device: torch.device, boundaries: bool = True, per_sample: bool = False,
) -> dict:  # fmt: skip
    """A micro-batch as model inputs, labels and loss weights (None: all 1), boundaries included for packed or
    padding-free rows. per_sample: --loss_normalization sample."""
    omegas = loss_weights(units, per_sample)  # of the examples as they are, whatever the attention sees of them
    if "seq_lengths" in units[0] or padding_free:
        rows = units if "seq_lengths" in units[0] else [padding_free_row(units)]
        if omegas is not None and rows is not units:
            omegas = [torch.cat(omegas)]
        if not boundaries:  # each row one sequence: one causal mask over it all, positions running on (attention.py)
            rows = [{**row, "seq_lengths": [sum(row["seq_lengths"])]} for row in rows]
        batch = on_device(collate_rows(rows, pad_token_id, pad_to_multiple_of), device)
        inputs, labels = packed_inputs(batch, model)
        return {"inputs": inputs, "labels": labels, "weights": omegas and laid_out(omegas, batch, labels)}
    batch = on_device(collate_padded(units, pad_token_id, pad_to_multiple_of), device)
    return {
        "inputs": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        "labels": batch["labels"],
        "weights": omegas and laid_out(omegas, batch, batch["labels"]),
    }


def loss_weights(units: list[dict], per_sample: bool) -> list[torch.Tensor] | None:
    """ω of each label of each unit (an example or a packed row): its sequence's weight (1 if it has none), under
    per-sample normalisation divided by the sequence's trained tokens; 0 where nothing is trained. None where every
    ω would be 1 (no weights, token normalisation): the plain loss."""
    if not per_sample and not any("weight" in unit or "weights" in unit for unit in units):
        return None
    omegas = []
    for unit in units:  # in numpy: from a list of labels, 6× faster than torch.tensor
        lengths = np.asarray(unit.get("seq_lengths", [len(unit["labels"])]))
        weights = np.asarray(unit.get("weights") or [unit.get("weight", 1.0)] * len(lengths), np.float64)
        trained = np.asarray(unit["labels"]) != IGNORE_INDEX
        trained[0] = False  # not a target (nor is any sequence's first in a row: boundary_labels made it -100)
        if per_sample:
            weights = weights / np.maximum(np.add.reduceat(trained, np.cumsum(lengths) - lengths, dtype=np.int64), 1)
        omegas.append(torch.from_numpy(np.repeat(weights, lengths) * trained))
    return omegas


def laid_out(omegas: list[torch.Tensor], batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """The units' ω as float32 in the shape of `labels`: padded with 0 like the batch, and laid flat if it is."""
    width = batch["labels"].shape[-1]
    weights = torch.stack([F.pad(omega, (0, width - len(omega))) for omega in omegas]).float().to(labels.device)
    return weights if weights.shape == labels.shape else laid_flat(weights, batch["seq_lengths"])


def count_weighted_tokens(units: list[dict], per_sample: bool) -> tuple[int, float]:
    """The trained tokens of these units and Σ ω over them (the same number where every ω is 1), counted before
    collating: the step's loss is divided by the second (loss.py)."""
    tokens, omegas = count_trained_tokens_of(units), loss_weights(units, per_sample)
    return tokens, tokens if omegas is None else sum(float(omega.sum()) for omega in omegas)


def on_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors moved to the device; its other values (seq_lengths) as they are."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
