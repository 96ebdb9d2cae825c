"""Attention boundaries: in a packed row, a token sees only the earlier tokens of its own example.

A plain causal mask lets every token attend to everything before it in the row, including the
examples packed ahead of it. The mask must be block-diagonal instead, one causal block per
example (here a row holding examples of 3, 2 and 2 tokens):

        k →  a a a b b c c
    q  a     1 . . . . . .
    ↓  a     1 1 . . . . .
       a     1 1 1 . . . .
       b     . . . 1 . . .
       b     . . . 1 1 . .
       c     . . . . . 1 .
       c     . . . . . 1 1

    allowed(q, k) = document(q) == document(k) and k <= q

Each attention implementation takes the boundaries in its own form:
- sdpa, eager        the dense mask above, one per row: (batch, 1, length, length); boolean for
                     sdpa, additive (0 / -inf) for eager, which adds it to the scores.
- flex_attention     a BlockMask built from the same rule; blocks that are all masked are
                     skipped, so the cost follows the real example lengths.
- flash_attention_*  the varlen kernels take cumulative sequence lengths (cu_seqlens) of one
                     flattened row, derived from position_ids.
Positions restart at 0 in every example (position_ids), so rotary embeddings match an
example run alone. With both, each example's logits equal those of the example alone.
"""

from __future__ import annotations

import torch

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
SUPPORTED = ("sdpa", "eager", "flex_attention", *FLASH_IMPLEMENTATIONS)


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, length, length) boolean: True where a query may attend to a key."""
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return (same_document & causal)[:, None]


def flex_block_mask(document_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(batch, head, query, key):
        return (document_ids[batch, query] == document_ids[batch, key]) & (key <= query)

    batch, length = document_ids.shape
    return create_block_mask(allowed, batch, None, length, length, device=document_ids.device)


def packed_model_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """The keyword arguments of model(...) for a batch of packed rows (packing.collate_rows)."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    document_ids = batch["document_ids"]
    if attn_implementation == "sdpa":
        inputs["attention_mask"] = block_causal_mask(document_ids)
    elif attn_implementation == "eager":
        allowed = block_causal_mask(document_ids)
        inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    elif attn_implementation == "flex_attention":
        inputs["attention_mask"] = flex_block_mask(document_ids)
    elif attn_implementation in FLASH_IMPLEMENTATIONS:
        inputs.update(flash_varlen_inputs(batch))
    else:
        raise ValueError(
            f"minisft does not know how to keep packed examples apart with attn_implementation="
            f"{attn_implementation!r}; use one of {', '.join(SUPPORTED)}."
        )
    return inputs


def flash_varlen_inputs(batch: dict) -> dict:
    """One flattened row and its cumulative sequence lengths, for the flash varlen kernels.

    The kernels take a single row, so the rows of the batch (without their padding) are laid
    end to end; the caller flattens labels the same way (see flatten_rows).
    """
    flat = flatten_rows(batch)
    lengths = torch.tensor([length for row in batch["seq_lengths"] for length in row], dtype=torch.int32)
    cumulative = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    return {
        "input_ids": flat["input_ids"],
        "position_ids": flat["position_ids"],
        "cu_seq_lens_q": cumulative,
        "cu_seq_lens_k": cumulative,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def flatten_rows(batch: dict) -> dict:
    """The rows of a packed batch, padding removed, laid end to end as one row."""
    real = [sum(lengths) for lengths in batch["seq_lengths"]]
    return {
        key: torch.cat([batch[key][index, :length] for index, length in enumerate(real)])[None]
        for key in ("input_ids", "labels", "position_ids")
    }
