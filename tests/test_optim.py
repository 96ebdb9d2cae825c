"""The optimizer and the schedule, against transformers' own rules on the same inputs."""

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments, get_scheduler

from minisft.machinery.models import tiny_model
from minisft.sft.optim import (
    OptimizerError,
    build_optimizer,
    build_schedule,
    learning_rate_factor,
    parameter_groups,
    schedule_options,
    warmup_steps,
)

# Every schedule, with its defaults and with settings that move each of its formula's terms.
SCHEDULE_CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 1e-4, "num_cycles": 0.7}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-5, "power": 2.0}),
    ("polynomial", {"power": 0.5}),
    ("warmup_stable_decay", {"num_decay_steps": 4}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "warmup_type": "1-sqrt", "decay_type": "linear"}),
    (
        "warmup_stable_decay",
        {
            "num_decay_steps": 3,
            "num_stable_steps": 2,
            "warmup_type": "cosine",
            "decay_type": "1-sqrt",
            "min_lr_ratio": 0.1,
        },
    ),
    ("warmup_stable_decay", {"num_decay_steps": 6, "num_cycles": 0.25, "min_lr_ratio": 0.05}),
]


@pytest.mark.parametrize("schedule, kwargs", SCHEDULE_CASES)
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (10, 40), (7, 13), (0, 1), (1, 1)])
@pytest.mark.parametrize("peak", [1e-3, 2e-5])
def test_schedules_equal_transformers(schedule, kwargs, warmup, total, peak):
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    reference = get_scheduler(schedule, reference_optimizer, warmup, total, scheduler_specific_kwargs=dict(kwargs))
    ours = build_schedule(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak), schedule, warmup, total, kwargs
    )
    options = schedule_options(schedule, kwargs, peak)
    # minisft writes transformers' formulas with the same float operations on the same values (2π · num_cycles · p
    # where transformers has π · num_cycles · 2 · p: a factor of 2 is exact in binary floating point), so the rates
    # are equal bit for bit at every step, two past the end included; a warmup or decay off by one step would be off
    # by 1/warmup or 1/(total - warmup), and a wrong default off by far more.
    for step in range(total + 3):
        expected = reference.get_last_lr()[0]
        assert ours.get_last_lr()[0] == expected, (schedule, step)
        assert learning_rate_factor(step, schedule, warmup, total, options) * peak == expected, (schedule, step)
        reference_optimizer.step()
        ours.optimizer.step()
        ours.step()
        try:
            reference.step()
        except ZeroDivisionError:
            # transformers' polynomial divides by (total - warmup) past the end of a run that is all warmup;
            # minisft stays at lr_end there.
            assert schedule == "polynomial" and warmup == total
            assert ours.get_last_lr()[0] == pytest.approx(options["lr_end"])
            return


@pytest.mark.parametrize(
    "schedule, kwargs, message",
    [
        ("linear", {"num_cycles": 2}, "linear --lr_scheduler_kwargs '{\"num_cycles\": 2}': the schedule takes no "),
        ("cosine", {"min_lr_rate": 0.1}, "takes only num_cycles, not min_lr_rate"),
        ("polynomial", {"end": 0.1}, "takes only lr_end, power, not end"),
        ("cosine_with_min_lr", {}, "give exactly one of min_lr"),
        ("cosine_with_min_lr", {"min_lr": 1e-5, "min_lr_rate": 0.1}, "give exactly one of min_lr"),
        ("polynomial", {"lr_end": 0.01}, "lr_end 0.01 must be below --learning_rate 0.001"),
        ("warmup_stable_decay", {}, "num_decay_steps, the steps of the final decay, is required"),
        ("warmup_stable_decay", {"num_decay_steps": 4, "decay_type": "exp"}, "decay_type must be one of linear"),
        ("cosine", {"num_cycles": "half"}, "num_cycles must be a number, got 'half'"),
    ],
)
def test_wrong_schedule_settings_are_one_error_naming_the_flag(schedule, kwargs, message):
    with pytest.raises(OptimizerError, match="--lr_scheduler_type") as error:
        schedule_options(schedule, kwargs, learning_rate=1e-3)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("warmup", [0, 0.03, 0.1, 0.5, 0.99, 1, 1.0, 5, 12.0])
@pytest.mark.parametrize("total", [1, 7, 100, 333])
def test_warmup_steps_as_transformers_5_reads_them(warmup, total, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, warmup_steps=warmup)
    assert warmup_steps(total, warmup) == args.get_warmup_steps(total)


def test_the_deprecated_warmup_ratio_is_the_same_fraction():
    assert warmup_steps(100, 0, 0.03) == warmup_steps(100, 0.03) == 3
    assert warmup_steps(10, 0, 1.0) == 10  # the whole run, as --warmup_ratio 1 always meant
    assert warmup_steps(100, 5, 0.5) == 5  # --warmup_steps, where given, wins


def test_no_decay_groups_equal_transformers(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    decayed_by_transformers = set(trainer.get_decay_parameter_names(model))
    groups = parameter_groups(model, weight_decay=0.1)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed = {names[id(parameter)] for parameter in groups[0]["params"]}
    not_decayed = {names[id(parameter)] for parameter in groups[1]["params"]}
    assert not_decayed and decayed
    assert decayed == decayed_by_transformers & set(names.values())
    assert all("norm" in name for name in not_decayed)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_tied_weights_are_one_parameter_of_the_optimizer(tokenizer):
    model = tiny_model(tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = parameter_groups(model, weight_decay=0.0)
    ids = [id(parameter) for group in groups for parameter in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["adamw_torch_fused", "adamw_torch", "paged_adamw_32bit", "adafactor"])
def test_optimizers_step_as_transformers_trainer_builds_them(tokenizer, tmp_path, name):
    """Three steps of minisft's optimizer and of the one transformers' Trainer builds for --optim `name`, from the
    same weights on the same batch: the same class (or its bitsandbytes alias) with the same settings."""
    hyperparameters = dict(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, optim=name, **hyperparameters)
    reference_class, reference_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    model = tiny_model(tokenizer)
    reference_model = copy.deepcopy(model)
    ours = build_optimizer(model, name, 1e-3, 0.1, betas=(0.8, 0.99), eps=1e-7)
    # The Trainer's groups are minisft's (test_no_decay_groups_equal_transformers).
    reference = reference_class(parameter_groups(reference_model, 0.1), **reference_kwargs)
    ids = torch.tensor([tokenizer("One small step for a model, one giant leap.")["input_ids"]])
    for _ in range(3):
        for each_model, optimizer in ((model, ours), (reference_model, reference)):
            each_model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    moved = (model.model.layers[0].mlp.up_proj.weight - tiny_model(tokenizer).model.layers[0].mlp.up_proj.weight).abs()
    assert moved.max() > 1e-4
    pairs = list(zip(model.parameters(), reference_model.parameters()))
    if name == "adamw_torch":
        # transformers' adamw_torch is torch's per-tensor loop, minisft's the fused kernel: the same update, rounded
        # in another order (measured: at most 6e-8 apart after three steps).
        assert ours.defaults == {**reference.defaults, "fused": True}
        for parameter, expected in pairs:
            torch.testing.assert_close(parameter, expected, rtol=1e-6, atol=1e-6)
    else:
        assert ours.defaults == reference.defaults
        assert all(torch.equal(parameter, expected) for parameter, expected in pairs)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_step_on_cpu(tokenizer, name):
    model = tiny_model(tokenizer)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer = build_optimizer(model, name, learning_rate=1e-3, weight_decay=0.0)
    ids = torch.tensor([tokenizer("One small step.")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = model.model.layers[0].mlp.up_proj.weight.detach() - before
    assert moved.abs().max() > 1e-4
    assert optimizer.state[model.model.layers[0].mlp.up_proj.weight]["state1"].dtype == torch.uint8


def test_unknown_optimizer_or_schedule_is_an_error(tokenizer):
    with pytest.raises(OptimizerError, match="adamw_torch_fused, adamw_torch, adamw_8bit"):
        build_optimizer(tiny_model(tokenizer), "sgd", 1e-3, 0.0)
    with pytest.raises(OptimizerError, match="linear, cosine, constant"):
        build_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 0, 10)
