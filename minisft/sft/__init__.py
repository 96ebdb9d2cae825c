"""The SFT algorithm, one file per concept, in the order a row of data flows through them. Read them in this order:

     1. examples.py        every row form (messages, ShareGPT, prompt/completion, text, tokens) → one canonical example
     2. chat_template.py   the conversation rendered by the tokenizer's chat template → token ids
     3. labels.py          which token is trained: the masks, the cut to max_length, the drop, the count
     4. packing.py         examples into rows of max_length, best fit decreasing, no slot spent on padding
     5. attention.py       attention boundaries: a packed example sees only itself
     6. batches.py         units → the tensors the model takes, for each attention implementation
     7. lora.py            W + (α/r)·B·A: the adapter layer, its injection, merging it back
     8. loss.py            Σ token losses / trained tokens, fused with the head in chunks
     9. optim.py           AdamW (8-bit too), parameter groups, warmup and schedules
    10. step.py            one optimizer step: forward, loss, backward over micro-batches, clip, step
    11. neftune.py         an option: noise on the embeddings while training

Each file imports only files above it in this list, and nothing of the machinery beside it (minisft/machinery:
flags, files, caches, checkpoints, processes, trackers), bar minisft.errors' one exception type.
`python -m minisft.inspect` shows what the first six produced for your data; tests/test_layout.py keeps this room
tidy. The loop that calls the step, minisft/machinery/loop.py, is the one file outside worth reading next.
"""
