"""The loss: cross-entropy of each trained token, without building the whole batch's logits.

A causal LM predicts token t+1 from positions ≤ t, so the targets are the labels shifted by one:

    hidden   h0  h1  h2  h3        target of h_t = labels[t+1];  -100 → not a target
    labels   --  l1  l2  l3

The vocabulary head is the largest tensor of a small model: for SmolLM2, 49,152 logits per
token, 200 KB in fp32. So:
1. positions whose target is -100 (prompt, padding, example starts) are dropped *before*
   the head, not after: their logits are never computed;
2. the rest go through the head in chunks, each upcast to fp32 on its own and recomputed in
   the backward pass (activation checkpointing), so at most one chunk of logits is alive.

Gradient accumulation: one optimizer step covers several micro-batches. Its loss is

    loss = Σ token losses over all micro-batches / number of trained tokens in all of them

so each micro-batch contributes `sum of its token losses / step's trained tokens`, and the
gradient is the same however the step's examples are split or padded (transformers'
num_items_in_batch fix of 2024). Dividing each micro-batch's mean by the number of
micro-batches would weigh a token of a short micro-batch more than one of a long one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .masking import IGNORE_INDEX

CHUNK_TOKENS = 1024


@dataclass
class TokenLosses:
    loss_sum: torch.Tensor  # Σ cross-entropy over the trained tokens (carries the graph)
    tokens: int  # how many trained tokens
    correct: int  # how many the model ranked first
    entropy_sum: float  # Σ entropy of the predicted distribution, in nats


def count_trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def causal_lm_losses(model, inputs: dict, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> TokenLosses:
    """Run the model's backbone, then its head on the trained positions only, chunk by chunk."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[..., :-1, :][keep], targets[keep]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    correct, entropy_sum = 0, 0.0
    for start in range(0, targets.numel(), chunk_tokens):
        chunk_loss, chunk_correct, chunk_entropy = checkpoint(
            _chunk_loss,
            head,
            hidden[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            softcap,
            use_reentrant=False,
        )
        loss_sum = loss_sum + chunk_loss
        correct += int(chunk_correct)
        entropy_sum += float(chunk_entropy)
    return TokenLosses(loss_sum, int(targets.numel()), correct, entropy_sum)


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, dim=-1)
        correct = (logits.argmax(dim=-1) == targets).sum()
        entropy = -(log_probs.exp() * log_probs).sum()
    return loss, correct, entropy
