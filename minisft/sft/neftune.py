"""NEFTune: noise on the input embeddings while training (Jain et al. 2023, arXiv 2310.05914).

Each training forward pass adds to the embedding output of a row of L tokens of width d

    noise ~ Uniform(-s, s),   s = alpha / sqrt(L · d)

so the noise's norm over the whole row stays about alpha / sqrt(3), whatever the row's size. The paper
reports better instruction following from alpha 5 to 15: the model cannot memorise the exact embeddings
of a small fine-tuning set. Only training sees the noise: eval losses and generation use the clean
embeddings, because the hook checks `module.training` (model.eval() turns it off).

This is transformers' `neftune_post_forward_hook` (transformers/integrations/neftune.py), which TRL's
SFTConfig(neftune_noise_alpha=...) switches on, down to the order of its random draws: the same seed
gives the same noise.
"""

from __future__ import annotations

import math

import torch


def add_neftune_noise(model, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook NEFTune noise of strength `alpha` onto the model's input embeddings; the handle removes it."""

    def noisy_embeddings(module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        # L is the row's length, input_ids.size(1), as transformers and TRL use it: under packing that is
        # the packed row's length, not that of each example in it.
        length, hidden = output.size(1), output.size(2)
        scale = alpha / math.sqrt(length * hidden)
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(noisy_embeddings)
