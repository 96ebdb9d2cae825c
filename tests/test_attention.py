"""Attention isolation: every example inside a packed row computes exactly what it computes alone."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import minisft.sft.attention
from minisft.machinery.models import tiny_model
from minisft.sft.attention import FLASH_IMPLEMENTATIONS, use_sdpa_by_example
from minisft.sft.batches import collate_rows, flatten_rows, packed_inputs, padding_free_row
from minisft.sft.labels import IGNORE_INDEX
from minisft.sft.packing import make_row

TEXTS = [
    "Hello world, this is the first example of the row.",
    "Second one is short.",
    "微调测试 我学会了: the third example, with Chinese and English, a little longer than the others are.",
    "Four.",
]
# fp32 on CPU. Packed and alone run the same maths on matrices of other shapes (a padded row of 64 against one
# example), so the linear layers round differently: measured up to 3.6e-7 max |logit difference| (a few ulps of
# logits up to 1.35; every implementation, every example, 1 and 2 threads) and 0.0 in the per-token losses (~10.8,
# an ulp 9.5e-7). Without boundaries the differences are 0.73 and 0.27 (the negative control below): 1e-5 is
# 28× the noise and 2.7e4× below the effect it must see.
TOLERANCE = 1e-5


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of predicting token t+1 from position t; 0 where the target is ignored."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def packed_batch(examples, pad_token_id):
    # Two rows of different lengths, so the second is padded; pad_to_multiple_of pads both.
    rows = [make_row([(ids, ids) for ids in examples[:3]]), make_row([(ids, ids) for ids in examples[3:]])]
    return collate_rows(rows, pad_token_id, pad_to_multiple_of=64)


def largest_differences(model, batch, inputs, labels):
    """Max |logit difference| and max |per-token loss difference| of every example, packed vs alone.

    Flattened inputs (cu_seq_lens) hold the rows end to end, padding removed, as one row; so do their labels.
    """
    flattened = "cu_seq_lens_q" in inputs
    with torch.no_grad():
        logits = model(**inputs).logits
        logit_gap = loss_gap = 0.0
        flat_start = 0
        for row_index, row_lengths in enumerate(batch["seq_lengths"]):
            start = 0
            for length in row_lengths:
                ids = batch["input_ids"][row_index, start : start + length]
                alone = model(input_ids=ids[None]).logits[0]
                out_row, out_start = (0, flat_start) if flattened else (row_index, start)
                packed = logits[out_row, out_start : out_start + length]
                logit_gap = max(logit_gap, (packed - alone).abs().max().item())
                packed_losses = per_token_losses(logits[out_row], labels[out_row])[out_start : out_start + length - 1]
                loss_gap = max(loss_gap, (packed_losses - per_token_losses(alone, ids)).abs().max().item())
                start += length
                flat_start += length
    return logit_gap, loss_gap


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
def test_packed_examples_equal_examples_alone(tokenizer, examples, implementation):
    model = tiny_model(tokenizer, attn_implementation=implementation).eval()
    use_sdpa_by_example(model)  # as minisft's loop does; only sdpa models change
    batch = packed_batch(examples, tokenizer.pad_token_id)
    logit_gap, loss_gap = largest_differences(model, batch, *packed_inputs(batch, model))
    assert logit_gap <= TOLERANCE and loss_gap <= TOLERANCE, (logit_gap, loss_gap)


def test_sdpa_runs_one_causal_attention_per_example(tokenizer, examples, monkeypatch):
    """The point of sdpa_by_example: no dense row mask, one plain causal call per example and layer."""
    calls = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], attention_mask))
        return original(module, query, key, value, attention_mask, **kwargs)

    original = minisft.sft.attention.sdpa_attention_forward
    monkeypatch.setattr(minisft.sft.attention, "sdpa_attention_forward", counting)
    model = tiny_model(tokenizer).eval()
    use_sdpa_by_example(model)
    batch = packed_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        model(**packed_inputs(batch, model)[0])
    lengths = [len(ids) for ids in examples]
    assert calls == [(length, None) for _ in range(model.config.num_hidden_layers) for length in lengths]


def test_without_boundaries_examples_see_each_other(tokenizer, examples):
    """The negative control: the same rows with a plain causal mask and running positions differ."""
    model = tiny_model(tokenizer).eval()
    batch = packed_batch(examples, tokenizer.pad_token_id)
    logit_gap, loss_gap = largest_differences(model, batch, {"input_ids": batch["input_ids"]}, batch["labels"])
    assert logit_gap > 1e-2 and loss_gap > 1e-2  # measured 0.73 and 0.27


def test_boundary_labels_are_masked(tokenizer, examples):
    row = make_row([(ids, ids) for ids in examples])
    starts = [sum(len(ids) for ids in examples[:index]) for index in range(len(examples))]
    assert [row["labels"][start] for start in starts] == [IGNORE_INDEX] * len(examples)
    assert sum(label == IGNORE_INDEX for label in row["labels"]) == len(examples)


def test_padding_free_batch_is_isolated_too(tokenizer, examples):
    model = tiny_model(tokenizer).eval()
    use_sdpa_by_example(model)
    batch = collate_rows(
        [padding_free_row([{"input_ids": ids, "labels": ids} for ids in examples])], tokenizer.pad_token_id
    )
    logit_gap, loss_gap = largest_differences(model, batch, *packed_inputs(batch, model))
    assert logit_gap <= TOLERANCE and loss_gap <= TOLERANCE


def test_flatten_rows_drops_padding(tokenizer, examples):
    batch = packed_batch(examples, tokenizer.pad_token_id)
    flat = flatten_rows(batch)
    assert flat["input_ids"].shape == (1, sum(len(ids) for ids in examples))
    assert flat["input_ids"][0].tolist() == [token for ids in examples for token in ids]


def test_unknown_implementation_is_a_clear_error(tokenizer, examples):
    batch = packed_batch(examples, tokenizer.pad_token_id)
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="paged_attention"), dtype=torch.float32)
    with pytest.raises(ValueError, match="use one of sdpa, eager, flex_attention"):
        packed_inputs(batch, model)


def test_plain_sdpa_is_refused_not_silently_relied_on(tokenizer, examples):
    """transformers' own sdpa ignores cu_seq_lens: packed inputs for it would be right only by its implicit
    detection of restarted positions, so they are refused until use_sdpa_by_example switched the model."""
    model = tiny_model(tokenizer).eval()
    batch = packed_batch(examples, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="use_sdpa_by_example"):
        packed_inputs(batch, model)
    use_sdpa_by_example(model)
    assert "cu_seq_lens_q" in packed_inputs(batch, model)[0]


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.cuda
@pytest.mark.skipif(not flash_available(), reason="flash attention needs a CUDA GPU and the flash-attn package")
@pytest.mark.parametrize("implementation", FLASH_IMPLEMENTATIONS[:1])
def test_flash_varlen_equals_examples_alone(tokenizer, examples, implementation):
    model = tiny_model(tokenizer, attn_implementation=implementation).to("cuda", torch.bfloat16).eval()
    batch = packed_batch(examples, tokenizer.pad_token_id)
    inputs = {
        key: value.to("cuda") if torch.is_tensor(value) else value
        for key, value in packed_inputs(batch, model)[0].items()
    }
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        start = 0
        for ids in examples:
            alone = model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
            # bf16 kernels: equal up to bf16 rounding, not to fp32 precision. Not measured (no GPU with flash-attn
            # when this bound was last reviewed): 5e-2 is ~6 bf16 ulps (2^-7 at 1) on logits of |max| ≈ 1.35, and
            # examples that see each other are 0.73 apart (test_without_boundaries_examples_see_each_other, fp32).
            assert (logits[start : start + len(ids)] - alone).abs().max().item() < 5e-2
            start += len(ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: FlexAttention trains on it")
def test_training_with_flex_attention_on_the_cpu_is_one_clear_line(tiny_dir, tmp_path):
    from minisft.machinery.config import ConfigError
    from minisft.machinery.loop import train

    from .tiny_runs import run_config

    config = run_config(tiny_dir, tmp_path / "out")
    config.model.attn_implementation = "flex_attention"
    # Before the check, the run ended in a NotImplementedError traceback from torch's FlexAttention backward.
    with pytest.raises(ConfigError, match="--attn_implementation flex_attention trains only on a GPU"):
        train(config)
