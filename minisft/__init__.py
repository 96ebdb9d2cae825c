"""minisft: supervised fine-tuning of causal language models, from scratch in plain PyTorch.

One module per stage, in the order data flows through them:

    data → formatting → masking → prepare → (packing → attention → loop)

`python -m minisft.inspect` shows what the data stages produced.
"""

__version__ = "0.1.0"
