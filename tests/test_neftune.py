"""--neftune_noise_alpha: uniform noise on the input embeddings in training, of transformers' scale
alpha / sqrt(length × hidden), and none at all in eval mode."""

import io
import math

import pytest
import torch
from rich.console import Console
from transformers.integrations.neftune import neftune_post_forward_hook

from minisft.machinery.loop import train
from minisft.machinery.models import tiny_model
from minisft.sft.neftune import add_neftune_noise

from .tiny_runs import metrics, run_config

ALPHA = 5.0


def token_ids(tokenizer, length: int) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (1, length), generator=torch.Generator().manual_seed(1))


def test_training_noise_is_uniform_of_the_neftune_scale(tokenizer):
    model = tiny_model(tokenizer)  # hidden size 64
    ids = token_ids(tokenizer, 256)
    embeddings = model.get_input_embeddings()
    plain = embeddings(ids)
    add_neftune_noise(model, ALPHA)
    model.train()
    noise = (embeddings(ids) - plain).detach()
    scale = ALPHA / math.sqrt(256 * 64)

    assert noise.abs().max() <= scale * (1 + 1e-6)  # 1e-6: the float32 rounding of the subtraction
    assert noise.abs().max() > 0.99 * scale  # 16,384 draws: the largest is within 1% of the bound
    # Uniform(-s, s) has std s/√3. For N draws the sample variance's relative standard error is
    # sqrt(Var(X²)/N) / E[X²] = sqrt((s⁴/5 - s⁴/9)/N) / (s²/3) = sqrt(0.8/N), 0.7% for N = 16,384, so the
    # std's is half that, 0.35%: a 2% bound is more than 5 standard errors, and a noise of half or twice the
    # scale (or Gaussian noise of the same bound) is far outside it.
    assert noise.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.02)
    assert noise.mean().abs() < 5 * scale / math.sqrt(3) / math.sqrt(noise.numel())


def test_eval_logits_are_untouched_and_training_logits_change(tokenizer):
    model = tiny_model(tokenizer)
    ids = token_ids(tokenizer, 32)
    model.eval()
    with torch.no_grad():
        plain = model(ids).logits
        handle = add_neftune_noise(model, ALPHA)
        assert torch.equal(model(ids).logits, plain)  # eval: bit for bit the model without the hook
        model.train()  # the tiny Llama has no dropout: only the hook can change training logits
        assert not torch.allclose(model(ids).logits, plain)
        handle.remove()
        assert torch.equal(model(ids).logits, plain)


@pytest.mark.parametrize("length", [256, 100])
def test_the_noise_is_transformers_own(tokenizer, length):
    """The same draws as transformers' neftune_post_forward_hook from the same seed: both fill a tensor of the
    output's shape with one uniform_ call. For a length of 256 the scale 5 / sqrt(256 · 64) = 5/128 is exact
    and the noise bit-exact; for 100 transformers takes the square root in float32 and minisft in float64, so the
    bounds differ in the last bits and the noise by at most a float32 rounding of the output."""
    embeddings = tiny_model(tokenizer).get_input_embeddings()
    embeddings.train()
    ids = token_ids(tokenizer, length)
    plain = embeddings(ids).detach()
    embeddings.neftune_noise_alpha = ALPHA  # what transformers' hook reads
    torch.manual_seed(0)
    theirs = neftune_post_forward_hook(embeddings, (ids,), plain)

    class Wrapper(torch.nn.Module):  # add_neftune_noise finds the layer as a model exposes it
        def get_input_embeddings(self):
            return embeddings

    add_neftune_noise(Wrapper(), ALPHA)
    torch.manual_seed(0)
    ours = embeddings(ids).detach()
    assert not torch.equal(ours, plain)
    if length == 256:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_run_with_the_flag_says_so_and_trains_on_noisy_embeddings(tiny_dir, tmp_path):
    output = io.StringIO()
    train(
        run_config(tiny_dir, tmp_path / "noisy", max_steps=2, neftune_noise_alpha=ALPHA),
        Console(file=output, width=400),
    )
    train(run_config(tiny_dir, tmp_path / "plain", max_steps=2), Console(file=io.StringIO()))
    opening = next(line for line in output.getvalue().splitlines() if line.startswith("run "))
    assert "NEFTune noise alpha 5" in opening
    # The same seed, data and weights: only the noise makes the first step's loss differ.
    noisy, plain = metrics(tmp_path / "noisy"), metrics(tmp_path / "plain")
    assert noisy[0]["loss"] != plain[0]["loss"]
