"""Packing throughput, side by side: minisft's four ways of batching against TRL's SFTTrainer and torchtune, in one run.

    python benchmarks/packing_throughput.py                        # CPU, tiny 16M-parameter Llama, ~10 min on 2 cores
    python benchmarks/packing_throughput.py --model smollm2-135m --steps 3 --repeats 1     # CPU, slow
    python benchmarks/packing_throughput.py --device cuda          # GPU: SmolLM2-135M, bf16, MFU of the bf16 peak
    python benchmarks/packing_throughput.py --peft lora            # LoRA: minisft's injector against TRL + peft
    python benchmarks/packing_throughput.py --peft qlora           # QLoRA: the same over a 4-bit nf4 base

Modes (every one trains the same model from the same initial weights on the same examples):
    minisft_padded        micro-batches of examples padded to their longest
    minisft_padding_free  each micro-batch's examples laid end to end in one row, with attention boundaries
    minisft_bfd           best-fit-decreasing packed rows of max_length, with boundaries
    minisft_wrapped       everything concatenated and cut every max_length tokens, boundaries kept inside rows
    trl_padded            trl.SFTTrainer, padding
    trl_packed            trl.SFTTrainer, packing=True (its bfd, which turns padding-free on)
    torchtune_padded      torchtune 0.6.1's single-device full fine-tune (its recipe's step), padded batches
    torchtune_packed      the same with its PackedDataset: greedy packing in dataset order, block-causal mask

torchtune 0.6.1 runs with this torch (2.13) only beside torchao 0.10.0, so it is installed in a folder of its
own, and its workers get that folder on PYTHONPATH (--torchtune_path; the modes are skipped, with the reason,
when torchtune does not import):
    pip install --target /tmp/torchtune-0.6.1 --no-deps torchtune==0.6.1 torchao==0.10.0 torchdata==0.11.0 \
        omegaconf antlr4-python3-runtime==4.9.3 sentencepiece tiktoken blobfile kagglehub

What is held equal. The model, the data (the same N = steps × examples_per_step conversations, tokenized by each
side's own code into the same tokens, truncated to max_length; torchtune has no tokenizer for this vocabulary, so
its samples come from the HF chat template), the optimizer (AdamW, lr, no weight decay,
clipping at 1.0, constant schedule), fp32 on CPU / bf16 autocast on GPU, and the number of optimizer steps: each
mode trains one epoch over the N examples in `steps` steps. Unpacked modes take examples_per_step examples per
step, in micro-batches of micro_batch_size (TRL's default, 8); packed modes take the rows those examples fill,
rows / steps per step (rounded: a step may hold half a row more or less; the table shows tokens per step), one
row per micro-batch. One row per micro-batch is TRL's best case: its padding-free collator lays a micro-batch's
rows end to end as one sequence, and sdpa then attends over all of them at once (--rows_per_micro_batch 4
shows that cost). TRL defaults that change the work are undone in `trl_settings` (gradient checkpointing, bf16
on a CPU without bf16 instructions, ...). torchtune's weights are the HF model's through its own hf_to_tune
conversion, and after training they go back (tune_to_hf) into the HF model for the held-out loss. Its packing
differs by design: greedy rows in dataset order (so more rows than bfd, each step trains rows / steps of its own),
and a packed row's labels are not cut at example boundaries, so each example after the first in a row also
trains its first token from the end of the previous one (one token per example; counted in its trained tokens).

What is measured, per mode, in its own process (peak memory is per process; TRL's state stays in its own):
    trained tokens/s   tokens whose label is trained (labels[1:] != -100, counted the same way for every mode)
                       over the wall time of the steps after the warm-up step(s), data loading included
    slot efficiency    non-pad tokens / slots the model computed (batch × width of each micro-batch)
    step time          median seconds per optimizer step, warm-up excluded
    peak memory        the process's peak RSS on CPU; torch.cuda.max_memory_allocated on GPU
    data preparation   tokenizing (chat template, labels) and packing, in each side's own code
    final loss         after training, the loss of the same held-out conversations, computed by the same code
                       for every mode: a sanity check that all modes trained the same thing
    MFU                model FLOPs per second / the machine's peak. Model FLOPs count useful work only:
                       6 × (non-embedding parameters) per input token + 6 × vocab × hidden (the head) per trained
                       token + attention, 12 × layers × hidden × n² per document of n tokens (PaLM's count,
                       full square). Peak: on CPU, an fp32 2048³ matmul timed on all cores (the best of 5),
                       measured before every worker and the run's median taken (a shared machine drifts); on
                       GPU, the bf16 dense peak of the card (H100/H200: 989 TFLOP/s; --peak_tflops otherwise).
    1st step s         the first (warm-up) step's seconds: where minisft_bfd_compiled compiles

Variants on request (--modes ...): minisft_bfd_compiled is minisft_bfd with --torch_compile's compiled decoder
layers (--torch_compile_mode passes a mode); minisft_bfd_mmap is minisft_bfd with glibc's mmap threshold fixed
at 128 KiB (mallopt, as MALLOC_MMAP_THRESHOLD_=131072): every large tensor its own mapping, returned when freed.

LoRA and QLoRA (--peft lora, --peft qlora). The runs most people make train adapters over a frozen base. Every
minisft mode then attaches minisft's own LoRA (minisft.sft.lora.inject_lora, what --use_peft does), and every
TRL mode wraps the model with peft's get_peft_model(LoraConfig(...)) and hands the PeftModel to SFTTrainer (what
SFTTrainer itself does with peft_config); torchtune's modes are skipped, with the reason. Both sides take the same
targets (--lora_target_modules, default all-linear, as minisft's demo), rank, alpha and dropout 0 (dropout would
make the two sides draw different masks), and both seed torch just before the adapters are made, as SFTTrainer
does (set_seed, then get_peft_model): peft and minisft make A Kaiming-uniform and B zero in the same order, so the
initial adapters are equal bit for bit; each worker records a digest of its initial adapter, and the run stops if
two differ. QLoRA loads the base with transformers' BitsAndBytesConfig (nf4, float32 compute) on both sides,
through minisft's four_bit_quantization, as --load_in_4bit does; bitsandbytes runs 4-bit on the CPU since 0.49,
and where it does not, every mode is skipped with bitsandbytes' reason (printed, and kept in the JSON).
SFTTrainer casts a 4-bit model's adapters to bf16 (the QLoRA paper's advice); minisft keeps them float32, so the
TRL worker puts its float32 initial adapter back before training: the same arithmetic on both sides. The held-out
loss is computed with the adapters active.

MFU under --peft counts what a frozen base costs, as nanoGPT writes its count out. Per input token, with N the
non-embedding parameters (all frozen) and P the adapters' (A and B, r × (d_in + d_out) per targeted layer):
    forward                          2N + 2P
    backward, activation gradients   2N + 2P      the gradient flows back through every frozen matmul
    backward, weight gradients           2P       none for the base: it is frozen
    = 4N + 6P, less 2 × layer 0's q, k, v weights: their input is the frozen embedding's, so no gradient is
      asked of it (autograd skips that product, in minisft and peft alike)
plus, per trained token, the frozen head 4 × vocab × hidden (2 forward, 2 for the gradient of the hidden
states; all-linear leaves the head out, as peft), and attention 12 × layers × hidden × n² per document of n
tokens, unchanged: it has no weights, and its backward is activation gradients anyway. P is counted by minisft's
injector on a weightless (meta-device) copy of the model. The dequantization of a 4-bit base is overhead, not
model FLOPs: QLoRA's count is LoRA's.

Modes are interleaved (each repetition runs every mode, in a rotated order) and the medians over repetitions
are reported, with each figure's ratio to TRL packed. Output: a rich table, a JSON file and, with matplotlib,
a PNG bar chart.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from packer_speed import skewed_lengths  # the same length distribution as the packer benchmark

DEFAULT_MODES = (
    "minisft_padded", "minisft_padding_free", "minisft_bfd", "minisft_wrapped", "trl_padded", "trl_packed",
    "torchtune_padded", "torchtune_packed",
)  # fmt: skip
# On request (--modes): minisft_bfd with --torch_compile's compiled decoder layers, and minisft_bfd with glibc's
# mmap threshold fixed at 128 KiB (every large tensor its own mapping, returned to the system when freed).
VARIANT_MODES = ("minisft_bfd_compiled", "minisft_bfd_mmap")
MODES = DEFAULT_MODES + VARIANT_MODES
PACKED_MODES = ("minisft_bfd", "minisft_wrapped", "trl_packed", "torchtune_packed", *VARIANT_MODES)
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 * 1024  # glibc's mallopt parameter, and the value tried
TORCHTUNE_PATH = "/tmp/torchtune-0.6.1"  # where the docstring's pip install --target puts torchtune
IGNORE_INDEX = -100  # the label that takes a token out of the loss, in minisft, TRL and torchtune alike
REFERENCE = "trl_packed"  # every figure is also shown as a ratio to this mode
GPU_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
TINY_SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024)
WORDS = (
    "the model learns to answer questions about data training tokens with short and long replies that explain "
    "how packing keeps examples apart while padding wastes slots on a skewed mix of chat turns where most are "
    "brief but a few run for pages of code tables lists and careful reasoning steps before the final result"
).split()


# ----------------------------------------------------------------------------- data


def synthetic_conversations(count: int, seed: int) -> list[dict]:
    """Conversations of 1 to 3 exchanges whose templated length follows skewed_lengths (about one token a word).

    The chat template adds ~40 tokens of system prompt and turn markers; those are taken off the target.
    """
    generator = np.random.default_rng(seed + 1)
    conversations = []
    for target in skewed_lengths(count, seed):
        exchanges = int(generator.integers(1, 4))
        words = max(target - 30 - 10 * exchanges, 2 * exchanges)
        # The assistant says most of it, as in instruction data.
        shares = generator.dirichlet([1.0, 3.0] * exchanges) * words
        messages = [
            {
                "role": "user" if index % 2 == 0 else "assistant",
                "content": " ".join(generator.choice(WORDS, size=max(int(share), 1))),
            }
            for index, share in enumerate(shares)
        ]
        conversations.append({"messages": messages})
    return conversations


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# ----------------------------------------------------------------------------- FLOPs and the machine's peak


def model_flops_per_trained_token(config, lengths: list[int]) -> float:
    """Useful FLOPs (forward + backward) per trained token, for documents of these token counts (see docstring)."""
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    head = vocab * hidden
    parameters = layers * per_layer_parameters(config) + hidden  # + the final norm
    trained = sum(length - 1 for length in lengths)
    flops = 6 * parameters * sum(lengths) + 6 * head * trained + 12 * layers * hidden * sum(n * n for n in lengths)
    return flops / trained


def peft_flops_per_trained_token(config, lengths: list[int], adapter_parameters: int) -> float:
    """Useful FLOPs per trained token with a frozen base and trained adapters (the docstring's count)."""
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    frozen = layers * per_layer_parameters(config) + hidden  # + the final norm
    # Layer 0's q, k, v read the frozen embeddings through a frozen norm: nothing asks for their input gradient.
    first_qkv = hidden * head_dimension(config) * (config.num_attention_heads + 2 * config.num_key_value_heads)
    trained = sum(length - 1 for length in lengths)
    per_input_token = 4 * frozen - 2 * first_qkv + 6 * adapter_parameters
    flops = per_input_token * sum(lengths) + 4 * vocab * hidden * trained
    return (flops + 12 * layers * hidden * sum(n * n for n in lengths)) / trained


def head_dimension(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def per_layer_parameters(config) -> int:
    hidden, inner = config.hidden_size, config.intermediate_size
    attention = hidden * head_dimension(config) * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return attention + 3 * hidden * inner + 2 * hidden


def cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul FLOP/s of this machine on all the threads torch uses: the best of a few size³ products."""
    left, right = torch.randn(size, size), torch.randn(size, size)
    left @ right  # warm-up: thread pool, page faults
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gpu_peak_flops(override_tflops: float | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak_tflops {override_tflops}"
    name = torch.cuda.get_device_name()
    for key, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: bf16 dense peak {tflops:g} TFLOP/s"
    raise SystemExit(f"Unknown GPU {name!r}: pass its bf16 dense peak with --peak_tflops.")


# ----------------------------------------------------------------------------- LoRA and QLoRA on both sides


def lora_settings(args):
    """The adapters, as minisft's --use_peft flags make them; dropout 0, so both sides do the same arithmetic."""
    from minisft.machinery.config import LoraConfig

    lora = LoraConfig(
        use_peft=True, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
        lora_target_modules=args.lora_target_modules,
    )  # fmt: skip
    return lora.settings()


def four_bit_base(args):
    """QLoRA's quantization config (nf4, float32 compute), as --load_in_4bit makes it; None without --peft qlora."""
    from minisft.machinery.models import four_bit_quantization

    return four_bit_quantization(torch.float32, "nf4", device=args.device) if args.peft == "qlora" else None


def adapter_parameters(config, args) -> int:
    """P, the adapters' parameters: minisft's injector on a weightless (meta-device) copy of the model."""
    from transformers import AutoModelForCausalLM

    from minisft.sft.lora import inject_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return inject_lora(model, lora_settings(args)).trainable


def adapter_digest(model) -> str:
    """A digest of the adapters' weights in module order: equal digests, equal initial adapters on both sides."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            digest.update(parameter.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def minisft_lora(model, args) -> str:
    """minisft's own adapters, seeded just before they are made, as SFTTrainer seeds peft's; their digest."""
    from minisft.sft.lora import inject_lora

    torch.manual_seed(args.seed)
    inject_lora(model, lora_settings(args))
    return adapter_digest(model)


def peft_lora(model, args):
    """peft's adapters, as SFTTrainer makes them from peft_config: set_seed(seed), then get_peft_model."""
    import peft
    from transformers import set_seed

    settings = lora_settings(args)
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    set_seed(args.seed)
    return peft.get_peft_model(model, config)


# ----------------------------------------------------------------------------- one mode, in its own process


def micro_batch_figures(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> tuple[int, int, int]:
    """(trained tokens, non-pad tokens, slots) of one micro-batch, counted the same way for every mode."""
    from minisft.sft.labels import count_trained_tokens

    real = int(attention_mask.sum()) if attention_mask is not None and attention_mask.dim() == 2 else None
    return count_trained_tokens(labels), real if real is not None else input_ids.numel(), input_ids.numel()


def run_minisft(mode: str, args, work: Path) -> dict:
    """minisft's own training step (minisft.sft.step.train_step, the one the loop calls), over this mode's units."""
    from minisft.machinery.config import DataConfig
    from minisft.machinery.loop import mixed_precision
    from minisft.machinery.models import compile_decoder_layers, load_model, load_tokenizer
    from minisft.machinery.pack_plans import pack_prepared
    from minisft.machinery.prepare import prepare_dataset
    from minisft.sft.attention import use_sdpa_by_example
    from minisft.sft.batches import collate
    from minisft.sft.labels import count_trained_tokens_of
    from minisft.sft.optim import build_optimizer, build_schedule
    from minisft.sft.step import train_step

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model_source)
    model = load_model(
        args.model_source, attn_implementation="sdpa", quantization_config=four_bit_base(args), device=device
    )
    use_sdpa_by_example(model)
    initial_adapter = minisft_lora(model, args) if args.peft != "none" else None
    if mode == "minisft_bfd_compiled":
        compile_decoder_layers(model, args.torch_compile_mode)  # --torch_compile's; it compiles in the warm-up step
    if mode == "minisft_bfd_mmap":
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # as MALLOC_MMAP_THRESHOLD_=131072
    conversations = read_jsonl(work / "train.jsonl")

    start = time.perf_counter()
    examples = prepare_dataset(conversations, tokenizer, DataConfig(max_length=args.max_length)).examples
    strategy = "bfd" if mode.startswith("minisft_bfd") else {"minisft_wrapped": "wrapped"}.get(mode)
    units = pack_prepared(examples, args.max_length, strategy).rows if strategy else examples
    preparation_seconds = time.perf_counter() - start

    autocast = mixed_precision(args.device == "cuda", False, device, "float32")
    optimizer = build_optimizer(model, "adamw_torch", args.learning_rate, 0.0)
    schedule = build_schedule(optimizer, "constant", 0, args.steps)
    per_step, micro_batch = units_per_step(mode, len(units), args)
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(args.seed)).tolist()

    figures: list[tuple[int, int, int]] = []

    def collate_and_count(group: list[dict]) -> dict:  # the step collates; the figures are counted on the way
        batch = collate(group, model, tokenizer.pad_token_id, mode == "minisft_padding_free", None, device)
        figures.append(
            micro_batch_figures(batch["inputs"]["input_ids"], batch["labels"], batch["inputs"].get("attention_mask"))
        )
        return batch

    steps, step_end = [], time.perf_counter()
    for step in range(args.steps):
        indices = order[step * per_step : (step + 1) * per_step]
        groups = [
            [units[index] for index in indices[start : start + micro_batch]]
            for start in range(0, len(indices), micro_batch)
        ]
        figures.clear()
        step_tokens = sum(count_trained_tokens_of(group) for group in groups)
        # One process, fp32 or bf16 autocast: no data parallelism, no loss scaling, as the loop then runs.
        train_step(model, groups, step_tokens, collate_and_count, optimizer, schedule, 1.0, autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append({"seconds": now - step_end, **step_totals(figures)})
        step_end = now
    return {
        "steps": steps,
        "preparation_seconds": preparation_seconds,
        "final_loss": held_out_loss(model, tokenizer, work, args),
        "rows": len(units),
        "initial_adapter": initial_adapter,
    }


def rows_per_step(row_count: int, steps: int) -> int:
    """Packed modes: the step's share of the rows (rounded: a step holds at most half a row more or less)."""
    return max(1, round(row_count / steps))


def units_per_step(mode: str, unit_count: int, args) -> tuple[int, int]:
    """(units per optimizer step, units per micro-batch): examples for padded modes, rows for packed ones."""
    if mode in PACKED_MODES:
        return rows_per_step(unit_count, args.steps), args.rows_per_micro_batch
    return args.examples_per_step, args.micro_batch_size


def step_totals(figures: list[tuple[int, int, int]]) -> dict:
    trained, real, slots = (sum(column) for column in zip(*figures))
    return {"trained_tokens": trained, "real_tokens": real, "slots": slots}


def held_out_loss(model, tokenizer, work: Path, args) -> float:
    """Σ token losses / trained tokens on the held-out conversations: the same code whichever mode trained."""
    from minisft.machinery.config import DataConfig
    from minisft.machinery.prepare import prepare_dataset
    from minisft.sft.batches import collate_padded
    from minisft.sft.step import model_losses

    examples = prepare_dataset(read_jsonl(work / "held_out.jsonl"), tokenizer, DataConfig(max_length=args.max_length))
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples.examples:
            batch = collate_padded([example], tokenizer.pad_token_id)
            inputs = {key: batch[key].to(args.device) for key in ("input_ids", "attention_mask")}
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                losses = model_losses(model, {"inputs": inputs, "labels": batch["labels"].to(args.device)})
            loss_sum += float(losses.loss_sum)
            tokens += losses.tokens
    return loss_sum / max(tokens, 1)


def trl_settings(mode: str, args, output_dir: str, rows_per_step: int) -> dict:
    """SFTConfig: the benchmark's shared settings, and every TRL default that would change the work, undone."""
    packed = mode == "trl_packed"
    micro_batch = args.rows_per_micro_batch if packed else args.micro_batch_size
    return dict(
        output_dir=output_dir,
        max_length=args.max_length,
        packing=packed,
        packing_strategy="bfd",  # turns padding_free on
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=math.ceil((rows_per_step if packed else args.examples_per_step) / micro_batch),
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=args.seed,
        bf16=args.device == "cuda",  # TRL's default is True even on a CPU, where bf16 is 4× slower here
        fp16=False,
        gradient_checkpointing=False,  # TRL's default: True (recomputation: ~30% more work)
        use_cpu=args.device == "cpu",
        loss_type="nll",
        assistant_only_loss=False,  # minisft's default too: every token of the conversation is trained
        completion_only_loss=None,
        shuffle_dataset=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        logging_steps=args.steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def run_trl(mode: str, args, work: Path) -> dict:
    import datasets
    import transformers
    import trl

    from minisft.machinery.models import load_model, load_tokenizer

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    tokenizer = load_tokenizer(args.model_source)
    model = load_model(
        args.model_source, attn_implementation="sdpa", quantization_config=four_bit_base(args), device=args.device
    )
    if args.peft != "none":
        model = peft_lora(model, args)
        initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if ".lora_" in name}
    figures: list[tuple[int, int, int]] = []
    timings: dict[str, float] = {}

    class MeasuredSFTTrainer(trl.SFTTrainer):
        def _prepare_dataset(self, *arguments, **keywords):
            start = time.perf_counter()
            prepared = super()._prepare_dataset(*arguments, **keywords)
            timings["preparation_seconds"] = timings.get("preparation_seconds", 0.0) + time.perf_counter() - start
            return prepared

        def training_step(self, model, inputs, num_items_in_batch=None):
            figures.append(micro_batch_figures(inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")))
            return super().training_step(model, inputs, num_items_in_batch)

    steps: list[dict] = []

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, arguments, state, control, **keywords):
            timings["last"] = time.perf_counter()

        def on_step_end(self, arguments, state, control, **keywords):
            if args.device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            steps.append({"seconds": now - timings["last"], **step_totals(figures)})
            figures.clear()
            timings["last"] = now

    rows = read_jsonl(work / "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="trl-benchmark-") as output_dir:
        trainer = MeasuredSFTTrainer(
            model=model,
            args=trl.SFTConfig(**trl_settings(mode, args, output_dir, read_json(work / "rows.json")["rows_per_step"])),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        initial_adapter = None
        if args.peft != "none":
            # SFTTrainer casts a 4-bit model's adapters to bf16 (the QLoRA paper's advice); minisft keeps them
            # float32: the float32 initial ones go back, so both sides do the same arithmetic from the same start.
            for name, parameter in model.named_parameters():
                if name in initial and parameter.dtype != initial[name].dtype:
                    parameter.data = initial[name]
            initial_adapter = adapter_digest(model)
            del initial  # the copies are not TRL's memory
        trainer.train()
    # The held-out loss by minisft's code, which runs a transformers model: the one inside the PeftModel, adapters on.
    trained = model.get_base_model() if args.peft != "none" else trainer.model
    return {
        "steps": steps,
        "preparation_seconds": timings["preparation_seconds"],
        "final_loss": held_out_loss(trained, tokenizer, work, args),
        "initial_adapter": initial_adapter,
    }


def torchtune_samples(conversations: list[dict], tokenizer, max_length: int) -> list[dict]:
    """torchtune's sample form, {"tokens", "labels"}, from the model's own chat template (HF tokenizer).

    torchtune has no ChatML tokenizer for SmolLM2's vocabulary, so the template is the HF tokenizer's; the
    result is the token list minisft and TRL make (tests/test_benchmark.py checks it). Every token is trained,
    as in the other modes, so labels are the tokens; torchtune's recipe shifts them itself.
    """
    samples = []
    for index, conversation in enumerate(conversations):
        if "messages" not in conversation:
            raise SystemExit(f"torchtune modes take conversations ({{'messages': ...}}); row {index} is not one")
        tokens = tokenizer.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True)
        tokens = list(tokens["input_ids"])[:max_length]  # truncation keeps the start, as minisft and TRL
        samples.append({"tokens": tokens, "labels": list(tokens)})
    return samples


def torchtune_model(config, max_length: int):
    """torchtune's Llama 3.2 builder shaped like this HF Llama (SmolLM2 is one): tied head, plain RoPE.

    scale_factor=1 turns Llama 3.2's RoPE scaling off (every frequency divided by 1), leaving the plain
    RoPE with SmolLM2's base; the logits match the HF model's to 1e-6 relative (measured).
    """
    from torchtune.models.llama3_2 import llama3_2

    rope = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    return llama3_2(
        vocab_size=config.vocab_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        embed_dim=config.hidden_size,
        max_seq_len=max_length,
        rope_base=rope,
        intermediate_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        scale_factor=1,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def run_torchtune(mode: str, args, work: Path) -> dict:
    """torchtune's single-device full fine-tune, as recipes/full_finetune_single_device.py (0.6.1) trains.

    Its parts, used as the recipe sets them up: the llama3_2 builder with the HF weights through
    convert_weights.hf_to_tune; padded_collate_sft (right padding, no attention mask: causal attention alone) or
    PackedDataset (greedy packing in dataset order, whole samples) with padded_collate_packed (a dense
    block-causal mask on CPU; flex attention only on CUDA); CEWithChunkedOutputLoss (8 chunks, the recipe's
    configs); a StatefulDataLoader. The step is the recipe's: each micro-batch's mean loss × its label count
    goes backward, then training.scale_grads by 1 / the step's label count, clip_grad_norm_, AdamW
    (fused, as its configs), zero_grad(set_to_none). No lr scheduler: the recipe's constant. The order of the
    units is the benchmark's seeded permutation, as for minisft, so torchtune_padded trains minisft_padded's
    micro-batches exactly.
    """
    from functools import partial

    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchtune import training
    from torchtune.data import padded_collate_packed, padded_collate_sft
    from torchtune.datasets import PackedDataset
    from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from minisft.machinery.models import load_model, load_tokenizer

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model_source)
    hf_model = load_model(args.model_source, attn_implementation="sdpa")
    config = hf_model.config
    shape = dict(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, dim=config.hidden_size)
    with training.set_default_dtype(torch.float32), device:
        model = torchtune_model(config, args.max_length)
    state = {key: value for key, value in hf_model.state_dict().items() if key != "lm_head.weight"}  # tied
    model.load_state_dict(hf_to_tune(state, **shape))
    # HF's Llama gives its embedding padding_idx=pad_token_id, so the lookup never trains the pad token's row;
    # SmolLM2's pad is <|im_end|>, which every conversation holds. torchtune's builder trains it. Left so, the
    # two jobs differ (tiny model: held-out loss 9.9835 against minisft's 9.9677 after the same 2 steps);
    # with it, torchtune_padded ends at minisft_padded's loss exactly. It costs nothing: the same kernel.
    model.tok_embeddings.padding_idx = config.pad_token_id
    del hf_model, state  # torchtune holds its own copy; the HF one is rebuilt for the held-out loss

    start = time.perf_counter()
    samples = torchtune_samples(read_jsonl(work / "train.jsonl"), tokenizer, args.max_length)
    packed = mode == "torchtune_packed"
    if packed:
        dataset = PackedDataset(samples, max_seq_len=args.max_length, padding_idx=tokenizer.pad_token_id)
        collate = padded_collate_packed
    else:
        dataset = samples
        collate = partial(padded_collate_sft, padding_idx=tokenizer.pad_token_id, ignore_idx=IGNORE_INDEX)
    preparation_seconds = time.perf_counter() - start

    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    per_step, micro_batch = units_per_step(mode, len(dataset), args)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    step_batches = [  # micro-batches of indices, step by step, cut as run_minisft cuts them
        [
            order[step * per_step : (step + 1) * per_step][start : start + micro_batch]
            for start in range(0, per_step, micro_batch)
        ]
        for step in range(args.steps)
    ]
    step_batches = [[group for group in groups if group] for groups in step_batches]
    loader = StatefulDataLoader(
        dataset, batch_sampler=[group for groups in step_batches for group in groups], collate_fn=collate
    )
    batches = iter(loader)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    model.train()
    optimizer.zero_grad()
    steps, step_end = [], time.perf_counter()
    for groups in step_batches:
        figures, num_tokens = [], 0
        for _ in groups:
            batch = {key: value.to(device) for key, value in next(batches).items()}
            labels = batch.pop("labels")
            # Every real token is trained here (and pads are -100 in both collators), so labels mark the real ones.
            figures.append(micro_batch_figures(batch["tokens"], labels, labels != IGNORE_INDEX))
            current_num_tokens = (labels != IGNORE_INDEX).sum()  # before the shift, as the recipe counts
            num_tokens += current_num_tokens
            with autocast:
                logits = model(**batch)
            # The recipe's shift: labels[1:] and one ignored label at the end, instead of slicing the logits.
            shifted = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)))
            loss = loss_fn(logits, shifted) * current_num_tokens
            del logits
            loss.backward()
        training.scale_grads(model, 1 / num_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append({"seconds": now - step_end, **step_totals(figures)})
        step_end = now

    # The held-out loss by the code every mode uses: torchtune's weights back in the HF model.
    del optimizer, loader, batches
    trained = tune_to_hf(model.state_dict(), **shape)
    del model
    hf_model = load_model(args.model_source, attn_implementation="sdpa").to(device)
    missing, unexpected = hf_model.load_state_dict(trained, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # lm_head is tied
    return {
        "steps": steps,
        "preparation_seconds": preparation_seconds,
        "final_loss": held_out_loss(hf_model, tokenizer, work, args),
        "rows": len(dataset),
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def worker(mode: str, args) -> None:
    """Run one mode and write its figures to work/result.json."""
    work = Path(args.work)
    torch.manual_seed(args.seed)
    run = {"trl": run_trl, "torchtune": run_torchtune}.get(mode.split("_")[0], run_minisft)
    result = run(mode, args, work)
    # What the loop logs: the GPU allocator's peak, or this worker's own peak resident memory (not the driver's).
    from minisft.machinery.loop import peak_memory_mb

    result["peak_memory_mb"] = peak_memory_mb(torch.device(args.device))
    (work / f"result-{mode}.json").write_text(json.dumps(result), encoding="utf-8")


# ----------------------------------------------------------------------------- the run


def summarise(result: dict, warmup: int, flops_per_token: float, peak_flops: float) -> dict:
    """One repetition's figures, warm-up steps excluded."""
    measured = result["steps"][warmup:]
    seconds = sum(step["seconds"] for step in measured)
    trained = sum(step["trained_tokens"] for step in measured)
    tokens_per_second = trained / seconds
    return {
        "trained_tokens_per_second": tokens_per_second,
        "first_step_seconds": result["steps"][0]["seconds"],  # compilation included, where a mode compiles
        "slot_efficiency": sum(step["real_tokens"] for step in measured) / sum(step["slots"] for step in measured),
        "step_seconds": statistics.median(step["seconds"] for step in measured),
        "trained_tokens_per_step": trained / len(measured),
        "peak_memory_mb": result["peak_memory_mb"],
        "preparation_seconds": result["preparation_seconds"],
        "final_loss": result["final_loss"],
        "mfu": tokens_per_second * flops_per_token / peak_flops,
        "units": result.get("rows"),  # examples or packed rows the mode trained (not a median figure)
    }


FIGURES = {  # name: (column title, format)
    "trained_tokens_per_second": ("trained tok/s", "{:,.0f}"),
    "slot_efficiency": ("slot eff.", "{:.2f}"),
    "step_seconds": ("step s", "{:.2f}"),
    "first_step_seconds": ("1st step s", "{:.2f}"),
    "trained_tokens_per_step": ("tok/step", "{:,.0f}"),
    "peak_memory_mb": ("peak MB", "{:,.0f}"),
    "preparation_seconds": ("prep s", "{:.2f}"),
    "final_loss": ("final loss", "{:.4f}"),
    "mfu": ("MFU", "{:.1%}"),
}


def print_table(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()  # the title is printed as one line above it: a table's title wraps at the table's width
    table.add_column("mode")
    for heading, _ in FIGURES.values():
        table.add_column(heading, justify="right")
    for mode, entry in summary.items():
        cells = []
        for name, (_, form) in FIGURES.items():
            ratio = entry["ratio_to_" + REFERENCE].get(name)
            cells.append(form.format(entry["median"][name]) + (f" [dim]{ratio:.2f}×[/dim]" if ratio else ""))
        table.add_row(mode, *cells)
    console = Console(width=200)
    console.print(title, highlight=False)
    console.print(table)


def targets(summary: dict, device: str, model: str, peft: str = "none") -> list[dict]:
    """The issues' targets, each with the measured value and whether it is met.

    Under --peft lora: minisft LoRA (bfd) against TRL + peft (packed), tokens/s and peak memory (issue 32).
    QLoRA has no targets of its own: its table, with every figure's ratio to TRL + peft, is reported beside them.
    """
    rate = {mode: entry["median"]["trained_tokens_per_second"] for mode, entry in summary.items()}
    memory = {mode: entry["median"]["peak_memory_mb"] for mode, entry in summary.items()}
    found = []

    def check(name: str, value: float, goal: float, higher: bool = True):
        found.append({"target": name, "value": value, "goal": goal, "met": value >= goal if higher else value <= goal})

    if peft != "none":
        if peft == "lora" and {"minisft_bfd", "trl_packed"} <= rate.keys():
            goal = 2.0 if model == "tiny" else 1.5
            check("minisft LoRA (bfd) / TRL + peft (packed), tokens/s", rate["minisft_bfd"] / rate["trl_packed"], goal)
            ours, theirs = memory["minisft_bfd"], memory["trl_packed"]
            check("peak memory minisft LoRA (bfd) / TRL + peft (packed)", ours / theirs, 0.5, higher=False)
        return found

    if {"minisft_bfd", "minisft_padded"} <= rate.keys():
        check("minisft packed (bfd) / minisft padded, tokens/s", rate["minisft_bfd"] / rate["minisft_padded"], 2.0)
    if {"minisft_bfd", "trl_packed"} <= rate.keys():
        goal = 2.0 if model == "tiny" else 1.5
        check("minisft packed (bfd) / TRL packed, tokens/s", rate["minisft_bfd"] / rate["trl_packed"], goal)
    for ours, theirs in (("minisft_padded", "trl_padded"), ("minisft_bfd", "trl_packed")):
        if {ours, theirs} <= memory.keys():
            check(f"peak memory {ours} / {theirs}", memory[ours] / memory[theirs], 0.5, higher=False)
    if "minisft_bfd" in summary:
        check("MFU of minisft packed (bfd)", summary["minisft_bfd"]["median"]["mfu"], 0.60 if device == "cpu" else 0.45)
    if device == "cpu" and model != "tiny" and {"minisft_bfd", "minisft_bfd_compiled"} & summary.keys():
        # issue 32: SmolLM2 full fine-tune packed, 70% MFU with or without --torch_compile, whichever is faster
        best = max(summary[mode]["median"]["mfu"] for mode in ("minisft_bfd", "minisft_bfd_compiled") & summary.keys())
        check("MFU of minisft packed (bfd), eager or compiled, the faster", best, 0.70)
    return found


def bar_chart(summary: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = ("trained_tokens_per_second", "slot_efficiency", "peak_memory_mb", "mfu")
    figure, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4))
    modes = list(summary)
    palette = {"minisft": "tab:blue", "trl": "tab:orange", "torchtune": "tab:green"}
    colours = [palette[mode.split("_")[0]] for mode in modes]
    for axis, name in zip(axes, shown):
        axis.bar(range(len(modes)), [summary[mode]["median"][name] for mode in modes], color=colours)
        axis.set_xticks(range(len(modes)), [mode.replace("_", "\n", 1) for mode in modes], fontsize=7)
        axis.set_title(FIGURES[name][0])
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        found["trl"] = trl.__version__
    except ImportError:
        pass
    return found


def peft_skips(args) -> dict[str, str]:
    """{mode: why it is skipped} under --peft: torchtune's modes, and every mode where 4-bit does not run."""
    from minisft.errors import UserError

    reasons = {}
    if args.peft != "none":
        reasons["torchtune"] = f"torchtune's LoRA recipes are not wired in (--peft {args.peft})"
    if args.peft == "qlora":
        try:
            four_bit_base(args)  # quantizes one small block first: a device bitsandbytes cannot serve says so here
        except UserError as error:
            reasons = dict.fromkeys(("minisft", "trl", "torchtune"), str(error))
    return {mode: reasons[mode.split("_")[0]] for mode in args.modes if mode.split("_")[0] in reasons}


def torchtune_environment(path: str | None) -> tuple[dict, str | None, str]:
    """(environment for a torchtune worker, torchtune's version or None, why not) with `path` first on PYTHONPATH.

    torchtune lives outside the test environment (its torchao pin would not fit there), so its workers get the
    folder on PYTHONPATH; one import in a child process says whether it runs with this torch.
    """
    environment = dict(os.environ)
    if path and Path(path).is_dir():
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [path, environment.get("PYTHONPATH")]))
    probe = "import torchtune.models.llama3_2, torchtune.datasets, torchtune.modules.loss, torchtune; "
    probe += "print(torchtune.__version__)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment)
    if found.returncode:
        lines = found.stderr.strip().splitlines() or ["no output"]
        return environment, None, f"torchtune does not import (PYTHONPATH {path!r}): {lines[-1]}"
    return environment, found.stdout.strip().splitlines()[-1], ""


def prepare_workspace(args, work: Path) -> tuple[object, list[int]]:
    """The data, the initial model (saved once, so every mode starts from the same weights), and the row count."""
    from minisft.machinery.config import DataConfig
    from minisft.machinery.data_files import load_splits
    from minisft.machinery.models import load_tokenizer, model_config, tiny_model
    from minisft.machinery.pack_plans import pack_prepared
    from minisft.machinery.prepare import prepare_dataset

    count = args.steps * args.examples_per_step
    if args.data:
        rows = [{key: value for key, value in row.items() if key != "origin"} for row in load_splits(args.data).train]
        train, held_out = rows[:count], rows[count : count + args.held_out]
        if len(train) < count:
            raise SystemExit(f"{args.data} has {len(rows)} rows; the run needs {count} + {args.held_out} held out.")
    else:
        train = synthetic_conversations(count, args.seed)
        held_out = synthetic_conversations(args.held_out, args.seed + 1000)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "held_out.jsonl", held_out)

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    if args.model == "tiny":
        model = tiny_model(tokenizer, **TINY_SHAPE, seed=args.seed)
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        args.model_source = str(work / "model")
        config = model.config
    else:
        args.model_source = "smollm2-135m-instruct"
        config = model_config(args.model_source)
    examples = prepare_dataset(train, tokenizer, DataConfig(max_length=args.max_length)).examples
    rows = pack_prepared(examples, args.max_length, "bfd").stats.rows
    (work / "rows.json").write_text(json.dumps({"rows_per_step": rows_per_step(rows, args.steps)}), encoding="utf-8")
    return config, [len(example["input_ids"]) for example in examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=["tiny", "smollm2-135m"], help="default: tiny on cpu")
    parser.add_argument("--data", help="a JSONL (or any dataset minisft reads) instead of the synthetic mix")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup_steps", type=int, default=1, help="first steps left out of the timings")
    parser.add_argument("--examples_per_step", type=int, default=8)
    parser.add_argument(
        "--micro_batch_size", type=int, default=8, help="examples per micro-batch, unpacked modes (TRL's default: 8)"
    )
    parser.add_argument(
        "--torch_compile_mode", choices=["default", "max-autotune-no-cudagraphs"], help="minisft_bfd_compiled's mode"
    )
    parser.add_argument("--rows_per_micro_batch", type=int, default=1, help="rows per micro-batch (packed modes)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every mode, interleaved; medians reported")
    parser.add_argument("--held_out", type=int, default=8, help="held-out conversations for the final loss")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="both sides alike, LoRA too")
    parser.add_argument(
        "--peft", default="none", choices=["none", "lora", "qlora"], help="train LoRA adapters (over a 4-bit base)"
    )
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=32)
    parser.add_argument("--lora_target_modules", nargs="+", default=["all-linear"], help="names, one regex, all-linear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, help="GPU bf16 dense peak, if the card is not known")
    parser.add_argument(
        "--torchtune_path",
        default=os.environ.get("MINISFT_TORCHTUNE_PATH", TORCHTUNE_PATH),
        help="folder with torchtune 0.6.1 and its pins (see the docstring), put on its workers' PYTHONPATH",
    )
    parser.add_argument(
        "--output", help="path stem of .json/.png (default: benchmarks/results/packing_throughput[_PEFT])"
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model_source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    args.model = args.model or ("tiny" if args.device == "cpu" else "smollm2-135m")
    if args.warmup_steps >= args.steps:
        parser.error("--steps must be larger than --warmup_steps: nothing would be measured")

    suffix = "" if args.peft == "none" else f"_{args.peft}"
    args.output = args.output or f"benchmarks/results/packing_throughput{suffix}"

    started, load_at_start = time.perf_counter(), os.getloadavg()
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    torchtune_env, torchtune_version, skipped = environment, None, peft_skips(args)
    for mode, reason in skipped.items():
        print(f"skipping {mode}: {reason}", file=sys.stderr)
    args.modes = [mode for mode in args.modes if mode not in skipped]
    if any(mode.startswith("torchtune") for mode in args.modes):
        torchtune_env, torchtune_version, reason = torchtune_environment(args.torchtune_path)
        torchtune_env["TOKENIZERS_PARALLELISM"] = "false"
        if reason:
            skipped = {mode: reason for mode in args.modes if mode.startswith("torchtune")}
            args.modes = [mode for mode in args.modes if mode not in skipped]
            print(f"skipping {', '.join(skipped)}: {reason}", file=sys.stderr)
    # On a CPU the peak is measured before every worker, in this process, and the run's median is the peak: a
    # shared machine's speed drifts between minutes (one measurement has read 89 to 197 GFLOP/s on this machine),
    # and measuring inside a worker would measure its settings too (a fixed mmap threshold, compile workers).
    cpu_peaks = []
    if args.device == "cpu":
        peak_source = "the median of fp32 2048³ matmuls measured on this machine before each worker"
    else:
        peak_flops, peak_source = gpu_peak_flops(args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="packing-throughput-") as directory:
        work = Path(directory)
        config, lengths = prepare_workspace(args, work)
        adapters = adapter_parameters(config, args) if args.peft != "none" else 0
        if args.peft == "none":
            flops_per_token = model_flops_per_trained_token(config, lengths)
        else:
            flops_per_token = peft_flops_per_trained_token(config, lengths, adapters)
        repetitions: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        initial_adapters: set[str] = set()  # the digests of every peft run's initial adapter: one, or a bug
        for repeat in range(args.repeats):
            shift = repeat % max(len(args.modes), 1)  # (every mode may have been skipped: the JSON still says why)
            order = args.modes[shift:] + args.modes[:shift]
            for mode in order:
                print(f"repetition {repeat + 1}/{args.repeats}: {mode}", file=sys.stderr, flush=True)
                cpu_peaks += [cpu_matmul_flops()] if args.device == "cpu" else []
                command = [sys.executable, __file__, "--worker", mode, "--work", str(work)]
                command += ["--model_source", args.model_source] + passed_on(args)
                subprocess.run(command, check=True, env=torchtune_env if mode.startswith("torchtune") else environment)
                repetitions[mode].append(read_json(work / f"result-{mode}.json"))
                initial_adapters.update([repetitions[mode][-1]["initial_adapter"]] if args.peft != "none" else [])
        if len(initial_adapters) > 1:
            raise SystemExit(f"the modes started from different adapters (digests {sorted(initial_adapters)})")
    if args.device == "cpu":
        peak_flops = statistics.median(cpu_peaks)
    for mode, results in repetitions.items():
        repetitions[mode] = [summarise(result, args.warmup_steps, flops_per_token, peak_flops) for result in results]

    summary = {}
    for mode, runs in repetitions.items():
        summary[mode] = {"median": {name: statistics.median(run[name] for run in runs) for name in FIGURES}}
        summary[mode]["repetitions"] = runs
    for mode in summary:
        reference = summary.get(REFERENCE)
        summary[mode]["ratio_to_" + REFERENCE] = (
            {name: summary[mode]["median"][name] / reference["median"][name] for name in FIGURES} if reference else {}
        )
    parameters = per_layer_parameters(config) * config.num_hidden_layers + config.vocab_size * config.hidden_size
    title = (
        f"{args.model} ({parameters / 1e6:.1f}M parameters) on {args.device}, max_length {args.max_length}, "
        f"{args.steps} steps of {args.examples_per_step} examples ({args.warmup_steps} warm-up), "
        f"medians of {args.repeats} interleaved repetitions"
    )
    if args.peft != "none":
        title += (
            f"; {'QLoRA (nf4 base)' if args.peft == 'qlora' else 'LoRA'} r {args.lora_r}, alpha {args.lora_alpha:g}, "
            f"on {' '.join(args.lora_target_modules)}: {adapters / 1e6:.2f}M adapter parameters"
        )
    print_table(summary, title)
    met = targets(summary, args.device, args.model, args.peft)
    for target in met:
        verdict = "met " if target["met"] else "MISS"
        print(f"{verdict}  {target['target']}: {target['value']:.2f} (goal {target['goal']})")
    if args.peft == "none":
        count = "6 × non-embedding parameters × input tokens + 6 × vocab × hidden × trained tokens"
    else:  # the frozen base: no weight gradients (module docstring)
        count = "(4 × frozen non-embedding parameters - 2 × layer 0's q, k, v + 6 × adapter parameters) × input "
        count += "tokens + 4 × vocab × hidden × trained tokens"
    print(
        f"MFU = trained tokens/s × {flops_per_token / 1e6:.1f} MFLOP per trained token / peak {peak_flops / 1e9:,.0f} "
        f"GFLOP/s ({peak_source}). FLOPs: {count} + 12 × layers × hidden × Σ document length²."
    )
    record = {
        "title": title,
        "arguments": {key: value for key, value in vars(args).items() if key not in ("worker", "work")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "load_average": {"start": load_at_start, "end": os.getloadavg()},  # 1, 5, 15 minutes
        "versions": {**versions(), **({"torchtune": torchtune_version} if torchtune_version else {})},
        "skipped": skipped,
        "adapter_parameters": adapters,
        "initial_adapter": sorted(initial_adapters),  # one digest: every peft mode started from the same adapter
        "peak_flops": peak_flops,
        "cpu_peak_flops_measured": cpu_peaks,
        "peak_flops_source": peak_source,
        "model_flops_per_trained_token": flops_per_token,
        "data": {"examples": len(lengths), "median_tokens": statistics.median(lengths), "max_tokens": max(lengths)},
        "modes": summary,
        "targets": met,
        "seconds": time.perf_counter() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    charted = bar_chart(summary, output.with_suffix(".png"), title)
    print(f"wrote {output.with_suffix('.json')}" + (f" and {output.with_suffix('.png')}" if charted else ""))
    print(f"took {record['seconds']:.0f} s")


def passed_on(args) -> list[str]:
    """The settings a worker needs, as flags."""
    flags = []
    for name in ("device", "max_length", "steps", "examples_per_step", "micro_batch_size", "rows_per_micro_batch"):
        flags += [f"--{name}", str(getattr(args, name))]
    flags += ["--learning_rate", str(args.learning_rate), "--seed", str(args.seed)]
    flags += ["--peft", args.peft, "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha)]
    flags += ["--torch_compile_mode", args.torch_compile_mode] if args.torch_compile_mode else []
    return flags + ["--lora_target_modules", *args.lora_target_modules]


if __name__ == "__main__":
    main()
