"""The optimizer and the learning-rate schedule.

AdamW keeps two running averages per weight, m (the gradient's mean) and v (its square's), and
moves each weight by lr · m̂ / (√v̂ + ε), then shrinks it by lr · weight_decay. Weight decay pulls
matrices toward zero; it is not applied to biases and norm weights, whose scale is their job
(transformers' rule, matched here). The other optimizers change what is stored per weight:

    adamw_torch_fused, adamw_torch   m and v in 32 bits (both names: one fused kernel for all the tensors)
    adamw_8bit, paged_adamw_8bit     m and v in 8 bits, block by block with one scale per block (bitsandbytes):
                                     a quarter of the memory, nearly the same steps
    paged_adamw_32bit                m and v in 32 bits, in memory the GPU pages out to the CPU when it runs short
    adafactor                        for an n × m matrix, only the n row and m column means of the squared
                                     gradient (their outer product estimates v) and no m: n + m numbers, not 2nm

Under an 8-bit optimizer, embeddings keep 32-bit state, as in transformers.

The learning rate rises linearly from 0 during warmup, then follows the schedule to the end.
With p the progress after warmup (0 → 1) and peak the --learning_rate:

    lr ▲      ╱‾‾‾‾‾╲                      linear:               peak · (1 − p)
       │    ╱         ╲                    cosine:               peak · ½ (1 + cos(2π · num_cycles · p))
       │  ╱             ╲                  cosine_with_min_lr:   the cosine, squeezed to end at min_lr, not 0
       └──┴───────────────╲──▶ step        cosine_with_restarts: num_cycles falls from peak to 0, one after another
         warmup                            polynomial:           lr_end + (peak − lr_end) · (1 − p)^power
                                           constant:             peak, and no warmup
                                           constant_with_warmup: peak

warmup_stable_decay (WSD) holds the peak after warmup for num_stable_steps, then falls to
min_lr_ratio · peak over num_decay_steps: the run can be extended from its stable phase.
Each schedule's settings (num_cycles, min_lr_rate, power, ...) come from --lr_scheduler_kwargs, with
transformers' defaults. The formulas are transformers' get_*_schedule functions, so runs are comparable
with TRL's. minisft/machinery/config.py offers the names below as the flags' choices and runs schedule_options
as the flags are parsed: a bad setting is refused before any data or model is read.
"""

from __future__ import annotations

import json
import math
import re

import torch
from torch import nn

from minisft.errors import UserError

# --optim's choices (machinery/config.py offers them as the flag's).
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor")


class OptimizerError(UserError, ValueError):
    """An optimizer or schedule setting that cannot work here."""


BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}
# transformers' get_decay_parameter_names: names that are never decayed.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and biases and norm weights left alone."""
    decayed, not_decayed, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            # A tied weight (embeddings shared with the head) appears under two modules: count it once.
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full_name = f"{module_name}.{name}" if module_name else name
            if isinstance(module, nn.LayerNorm) or _NO_DECAY.search(full_name.lower()):
                not_decayed.append(parameter)
            else:
                decayed.append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name in ("adamw_torch_fused", "adamw_torch"):
        # fused: one kernel over all the tensors instead of a Python loop per tensor (9× faster on this CPU:
        # benchmarks/RESULTS.md); the same update, up to float rounding. transformers' adamw_torch is the loop;
        # its adamw_torch_fused (its default) is this.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # As transformers' Trainer builds it: the schedule's learning rate, not Adafactor's own relative step,
        # and no scaling by each weight's size. Adafactor has no betas or epsilon in Adam's sense.
        return Adafactor(groups, lr=learning_rate, scale_parameter=False, relative_step=False)
    if name in BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes  # loop.check_flags has made sure it is installed and loads

        if "8bit" in name:
            keep_embedding_state_in_32_bits(model)
        # On a CPU bitsandbytes runs the paged ones unpaged (it warns so): there is no GPU memory to page out.
        optimizer_class = getattr(bitsandbytes.optim, BITSANDBYTES_OPTIMIZERS[name])
        try:
            return optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps)
        except (RuntimeError, NotImplementedError) as error:
            raise OptimizerError(f"--optim {name} is not supported here: {error}. Try --optim adamw_torch.") from error
    raise OptimizerError(f"Unknown --optim {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def keep_embedding_state_in_32_bits(model: nn.Module) -> None:
    """Embedding weights keep 32-bit AdamW state under an 8-bit optimizer, as transformers' Trainer does.

    A step touches only the rows of the tokens in the batch, so an embedding's m and v mix rows
    of very different sizes in each quantization block, and 8 bits round the small ones away.
    bitsandbytes takes such exceptions through a process-wide manager; it is cleared first, so
    no override left by an earlier optimizer in this process applies to this one.
    """
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            manager.register_module_override(module, "weight", {"optim_bits": 32})


# ----------------------------------------------------------------------------- the schedule

# Each schedule's --lr_scheduler_kwargs and their defaults, those of transformers' get_*_schedule functions.
SCHEDULE_KWARGS = {
    "linear": {},
    "cosine": {"num_cycles": 0.5},  # half a wave: from the peak down to 0
    "constant": {},
    "constant_with_warmup": {},
    "cosine_with_min_lr": {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None},  # exactly one of the two
    "cosine_with_restarts": {"num_cycles": 1},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
    "warmup_stable_decay": {
        "num_decay_steps": None,  # required: transformers has no default either
        "num_stable_steps": None,  # default: the steps that warmup and decay leave of the run
        "warmup_type": "linear",
        "decay_type": "cosine",
        "min_lr_ratio": 0.0,
        "num_cycles": 0.5,
    },
}
SCHEDULES = tuple(SCHEDULE_KWARGS)  # --lr_scheduler_type's choices
WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_steps(total_steps: int, warmup_steps: float, warmup_ratio: float | None = None) -> int:
    """The warmup in steps, by transformers 5's rule: --warmup_steps from 1 up is a number of steps, below 1 a
    fraction of the run, rounded up. --warmup_ratio, the fraction's former flag, counts where --warmup_steps is 0."""
    if warmup_steps == 0 and warmup_ratio is not None:
        return math.ceil(total_steps * warmup_ratio)
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(total_steps * warmup_steps)


def schedule_options(schedule: str, kwargs: dict | None, learning_rate: float) -> dict:
    """The settings the schedule's formula reads: --lr_scheduler_kwargs over transformers' defaults, checked.

    As in transformers, min_lr becomes min_lr_rate (a fraction of the peak), and polynomial keeps the peak
    (lr_init) to divide by.
    """
    if schedule not in SCHEDULE_KWARGS:
        raise OptimizerError(f"Unknown --lr_scheduler_type {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    defaults, given = SCHEDULE_KWARGS[schedule], dict(kwargs or {})
    flags = f"--lr_scheduler_type {schedule} " + (
        f"--lr_scheduler_kwargs '{json.dumps(given)}'" if given else "(no --lr_scheduler_kwargs)"
    )
    unknown = ", ".join(sorted(set(given) - set(defaults)))
    if unknown:
        takes = f"only {', '.join(defaults)}" if defaults else "no settings"
        raise OptimizerError(f"{flags}: the schedule takes {takes}, not {unknown}.")
    options = {**defaults, **given}
    problem = schedule_problem(schedule, options, learning_rate)
    if problem:
        raise OptimizerError(f"{flags}: {problem}.")
    if schedule == "cosine_with_min_lr" and options["min_lr"] is not None:
        options["min_lr_rate"] = options["min_lr"] / learning_rate
    if schedule == "polynomial":
        options["lr_init"] = learning_rate
    return options


def schedule_problem(schedule: str, options: dict, learning_rate: float) -> str | None:
    """What is wrong with a schedule's settings, in words; None if nothing."""
    for key, value in options.items():
        is_shape = key in ("warmup_type", "decay_type")
        if is_shape and value not in WSD_SHAPES:
            return f"{key} must be one of {', '.join(WSD_SHAPES)}, got {value!r}"
        if not is_shape and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} must be a number, got {value!r}"
    if schedule == "cosine_with_min_lr" and (options["min_lr"] is None) == (options["min_lr_rate"] is None):
        return "give exactly one of min_lr (a learning rate) and min_lr_rate (a fraction of --learning_rate)"
    if schedule == "polynomial":
        if not options["lr_end"] < learning_rate:
            return f"lr_end {options['lr_end']} must be below --learning_rate {learning_rate}"
        if not options["power"] > 0:
            return f"power must be positive, got {options['power']}"
    if schedule == "warmup_stable_decay":
        if options["num_decay_steps"] is None:
            return "num_decay_steps, the steps of the final decay, is required"
        for key in ("num_decay_steps", "num_stable_steps"):
            if options[key] is not None and not (options[key] >= 0 and options[key] == int(options[key])):
                return f"{key} must be a whole number of steps, got {options[key]}"
    return None


def learning_rate_factor(step: int, schedule: str, warmup: int, total: int, options: dict) -> float:
    """The multiplier of the peak learning rate at `step` (0-based: the step about to be taken).

    `options`: the schedule's settings, from schedule_options.
    """
    if schedule == "warmup_stable_decay":
        return warmup_stable_decay_factor(step, warmup, total, options)
    if step < warmup and schedule != "constant":
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule in ("cosine", "cosine_with_min_lr"):
        factor = 0.5 * (1.0 + math.cos(2 * math.pi * options["num_cycles"] * progress))
        if schedule == "cosine_with_min_lr":  # [0, 1] squeezed into [min_lr_rate, 1]
            factor = factor * (1 - options["min_lr_rate"]) + options["min_lr_rate"]
        return max(0.0, factor)
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((options["num_cycles"] * progress) % 1.0))))
    if schedule == "polynomial":
        peak, end = options["lr_init"], options["lr_end"]
        if step >= total:  # the end: transformers' formula gives it too, but divides by zero where warmup is the run
            return end / peak
        remaining = 1 - (step - warmup) / (total - warmup)
        return ((peak - end) * remaining ** options["power"] + end) / peak
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    raise OptimizerError(f"Unknown --lr_scheduler_type {schedule!r}; choose one of {', '.join(SCHEDULES)}.")


def warmup_stable_decay_factor(step: int, warmup: int, total: int, options: dict) -> float:
    """WSD: rise (warmup_type) from min_lr_ratio to 1, hold, fall (decay_type) back to min_lr_ratio, stay there."""
    decay, floor = options["num_decay_steps"], options["min_lr_ratio"]
    stable = options["num_stable_steps"]
    if stable is None:
        stable = total - warmup - decay
    if step < warmup:
        progress = step / max(1, warmup)
        shape = options["warmup_type"]
        if shape == "linear":
            factor = progress
        elif shape == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(1.0 - progress)
    elif step < warmup + stable:
        return 1.0
    elif step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        shape = options["decay_type"]
        if shape == "linear":
            factor = 1.0 - progress
        elif shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(2 * math.pi * options["num_cycles"] * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(progress)
    else:
        return floor
    return max(0.0, factor * (1.0 - floor) + floor)


def build_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, kwargs: dict | None = None
):
    # transformers reads the peak from the optimizer's defaults; an unknown schedule or setting fails now, not at step 1
    options = schedule_options(schedule, kwargs, optimizer.defaults["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, schedule, warmup, total, options)
    )
