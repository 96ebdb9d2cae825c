"""One optimizer step: forward, loss and backward over the step's micro-batches, then clip and step.

    for units in micro_batches:                    (gradient_accumulation_steps of them)
        batch  = collate(units)                    just before its forward: memory stays flat with accumulation
        hidden = backbone(batch)                   the last hidden states; the head runs inside the loss
        loss   = Σ token losses of batch / step_tokens                          (loss.py)
        loss.backward()                            the gradients add up to the whole step's
    clip the gradient's total norm to max_grad_norm
    optimizer.step(); schedule.step(); optimizer.zero_grad()

step_tokens counts the trained tokens of the whole step, from the label lists before any
collating (labels.py), so the step's loss is Σ token losses / trained tokens however its
examples are cut into micro-batches, and so is its gradient. With weights (or per-sample
normalisation) it is Σ ω over those tokens instead (batches.count_weighted_tokens; loss.py). A loss or
gradient norm that is not finite stops the step before anything is applied (NonFiniteStep).

Evaluation is the same forward without gradients, over the whole eval split, every token counted
once whatever the weights or normalisation (as transformers evaluates):

    eval_loss = Σ token losses / trained tokens          (and token accuracy and entropy, per token)

Both run in one process by default. The training loop (minisft/machinery/loop.py) passes its data
parallelism as `parallel` (machinery/distributed.py's DataParallel); anything that has these will do:

    gradient_scale   N: DDP and FSDP average the N processes' gradients, × N turns that into the sum
    sync(last=...)   a context manager: gradients are communicated only after the step's last micro-batch
    sum(values)      the element-wise sums of a list of numbers over all processes
    backbone         the forward pass to the last hidden states (the model's own, or DDP- or FSDP-wrapped)
    mine(batches)    this process's share of a list of batches, as (batch, weight) pairs; weight 0: a repeat
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from .loss import TokenLosses, head_matrix, token_losses


class NonFiniteStep(ArithmeticError):
    """The step's loss or gradient norm is not finite (and not fp16's overflow, which the scaler handles)."""


def train_step(
    model, micro_batches: list[list[dict]], step_tokens: float, collate: Callable[[list[dict]], dict], optimizer,
    schedule, max_grad_norm: float, *, weights: list[float] | None = None, parallel=None,
    scaler: torch.amp.GradScaler | None = None, autocast=nullcontext, passes=nullcontext,
) -> tuple[float, float, float, float]:  # fmt: skip
    """One optimizer step over its micro-batches (each a list of units), as the module docstring draws it.

    Returns the step's loss (Σ token losses / step_tokens), the correct predictions, the entropy sum and the
    gradient norm. A loss or norm that is not finite raises NonFiniteStep, nothing applied.

    The keywords default to one process, no fp16 scaler and no autocast; the loop passes its own:
      weights, parallel  data parallelism (module docstring): this process's share of the step, whose
                         step_tokens and returned figures are every process's together
      scaler             fp16's GradScaler: the loss scaled up for backward, the gradients unscaled before
                         clipping; a step whose gradients overflowed is skipped (norm inf), not raised
      autocast           the forward's mixed precision (the loop's mixed_precision)
      passes             wraps the forward and backward passes (the loop's: a second Ctrl-C may cut them short)
    """
    # Under torchrun a weight of 0 marks a padding micro-batch: at an epoch's end a process short of data repeats
    # one, so that its passes keep in step with the other processes' (DataParallel.mine); it adds nothing.
    weights = weights or [1] * len(micro_batches)
    # DDP and FSDP average the N processes' gradients: × N turns the average into the sum the loss is.
    scale = (parallel.gradient_scale if parallel else 1) / max(step_tokens, 1)
    model.train()
    figures = torch.zeros(3, dtype=torch.float64)  # this process's loss sum, correct predictions, entropy sum
    with passes():
        for index, (units, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            batch = collate(units)
            # Under torchrun the gradients are communicated once, after the step's last micro-batch.
            sync = parallel.sync(last=index == len(micro_batches) - 1) if parallel else nullcontext()
            with sync, autocast():
                losses = model_losses(model, batch, parallel)
            loss = losses.loss_sum * (scale * weight)
            (scaler.scale(loss) if scaler else loss).backward()
            if weight:
                figures += torch.tensor([float(losses.loss_sum.detach()), losses.correct, losses.entropy_sum])
    loss_sum, correct, entropy = parallel.sum(figures.tolist()) if parallel else figures.tolist()
    step_loss = loss_sum / max(step_tokens, 1)
    if scaler:
        scaler.unscale_(optimizer)  # the true gradients, before they are clipped
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else math.inf)
    # Under FSDP the norm comes back as a distributed tensor (a DTensor): its full_tensor is the number.
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    overflowed = bool(scaler and scaler.is_enabled()) and math.isfinite(step_loss) and not math.isfinite(grad_norm)
    if not overflowed and not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        raise NonFiniteStep(f"loss {step_loss}, gradient norm {grad_norm}")
    if scaler:
        scaler.step(optimizer)  # optimizer.step(), unless fp16's gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, correct, entropy, grad_norm


def model_losses(model, batch: dict, parallel=None) -> TokenLosses:
    """The forward pass to the last hidden states, then the loss: the head runs inside it (loss.py).

    One process runs the model's own backbone; under torchrun, parallel's DDP- or FSDP-wrapped one."""
    backbone = parallel.backbone if parallel else model.base_model
    hidden = backbone(**batch["inputs"], use_cache=False).last_hidden_state
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return token_losses(hidden, batch["labels"], head_matrix(model), softcap, weights=batch.get("weights"))


@torch.no_grad()
def evaluate(
    model, eval_units: Sequence[dict], collate: Callable[[list[dict]], dict], batch_size: int, *,
    parallel=None, autocast=nullcontext,
) -> dict:  # fmt: skip
    """eval_loss = Σ token losses / trained tokens over the whole eval split, and TRL's other eval figures,
    token accuracy and entropy, per token of the split (TRL averages them per batch).

    No gradients: the loss is the plain formula (loss.plain_losses), not the fused one that computes them.
    One process by default, as train_step; under torchrun (`parallel`) each process takes every world_size-th
    batch, a weight-0 repeat evening out the last ones (parallel.mine), and the figures are summed over all.
    """
    model.eval()
    starts = range(0, len(eval_units), batch_size)
    batches = [list(range(start, min(start + batch_size, len(eval_units)))) for start in starts]
    shares = parallel.mine(batches) if parallel else [(indices, 1.0) for indices in batches]
    figures = torch.zeros(4, dtype=torch.float64)  # this process's loss sum, trained tokens, correct, entropy sum
    for indices, weight in shares:
        with autocast():
            losses = model_losses(model, {**collate([eval_units[i] for i in indices]), "weights": None}, parallel)
        figures += weight * torch.tensor([float(losses.loss_sum), losses.tokens, losses.correct, losses.entropy_sum])
    loss_sum, tokens, correct, entropy_sum = parallel.sum(figures.tolist()) if parallel else figures.tolist()
    tokens = max(tokens, 1)
    return {
        "eval_loss": loss_sum / tokens,
        "eval_mean_token_accuracy": correct / tokens,
        "eval_entropy": entropy_sum / tokens,
    }
