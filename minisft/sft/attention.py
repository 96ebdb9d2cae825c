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

Each attention implementation takes the boundaries in its own form (batches.py hands each its own):
- sdpa               one causal sdpa call per example (sdpa_by_example below), given where the
                     examples start in one flattened row: cu_seq_lens = [0, 3, 5, 7] above.
- eager              the dense mask above, one per row: (batch, 1, length, length), additive
                     (0 / -inf), which eager adds to the scores.
- flex_attention     a BlockMask built from the same rule; blocks that are all masked are
                     skipped, so the cost follows the real example lengths.
- flash_attention_*  the varlen kernels take the same cu_seq_lens of one flattened row.

Why sdpa is not handed the dense mask: with a mask, sdpa computes every query × key block of
the row, L² per row whatever the examples' lengths; run per example with is_causal it computes
Σ n²/2 over the examples. For a 1024-token row of six examples of ~170 tokens that is about a
tenth of the work: on SmolLM2-135M on a CPU the dense mask's attention was 23% of a step, and
per example 7% (benchmarks/RESULTS.md).

Positions restart at 0 in every example (position_ids), so rotary embeddings match an
example run alone. With both, each example's logits equal those of the example alone.

Without them (--neat_packing false, to see what they are for) batches.collate makes each row one
sequence: one causal mask over the row, positions running on, as TRL's wrapped packing and
LLaMA-Factory's packing without neat_packing. Not restarted positions with crossing attention:
given those and no mask, transformers infers the boundaries back. The labels stay the same.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
SUPPORTED = ("sdpa", "eager", "flex_attention", *FLASH_IMPLEMENTATIONS)
SDPA_BY_EXAMPLE = "sdpa_by_example"
# Implementations whose packed rows are laid end to end as one row (labels too: batches.flatten_rows).
FLATTENED = (SDPA_BY_EXAMPLE, *FLASH_IMPLEMENTATIONS)


# Kept out of torch.compile (--torch_compile): a new count of examples in a row would be a new graph.
@torch.compiler.disable
def sdpa_by_example(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa, run once per example of a flattened packed row, each a plain causal attention.

    query, key, value: (1, heads, tokens, head_dim) of the whole flattened row. Without cu_seq_lens_q
    (padded batches, generation) it is transformers' sdpa unchanged, with the mask transformers built.
    """
    starts = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = starts.diff().tolist()
    # split, not slicing: the backward of a split is one concatenation, that of each slice a zero-filled full copy.
    pieces = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    outputs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v in pieces]
    return torch.cat(outputs, dim=1), None  # (1, tokens, heads, head_dim), as transformers' sdpa returns


def use_sdpa_by_example(model) -> None:
    """Switch a model loaded with attn_implementation="sdpa" to sdpa_by_example (same results, less work packed).

    Registered under its own name when first asked for, so transformers' "sdpa" stays as it is for
    every other model in the process. The masks transformers builds for it are sdpa's; a packed row's
    mask goes unused (the examples are cut apart).
    """
    AttentionInterface.register(SDPA_BY_EXAMPLE, sdpa_by_example)
    AttentionMaskInterface.register(SDPA_BY_EXAMPLE, sdpa_mask)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(SDPA_BY_EXAMPLE)


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
