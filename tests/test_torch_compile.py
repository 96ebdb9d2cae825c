"""--torch_compile: every decoder layer compiled by torch.compile; what the compiled layers train equals what eager
trains within a measured bound, the saved model is the same files, and the flags read as transformers reads them."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minisft.machinery.config import ConfigError, PackingConfig, RunConfig, TrainingConfig
from minisft.machinery.loop import train

from .tiny_runs import metrics, run_config, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_layers_train_what_eager_trains(tiny_dir, tmp_path):
    """Packed rows (attention per example, kept out of the graph; lengths changing every step), evaluation (a
    second, gradient-free graph) and a probe answered by generate (kept eager) in one compiled run."""
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Say hello.", "expected": "hello"}) + "\n")
    flags = dict(max_steps=4, eval_strategy="steps", eval_steps=2, probe_prompts=str(probes))

    def config(name: str, **extra):
        built = run_config(tiny_dir, tmp_path / name, packing=PackingConfig(packing=True), **flags, **extra)
        built.data.eval_split_size = 0.2
        return built

    eager = train(config("eager"))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train(config("compiled", torch_compile=True))

    # It compiled, every layer: without --torch_compile no graph is made and no layer holds a compiled call.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.model.layers)
    assert all(layer._compiled_call_impl is None for layer in eager.model.model.layers)

    # Inductor fuses the norms and the MLP's elementwise work and orders their float32 sums its own way, so the
    # numbers need not be bit-equal. Measured on this model: the 4 steps' and 2 evaluations' losses equal to the
    # last digit, the trained weights within 5.3e-6 absolute (4 AdamW steps of learning rate 1e-3; AdamW's m / √v
    # magnifies the gradients' last-bit differences); the bounds: 1e-6 relative, and 10× the weights'.
    for ours, theirs in zip(metrics(tmp_path / "compiled"), metrics(tmp_path / "eager"), strict=True):
        for name in ("loss", "eval_loss"):
            if name in theirs:
                assert ours[name] == pytest.approx(theirs[name], rel=1e-6), (name, ours, theirs)
    saved, reference = weights(tmp_path / "compiled"), weights(tmp_path / "eager")
    assert saved.keys() == reference.keys()  # nn.Module.compile keeps the weights' names: the same files
    for name, tensor in saved.items():
        assert (tensor - reference[name]).abs().max() <= 5.3e-5, name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "compiled") is not None
    assert (tmp_path / "compiled" / "probes.jsonl").read_text().count("\n") == 3  # start, 2 evaluations


def test_a_mode_turns_compilation_on_as_in_transformers():
    assert TrainingConfig(output_dir="out", torch_compile_mode="max-autotune").torch_compile
    assert not TrainingConfig(output_dir="out").torch_compile
    with pytest.raises(ConfigError, match="--torch_compile_mode must be one of default, reduce-overhead"):
        TrainingConfig(output_dir="out", torch_compile_mode="fastest")


def test_compiling_under_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--torch_compile with --fsdp is not written yet"):
        RunConfig(training=TrainingConfig(output_dir="out", fsdp=True, torch_compile=True))
