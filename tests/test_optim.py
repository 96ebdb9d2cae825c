"""The optimizer and the schedule, against transformers' own rules on the same inputs."""

import pytest
import torch
from transformers import Trainer, TrainingArguments, get_scheduler

from minisft.models import tiny_model
from minisft.optim import OptimizerError, build_optimizer, build_schedule, learning_rate_factor, parameter_groups


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (10, 40), (1, 1)])
def test_schedules_equal_transformers(schedule, warmup, total):
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference_optimizer = torch.optim.SGD([parameter], lr=1.0)
    reference = get_scheduler(schedule, reference_optimizer, num_warmup_steps=warmup, num_training_steps=total)
    ours = build_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), schedule, warmup, total)
    # minisft writes transformers' formulas with the same operations in the same order (cosine: π · progress where
    # transformers has π · 0.5 · 2 · progress, the same float), so the factors are equal bit for bit (measured at
    # every step of every case); a warmup or decay off by one step would be off by 1/warmup or 1/(total - warmup).
    for step in range(total + 2):
        expected = reference.get_last_lr()[0]
        assert ours.get_last_lr()[0] == expected, (schedule, step)
        assert learning_rate_factor(step, schedule, warmup, total) == expected, (schedule, step)
        reference_optimizer.step()
        reference.step()
        ours.optimizer.step()
        ours.step()


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
    with pytest.raises(OptimizerError, match="adamw_torch, adamw_8bit, paged_adamw_8bit"):
        build_optimizer(tiny_model(tokenizer), "sgd", 1e-3, 0.0)
    with pytest.raises(OptimizerError, match="linear, cosine, constant"):
        build_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 0, 10)
