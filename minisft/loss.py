"""The loss: cross-entropy of each trained token, without building the whole batch's logits.

A causal LM predicts token t+1 from positions ≤ t, so the targets are the labels shifted by one:

    hidden   h0  h1  h2  h3        target of h_t = labels[t+1];  -100 → not a target
    labels   --  l1  l2  l3

The vocabulary head is the largest tensor of a small model: for SmolLM2, 49,152 logits per
token, 200 KB in fp32. So:
1. positions whose target is -100 (prompt, padding, example starts) are dropped *before*
   the head: their logits are never computed;
2. the rest go through the head in chunks. Each chunk's fp32 logits live only long enough to
   give the loss and, at once, its gradient. For z = h Wᵀ and loss = Σ CE(z, target):

        ∂loss/∂z = softmax(z) − onehot(target)       (one row per token)
        ∂loss/∂h = (∂loss/∂z) W          ∂loss/∂W = (∂loss/∂z)ᵀ h

   Those two are kept (as big as h and W), the logits are freed, and backward() only scales
   them: no logits are stored for the backward pass and none are recomputed.

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
from torch import nn

from .errors import UserError
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
    """Run the model's backbone, then the head on the trained positions only (see the module docstring)."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[..., :-1, :][keep], targets[keep]
    weight = head_weight(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    metrics = torch.zeros(2, dtype=torch.float64)  # filled by the forward: correct, entropy sum
    loss_sum = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk_tokens, metrics)
    return TokenLosses(loss_sum, int(targets.numel()), int(metrics[0]), float(metrics[1]))


def head_weight(model) -> torch.Tensor:
    """The output head as one matrix (vocabulary × hidden), LoRA on the head merged into it."""
    from .lora import LoraLinear

    head = model.get_output_embeddings()
    if isinstance(head, LoraLinear):
        if not isinstance(head.dropout, nn.Identity):
            raise UserError("LoRA on the output head needs --lora_dropout 0 (its update is folded into the head).")
        return head.base.weight + head.delta_weight().to(head.base.weight.dtype)
    if getattr(head, "bias", None) is not None:
        raise UserError("minisft's loss assumes an output head without bias, as in the models it supports.")
    return head.weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(h Wᵀ, targets), computed chunk by chunk with its gradients (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_tokens, metrics):
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        matrix = weight.to(hidden.dtype)
        for start in range(0, targets.numel(), chunk_tokens):
            chunk, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            raw = (chunk @ matrix.T).float()
            logits = torch.tanh(raw / softcap) * softcap if softcap else raw
            log_probs = torch.log_softmax(logits, dim=-1)
            picked = log_probs.gather(1, chunk_targets[:, None]).squeeze(1)
            loss_sum -= picked.sum()
            probabilities = log_probs.exp()
            metrics[0] += int((logits.argmax(dim=-1) == chunk_targets).sum())
            metrics[1] += float(-(probabilities * log_probs).sum())
            grad_logits = probabilities
            grad_logits[torch.arange(len(chunk_targets), device=hidden.device), chunk_targets] -= 1.0
            if softcap:
                grad_logits *= 1 - (logits / softcap) ** 2  # d/dz [c · tanh(z / c)] = 1 − tanh²
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start : start + chunk_tokens] = (grad_logits @ matrix).float()
            grad_weight += (grad_logits.T @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grads = (grad_hidden * grad_output).to(hidden_dtype), (grad_weight * grad_output).to(weight_dtype)
        return *grads, None, None, None, None
