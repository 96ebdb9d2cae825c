"""The fused chunked head + cross-entropy (minisft/sft/loss.py) against plain autograd over the full logits.

The fused function computes the loss, its gradients, the accuracy and the entropy without keeping the logits;
the reference builds every logit and lets autograd differentiate F.cross_entropy. They must agree to float32
rounding, for every chunking (a chunk boundary inside the tokens, one chunk, one token per chunk), with a
final-logit softcap (Gemma 2), and with a frozen head (LoRA), where no head gradient may be computed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minisft.sft.loss import ChunkedLinearCrossEntropy, plain_losses, token_losses


def reference(hidden, weight, targets, softcap):
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    log_probs = torch.log_softmax(logits, dim=-1)
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = int((logits.argmax(dim=-1) == targets).sum())
    entropy = float(-(log_probs.exp() * log_probs).sum().detach())
    return loss_sum, correct, entropy


# The fused function and the reference do the same maths in other orders (per chunk, softmax then gathers, against
# log_softmax of all logits; the head's gradient summed chunk by chunk), so they agree to float32 rounding, measured
# over every case below (1 and 2 threads): the loss (Σ of 37 token losses, ~161) 9.5e-8 relative, each gradient
# 2.2e-7 in max|a-b|/max|b| (the reference itself is 5.2e-7 from float64), the entropy 2.8e-8 relative. The bounds
# are ~10× and ~20× those. Leaving the softcap's derivative out moves the hidden gradient by 0.78, dropping a chunk of
# 8 tokens moves the head's gradient by 0.55 (measured), far beyond.
LOSS_RTOL = 1e-6
GRADIENT_RTOL = 5e-6
ENTROPY_RTOL = 1e-6


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    """max |a - b| / max |b| ≤ bound: elementwise rtol/atol would judge a near-zero entry by the absolute part only."""
    difference = float((actual - expected).abs().max() / expected.abs().max())
    assert difference <= bound, difference


def inputs(tokens=37, hidden_size=16, vocab=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64).float()
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.5
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    # Make some predictions right, so the accuracy is not trivially zero.
    targets[::3] = (hidden[::3] @ weight.T).argmax(dim=-1)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 1024])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_loss_gradients_and_metrics_equal_autograd(chunk_tokens, softcap):
    hidden, weight, targets = inputs()
    ours_hidden, ours_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    metrics = torch.zeros(2, dtype=torch.float64)
    loss = ChunkedLinearCrossEntropy.apply(ours_hidden, ours_weight, targets, softcap, chunk_tokens, metrics)
    (loss * 0.5).backward()  # a scale on the way back, as the loop divides by the step's trained tokens

    their_hidden, their_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected_loss, correct, entropy = reference(their_hidden, their_weight, targets, softcap)
    (expected_loss * 0.5).backward()

    torch.testing.assert_close(loss, expected_loss, rtol=LOSS_RTOL, atol=0)
    assert_relatively_close(ours_hidden.grad, their_hidden.grad, GRADIENT_RTOL)
    assert_relatively_close(ours_weight.grad, their_weight.grad, GRADIENT_RTOL)
    assert int(metrics[0]) == correct > 0
    assert float(metrics[1]) == pytest.approx(entropy, rel=ENTROPY_RTOL)


def test_frozen_head_gets_no_gradient():
    hidden, weight, targets = inputs()
    hidden.requires_grad_()
    metrics = torch.zeros(2, dtype=torch.float64)
    ChunkedLinearCrossEntropy.apply(hidden, weight, targets, None, 8, metrics).backward()
    their_hidden = hidden.detach().clone().requires_grad_()
    reference(their_hidden, weight, targets, None)[0].backward()
    assert_relatively_close(hidden.grad, their_hidden.grad, GRADIENT_RTOL)  # measured 9.2e-8
    assert weight.grad is None


@pytest.mark.parametrize("chunk_tokens", [8, 1024])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_plain_formula_gives_the_same_sums(chunk_tokens, softcap):
    """plain_losses (what evaluation runs) against the unchunked reference: the same maths summed in chunks."""
    hidden, weight, targets = inputs()
    metrics = torch.zeros(2, dtype=torch.float64)
    loss = plain_losses(hidden, weight, targets, softcap, chunk_tokens, metrics)
    expected_loss, correct, entropy = reference(hidden, weight, targets, softcap)
    torch.testing.assert_close(loss, expected_loss, rtol=LOSS_RTOL, atol=0)
    assert int(metrics[0]) == correct > 0
    assert float(metrics[1]) == pytest.approx(entropy, rel=ENTROPY_RTOL)


def test_evaluation_computes_no_head_gradient(monkeypatch):
    """Under no_grad the fused function (which computes the gradients in its forward) is not called at all."""
    hidden, weight, targets = inputs()
    labels = torch.cat([torch.tensor([-100]), targets])[None]
    with_gradients = token_losses(torch.cat([hidden, hidden[:1]])[None], labels, weight, chunk_tokens=8)

    def refuse(*args):
        raise AssertionError("the fused loss ran under no_grad")

    monkeypatch.setattr(ChunkedLinearCrossEntropy, "apply", refuse)
    with torch.no_grad():
        without = token_losses(torch.cat([hidden, hidden[:1]])[None], labels, weight, chunk_tokens=8)
    torch.testing.assert_close(without.loss_sum, with_gradients.loss_sum.detach(), rtol=LOSS_RTOL, atol=0)
    assert (without.tokens, without.correct) == (with_gradients.tokens, with_gradients.correct)
