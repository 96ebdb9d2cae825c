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
   them: no logits are stored for the backward pass and none are recomputed. That fusion is a
   speed trick; `plain_losses` below is the same loss as the formula reads, and evaluation
   (no gradients wanted) uses it.

W is the head as one matrix (head_matrix): with LoRA on the head, W + (α/r)·B·A, which is what
its LoraLinear computes when it has no dropout (check_head refuses the rest at setup).

Gradient accumulation: one optimizer step covers several micro-batches. Its loss is

    loss = Σ token losses over all micro-batches / number of trained tokens in all of them

so each micro-batch contributes `sum of its token losses / step's trained tokens`, and the
gradient is the same however the step's examples are split or padded (transformers'
num_items_in_batch fix of 2024). Dividing each micro-batch's mean by the number of
micro-batches would weigh a token of a short micro-batch more than one of a long one.

Weights: in general token t of example e counts ω_t (batches.loss_weights), w_e the example's own
weight (1 if it has none), and the step's loss is Σ ω_t CE_t / Σ ω_t, Σ ω_t counted as the tokens are:

    --loss_normalization token   ω_t = w_e               Σ_e w_e Σ_{t∈e} CE_t / Σ_e w_e |trained(e)|
    --loss_normalization sample  ω_t = w_e / |trained(e)|  Σ_e w_e · mean_{t∈e} CE_t / Σ_e w_e

Token: a long answer counts as many times as it has tokens; sample: each example's mean counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisft.errors import UserError

from .labels import IGNORE_INDEX
from .lora import LoraLinear

# Tokens per chunk of the head: a chunk's fp32 logits are chunk × vocabulary × 4 B (50 MB at 256 for SmolLM2).
# Larger chunks mean fewer, larger matmuls, which a GPU prefers; on a CPU whole training steps ran fastest at 256
# (benchmarks/RESULTS.md, "The loss's chunk size").
CHUNK_TOKENS = {"cpu": 256, "cuda": 1024}
# The plain loss (evaluation) does not touch the head's gradient, which the fused one reads and writes once per
# chunk, so on a CPU it takes smaller chunks: 64 tokens' logits (12.6 MB for SmolLM2) stay under glibc's 32 MB
# ceiling for heap allocations, so each chunk's temporaries reuse the last one's memory instead of being mapped
# and faulted in afresh (faster per token; the figures are in benchmarks/RESULTS.md).
PLAIN_CHUNK_TOKENS = {"cpu": 64, "cuda": 1024}


@dataclass
class TokenLosses:
    loss_sum: torch.Tensor  # Σ cross-entropy over the trained tokens (carries the graph)
    tokens: int  # how many trained tokens
    correct: int  # how many the model ranked first
    entropy_sum: float  # Σ entropy of the predicted distribution, in nats


def token_losses(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.Tensor, softcap: float | None = None,
    chunk_tokens: int | None = None, weights: torch.Tensor | None = None,
) -> TokenLosses:  # fmt: skip
    """The loss of the trained positions, from the backbone's last hidden states and the head's matrix.

    hidden (..., tokens, hidden) and labels (..., tokens) as the model and collator give them; head the
    (vocabulary × hidden) output matrix (head_matrix below folds a LoRA update into it); softcap Gemma 2's
    final_logit_softcapping, if the model has one; weights each position's ω (None: 1). With gradients
    wanted, the fused chunked function below; without (evaluation), the plain formula, which would waste
    nothing on gradients. loss_sum is Σ ω_t CE_t; the metrics count every token once.
    """
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[..., :-1, :][keep], targets[keep]
    weights = None if weights is None else weights[..., 1:][keep]
    device = hidden.device.type
    # Filled by the forward (correct, entropy sum) on the device, and read once: one host sync per micro-batch.
    metrics = torch.zeros(2, dtype=torch.float64, device=hidden.device)
    if torch.is_grad_enabled():
        chunk_tokens = chunk_tokens or CHUNK_TOKENS.get(device, CHUNK_TOKENS["cuda"])
        loss_sum = ChunkedLinearCrossEntropy.apply(hidden, head, targets, softcap, chunk_tokens, metrics, weights)
    else:
        chunk_tokens = chunk_tokens or PLAIN_CHUNK_TOKENS.get(device, PLAIN_CHUNK_TOKENS["cuda"])
        loss_sum = plain_losses(hidden, head, targets, softcap, chunk_tokens, metrics, weights)
    correct, entropy_sum = metrics.tolist()
    return TokenLosses(loss_sum, int(targets.numel()), int(correct), entropy_sum)


def plain_losses(hidden, weight, targets, softcap, chunk_tokens: int, metrics, omegas=None) -> torch.Tensor:
    """Σ ω·CE(h Wᵀ, targets) as the formula reads (ω: omegas, or 1), by chunks; `metrics` gains (correct, Σ entropy).

    CE(z, t) = −log softmax(z)[t]          entropy(z) = −Σ softmax(z) · log softmax(z)
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.numel(), chunk_tokens):
        chunk, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        logits = (chunk @ weight.to(chunk.dtype).T).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        log_probabilities = torch.log_softmax(logits, dim=-1)
        losses = F.nll_loss(log_probabilities, chunk_targets, reduction="sum" if omegas is None else "none")
        loss_sum += losses if omegas is None else (losses * omegas[start : start + chunk_tokens]).sum()
        metrics[0] += (logits.argmax(dim=-1) == chunk_targets).sum()
        metrics[1] += -(log_probabilities.exp() * log_probabilities).sum()
    return loss_sum


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(h Wᵀ, targets), computed chunk by chunk with its gradients (module docstring).

    Per chunk, the logits z are read a few times and never copied: softmax(z) is one fused pass and
    becomes the gradient in place, and the rest comes from small per-token reductions of it,

        log Σ exp(z) = max z − log softmax(z)[argmax]     (that probability is ≥ 1/vocab: no underflow)
        CE           = log Σ exp(z) − z[target]
        entropy      = log Σ exp(z) − Σ softmax(z) · z

    The metrics (correct, entropy) stay on the device until the caller reads them once. With a
    frozen head (LoRA), the head's gradient is not computed at all.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_tokens, metrics, omegas=None):
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        matrix = weight.to(hidden.dtype)
        # Accumulating the head's gradient in place avoids a vocabulary × hidden temporary per chunk; under
        # autocast the product must stay an autocast matmul (bf16 on a GPU), so it is added as before.
        accumulate_in_place = hidden.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
        for start in range(0, targets.numel(), chunk_tokens):
            chunk, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            raw = (chunk @ matrix.T).float()
            logits = torch.tanh(raw / softcap) * softcap if softcap else raw
            top, predicted = logits.max(dim=-1)
            probabilities = torch.softmax(logits, dim=-1)
            log_normaliser = top - probabilities.gather(1, predicted[:, None]).squeeze(1).log()
            losses = log_normaliser - logits.gather(1, chunk_targets[:, None]).squeeze(1)
            chunk_omegas = None if omegas is None else omegas[start : start + chunk_tokens]
            loss_sum += (losses if chunk_omegas is None else losses * chunk_omegas).sum()
            with torch.autocast(hidden.device.type, enabled=False):  # an fp32 metric, not a bf16 matmul
                expected_logit = torch.bmm(probabilities[:, None, :], logits[:, :, None]).view(-1)
            metrics[0] += (predicted == chunk_targets).sum()
            metrics[1] += (log_normaliser - expected_logit).sum()
            grad_logits = probabilities
            grad_logits[torch.arange(len(chunk_targets), device=hidden.device), chunk_targets] -= 1.0
            if softcap:
                grad_logits *= 1 - (logits / softcap) ** 2  # d/dz [c · tanh(z / c)] = 1 − tanh²
            if chunk_omegas is not None:
                grad_logits *= chunk_omegas[:, None]  # ∂(ω CE)/∂z = ω (softmax(z) − onehot)
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start : start + chunk_tokens] = (grad_logits @ matrix).float()
            if grad_weight is None:
                continue
            if accumulate_in_place:
                grad_weight.addmm_(grad_logits.T, chunk)
            else:
                grad_weight += (grad_logits.T @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_hidden * grad_output).to(hidden_dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


# ----------------------------------------------------------------------------- the output head, as one matrix


def check_head(model) -> None:
    """What head_matrix assumes, checked once when the run is set up rather than on every micro-batch."""
    head = model.get_output_embeddings()
    if isinstance(head, LoraLinear) and (
        not isinstance(head.dropout, nn.Identity) or head.lora_magnitude_vector is not None
    ):
        raise UserError(
            "LoRA on the output head needs --lora_dropout 0 and no --use_dora: the loss folds its update into the "
            "head's matrix."
        )
    if getattr(head, "bias", None) is not None:
        raise UserError("minisft's loss assumes an output head without bias, as in the models it supports.")


def head_matrix(model) -> torch.Tensor:
    """The output head as one matrix (vocabulary × hidden) for token_losses, a LoRA update folded into it.

    W + (α/r)·B·A is exactly what a LoraLinear head computes without dropout (see check_head), and it
    lets the loss run the head chunk by chunk on the trained positions only.
    """
    head = model.get_output_embeddings()
    if isinstance(head, LoraLinear):
        return head.base.weight + head.delta_weight().to(head.base.weight.dtype)
    return head.weight
