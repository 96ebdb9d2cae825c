"""LoRA: train a low-rank update beside frozen Linear layers, and read and write peft's adapter files.

Fine-tuning all weights of a d_out × d_in matrix W trains d_out·d_in numbers. LoRA freezes W
and learns its change as the product of two thin matrices, A (r × d_in) and B (d_out × r):

    y = W x + (B A) x · scale          scale = alpha / r     (alpha / √r with rsLoRA)

    x ──┬──▶ [ W, frozen ] ──────────────────────┐
        └──▶ dropout ─▶ [ A ] ─▶ [ B ] ─▶ ·scale ─┴─▶ (+) ─▶ y

With r = 8 on a 576 × 576 projection that is 9,216 trained numbers instead of 331,776. A
starts Kaiming-uniform and B at zero, as in peft, so at step 0 the adapted model *is* the base
model. After training, W + B A · scale can be merged into one matrix: no cost at inference.
B A can be any update of rank up to min(d_out, d_in): a larger r adds trained numbers and nothing
else, and soon more of them than the layer has (rank_note says so before the adapters are made).

DoRA (--use_dora, weight-decomposed LoRA) splits each row of the adapted weight into a direction and
a length, and trains the length m (one number per output row) apart from the direction:

    W' = m / ‖W + scale·B A‖ · (W + scale·B A)      ‖·‖: the L2 norm of each row, over the inputs
    y  = W x + (f − 1) · W x + f · scale · B A x  + bias        f = m / ‖W + scale·B A‖

m starts as ‖W‖ (B is zero), so at step 0 DoRA too is the base model. As in peft (and the
paper's §4.3) the norm is a constant to the gradient: it follows B A, but carries none of it.
With dropout on, the last two terms read dropout(x) and W x stays the base's own output.

minisft keeps peft's file format, so adapters move both ways between minisft and peft:
adapter_config.json, and adapter_model.safetensors with keys such as
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight    (r × d_in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight    (d_out × r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector    (d_out, DoRA's m)
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minisft.errors import UserError
from minisft.machinery.extras import import_bitsandbytes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft's default targets when none are given (peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), for
# the model types that transformers has a causal LM for; tests/test_lora_targets.py checks every entry against peft.
PEFT_DEFAULT_TARGETS = {
    **dict.fromkeys(
        ["bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm", "gemma", "gemma2"]
        + ["gemma3_text", "qwen2", "qwen3"],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["query", "value"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
}
# Where peft has no default (Qwen3-MoE, OLMo 2, SmolLM3, Granite, ... most of transformers' 190-odd causal LMs), the
# attention's query and value projections are what peft picks for every family that names them so: minisft
# does the same when the model has them, and says so.
FALLBACK_TARGETS = ["q_proj", "v_proj"]


class LoraError(UserError, ValueError):
    """A LoRA setting or adapter file that cannot work with this model; the message says which and why."""


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None  # names, one regex, "all-linear", or None: peft's default
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclass
class LoraReport:
    targeted: list[str]
    source: str  # why these layers: the flag, peft's default for the model type, or minisft's fallback
    trainable: int
    total: int

    def __str__(self) -> str:
        names = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in self.targeted}))
        return (
            f"LoRA on {len(self.targeted)} Linear layers ({names}; {self.source}); trainable parameters "
            f"{self.trainable:,} of {self.total:,} ({self.trainable / self.total:.2%})"
        )


class LoraLinear(nn.Module):
    """A frozen Linear with a trainable low-rank update beside it, and with DoRA a trained length per output row
    (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float, use_dora: bool = False):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        # LoRA weights stay float32 even over a bf16 (or 4-bit) base: their updates are small.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32, device=_device_of(base))
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32, device=_device_of(base))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scale
        self.merged = False
        # DoRA's m, float32 like A and B; named as peft saves it, so checkpoints and adapter files find it by name.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm()) if use_dora else None
        self.merged_factor = None  # DoRA's m / ‖W + scale·B A‖ while merged: unmerging divides by it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        dropped = self.dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(dropped))
        if self.lora_magnitude_vector is None:
            return result + (update * self.scaling).to(result.dtype)
        factor = self.lora_magnitude_vector / self.weight_norm()
        if self.training and not isinstance(self.dropout, nn.Identity):
            base_part = F.linear(dropped, self.base_weight().to(dropped.dtype))  # W dropout(x): no bias
        else:  # dropout(x) is x: reuse the base's W x
            base_part = result if self.base.bias is None else result - self.base.bias
        return result + ((factor - 1) * base_part + factor * update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def base_weight(self) -> torch.Tensor:
        """W as numbers: a 4-bit base's dequantized (a full-size temporary each call, as in peft)."""
        weight = self.base.weight
        if type(self.base) is nn.Linear:
            return weight
        bitsandbytes = import_bitsandbytes("--load_in_4bit")
        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)

    def weight_norm(self) -> torch.Tensor:
        """‖W + scale·B A‖ of each output row, in float32; a constant to the gradient (DoRA's §4.3, peft)."""
        with torch.no_grad():
            weight = self.base_weight().to(self.lora_A.weight.dtype) + self.delta_weight()
            return torch.linalg.norm(weight, dim=1)

    def merge(self) -> None:
        if self.merged:
            return
        self._check_mergeable()
        weight = self.base.weight
        if self.lora_magnitude_vector is None:
            weight.data += self.delta_weight().to(weight.dtype)
        else:
            # The norm of the unmerged weight, as the forward pass takes it; kept, since the merged one differs.
            self.merged_factor = (self.lora_magnitude_vector.detach() / self.weight_norm()).view(-1, 1)
            weight.data = (self.merged_factor * (weight.data + self.delta_weight().detach())).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base.weight
        if self.lora_magnitude_vector is None:
            weight.data -= self.delta_weight().to(weight.dtype)
        else:
            weight.data = (weight.data / self.merged_factor - self.delta_weight().detach()).to(weight.dtype)
            self.merged_factor = None
        self.merged = False

    def _check_mergeable(self) -> None:
        if type(self.base) is not nn.Linear:
            raise LoraError(
                f"Cannot merge LoRA into a {type(self.base).__name__} (a quantized base). "
                "Load the base model in full precision, load the adapter into it, then merge."
            )


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def matches(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex must match the whole name; a plain name matches the name or its last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def parse_target_modules(values: list[str] | str | None) -> list[str] | str | None:
    """Command-line targets: names space- or comma-separated, one regex, or all-linear."""
    if values is None or isinstance(values, str):
        return values
    names = [name for value in values for name in value.split(",") if name]
    if len(names) == 1 and (names[0] == "all-linear" or re.search(r"[\\^$.*+?()\[\]|{}]", names[0])):
        return names[0]
    return names


def default_targets(model: nn.Module) -> tuple[list[str] | str, str]:
    """The targets when --lora_target_modules is not given, and where they come from (for the run's opening lines)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PEFT_DEFAULT_TARGETS:
        return PEFT_DEFAULT_TARGETS[model_type], f"peft's default for {model_type}"
    short_names = {name.rsplit(".", 1)[-1] for name in linear_names(model)}
    if short_names >= set(FALLBACK_TARGETS):
        return FALLBACK_TARGETS, f"peft has no default for {model_type}: its attention's q_proj and v_proj"
    raise LoraError(
        f"No default LoRA targets for model type {model_type!r} (peft has none, and it has no q_proj and v_proj): "
        f"pass --lora_target_modules with some of its Linear layers, {', '.join(sorted(short_names))}; "
        "or all-linear."
    )


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    linears = linear_names(model)
    if targets == "all-linear":
        head = output_head_name(model)
        return [name for name in linears if name != head]
    found = [name for name in linears if matches(name, targets)]
    if not found:
        short_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise LoraError(
            f"--lora_target_modules {targets!r} matches no Linear layer of this model. "
            f"Its Linear layers are named: {', '.join(short_names)} (e.g. {linears[0]!r}); "
            "or use all-linear."
        )
    return found


def resolve_targets(model: nn.Module, settings: LoraSettings) -> tuple[list[str], str]:
    """The Linear layers LoRA adapts, and why these: the flag, peft's default for the model type, or the fallback."""
    if settings.target_modules is None:
        targets, source = default_targets(model)
    else:
        targets, source = settings.target_modules, "--lora_target_modules"
    return find_targets(model, targets), source


def rank_note(model: nn.Module, settings: LoraSettings) -> str | None:
    """A note when r exceeds a targeted layer's rank, min(d_in, d_out): there B A can already be any update of the
    layer, so more rank adds parameters and nothing else, up to more than training the layer itself would."""
    layers = [model.get_submodule(name) for name in resolve_targets(model, settings)[0]]
    over = [layer for layer in layers if settings.r > min(layer.in_features, layer.out_features)]
    if not over:
        return None
    adapters = sum(settings.r * (layer.in_features + layer.out_features) for layer in layers)
    full = sum(layer.in_features * layer.out_features for layer in layers)
    size = sum(parameter.numel() for parameter in model.parameters())
    ranks = ", ".join(str(rank) for rank in sorted({min(layer.in_features, layer.out_features) for layer in over}))
    every = len(over) == len(layers)
    which = "every targeted layer's rank" if every else f"the rank of {len(over)} of {len(layers)} targeted layers"
    return (
        f"note: --lora_r {settings.r} exceeds {which} ({ranks}): the adapters hold {adapters:,} parameters, "
        f"{adapters / (size + adapters):.2%} of the model with them; "
        + (
            f"full fine-tuning of the targeted layers would train fewer ({full:,})"
            if adapters > full
            else "above a layer's rank, more rank adds parameters but no expressiveness"
        )
    )


def inject_lora(model: nn.Module, settings: LoraSettings) -> LoraReport:
    """Freeze the model, wrap the target Linears in LoraLinear, and make modules_to_save trainable copies."""
    if settings.r <= 0:
        raise LoraError(f"--lora_r must be a positive rank, got {settings.r}.")
    if settings.alpha <= 0:
        raise LoraError(f"--lora_alpha must be positive, got {settings.alpha}.")
    targeted, source = resolve_targets(model, settings)
    model.requires_grad_(False)
    for name in targeted:
        parent, child = _parent(model, name)
        layer = LoraLinear(getattr(parent, child), settings.r, settings.scale, settings.dropout, settings.use_dora)
        setattr(parent, child, layer)
    for name in _modules_to_save(model, settings.modules_to_save):
        parent, child = _parent(model, name)
        # A copy, as peft's ModulesToSaveWrapper makes: a tied embedding is untied from the head.
        trained = copy.deepcopy(getattr(parent, child))
        trained.requires_grad_(True)
        setattr(parent, child, trained)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return LoraReport(targeted, source, trainable, total)


def _modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    found = []
    for target in names:
        matched = [name for name, _ in model.named_modules() if name and matches(name, [target])]
        if not matched:
            raise LoraError(f"--lora_modules_to_save {target!r} matches no module of this model.")
        found.extend(matched)
    return found


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


# ----------------------------------------------------------------------------- peft's files


def adapter_state_dict(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The trained tensors under peft's saved key names."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector  # no .weight, as peft
    for name in _modules_to_save(model, settings.modules_to_save):
        for parameter_name, parameter in model.get_submodule(name).named_parameters():
            state[f"{PEFT_PREFIX}{name}.{parameter_name}"] = parameter
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def save_adapter(
    model: nn.Module, directory: str | Path, settings: LoraSettings, base_model_name_or_path: str | None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """adapter_model.safetensors and adapter_config.json, as peft writes them; `tensors`: the adapter's tensors
    when they were gathered already (from FSDP's shards, minisft/distributed.py), else taken from the model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, settings) if tensors is None else tensors
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": saved_target_modules(model, settings),
        "modules_to_save": settings.modules_to_save or None,
        "use_rslora": settings.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": settings.use_dora,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def saved_target_modules(model: nn.Module, settings: LoraSettings) -> list[str] | str:
    """target_modules as peft writes them: a regex or all-linear as given, names as short as stays exact.

    peft matches a plain name against a module's whole name or its last parts, so the short names
    (q_proj) are written when they select exactly the adapted layers, and the full names otherwise
    (model.layers.1.mlp.down_proj must not widen to every down_proj).
    """
    if isinstance(settings.target_modules, str):
        return settings.target_modules
    adapted = sorted(lora_layers(model))
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    candidates = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, LoraLinear))]
    return short if sorted(name for name in candidates if matches(name, short)) == adapted else adapted


def read_adapter_settings(directory: str | Path) -> LoraSettings:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise LoraError(f"{directory}: no {ADAPTER_CONFIG}; a peft LoRA adapter folder holds it and {ADAPTER_WEIGHTS}.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoraError(f"{path}: not a JSON file ({error}).") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path}: expected a JSON object of peft settings, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise LoraError(f"{path}: peft_type is {config.get('peft_type')!r}; minisft reads LoRA adapters only.")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise LoraError(f"{path}: no {', '.join(missing)}; a peft LoRA adapter's config names them.")
    unsupported = {
        key: config[key]
        for key in ("rank_pattern", "alpha_pattern", "fan_in_fan_out", "layers_to_transform")
        if config.get(key)
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise LoraError(f"{path}: these peft options are not supported by minisft's LoRA: {unsupported}")
    return LoraSettings(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=config["target_modules"],
        modules_to_save=list(config.get("modules_to_save") or []),
        use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora", False),
    )


def load_adapter(model: nn.Module, directory: str | Path) -> LoraSettings:
    """Inject the adapter's LoRA layers into a plain base model and load its weights."""
    settings = read_adapter_settings(directory)
    inject_lora(model, settings)
    weights_path = Path(directory) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise LoraError(f"{directory}: no {ADAPTER_WEIGHTS}.")
    try:
        saved = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise LoraError(f"{weights_path}: not a safetensors file, or a damaged one ({error}).") from None
    expected = adapter_state_dict(model, settings)
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise LoraError(
            f"{weights_path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]} "
            "(was it made for another base model?)"
        )
    parameters = {PEFT_PREFIX + name: parameter for name, parameter in _named_adapter_parameters(model)}
    for key, tensor in saved.items():
        parameter = parameters[key]
        if parameter.shape != tensor.shape:
            module = key.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0]
            raise LoraError(
                f"The adapter in {directory} was made for another base model: {module} has shape "
                f"{tuple(tensor.shape)} there and {tuple(parameter.shape)} here."
            )
        with torch.no_grad():
            parameter.copy_(tensor)
    return settings


def _named_adapter_parameters(model: nn.Module):
    return ((name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad)


# ----------------------------------------------------------------------------- merging


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merged_model(model: nn.Module) -> nn.Module:
    """A plain copy of the model with every LoRA update merged in: what `from_pretrained` can load."""
    plain = copy.deepcopy(model)
    for name, layer in lora_layers(plain).items():
        layer.merge()
        parent, child = _parent(plain, name)
        setattr(parent, child, layer.base)
    input_embeddings, output_embeddings = plain.get_input_embeddings(), plain.get_output_embeddings()
    if output_embeddings is not None and input_embeddings.weight is not output_embeddings.weight:
        # modules_to_save untied a tied embedding; saving it tied again would lose the trained copy.
        plain.config.tie_word_embeddings = False
    plain.requires_grad_(True)
    return plain


# ----------------------------------------------------------------------------- QLoRA


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


# ----------------------------------------------------------------------------- the output head, for the loss


def check_head(model) -> None:
    """What head_matrix assumes, checked once when the run is set up rather than on every micro-batch."""
    head = model.get_output_embeddings()
    if isinstance(head, LoraLinear) and (
        not isinstance(head.dropout, nn.Identity) or head.lora_magnitude_vector is not None
    ):
        raise UserError(
            "LoRA on the output head needs --lora_dropout 0 and no --use_dora: the loss folds its update into the "
            "head's matrix."
        )
    if getattr(head, "bias", None) is not None:
        raise UserError("minisft's loss assumes an output head without bias, as in the models it supports.")


def head_matrix(model) -> torch.Tensor:
    """The output head as one matrix (vocabulary × hidden) for minisft/loss.py, a LoRA update folded into it.

    W + (α/r)·B·A is exactly what a LoraLinear head computes without dropout (see check_head), and it
    lets the loss run the head chunk by chunk on the trained positions only.
    """
    head = model.get_output_embeddings()
    if isinstance(head, LoraLinear):
        return head.base.weight + head.delta_weight().to(head.base.weight.dtype)
    return head.weight
