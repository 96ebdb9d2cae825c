"""LoRA: train a low-rank update beside frozen Linear layers, then merge it back into them.

Fine-tuning all weights of a d_out × d_in matrix W trains d_out·d_in numbers. LoRA freezes W
and learns its change as the product of two thin matrices, A (r × d_in) and B (d_out × r):

    y = W x + (B A) x · scale          scale = alpha / r     (alpha / √r with rsLoRA)

    x ──┬──▶ [ W, frozen ] ──────────────────────┐
        └──▶ dropout ─▶ [ A ] ─▶ [ B ] ─▶ ·scale ─┴─▶ (+) ─▶ y

With r = 8 on a 576 × 576 projection that is 9,216 trained numbers instead of 331,776. A
starts Kaiming-uniform and B at zero, as in peft, so at step 0 the adapted model *is* the base
model. After training, W + B A · scale can be merged into one matrix: no cost at inference.
B A can be any update of rank up to min(d_out, d_in): a larger r adds trained numbers and nothing
else, and soon more of them than the layer has (the run notes it before the adapters are made).

DoRA (--use_dora, weight-decomposed LoRA) splits each row of the adapted weight into a direction and
a length, and trains the length m (one number per output row) apart from the direction:

    W' = m / ‖W + scale·B A‖ · (W + scale·B A)      ‖·‖: the L2 norm of each row, over the inputs
    y  = W x + (f − 1) · W x + f · scale · B A x  + bias        f = m / ‖W + scale·B A‖

m starts as ‖W‖ (B is zero), so at step 0 DoRA too is the base model. As in peft (and the
paper's §4.3) the norm is a constant to the gradient: it follows B A, but carries none of it.
With dropout on, the last two terms read dropout(x) and W x stays the base's own output.

The layers adapted and the parameters' names are peft's, so an adapter saved in peft's files
(minisft/machinery/peft_files.py) moves both ways between minisft and peft.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minisft.errors import UserError

# peft's default targets when none are given (peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), for
# the model types that transformers has a causal LM for; tests/test_lora_targets.py checks every entry against peft.
PEFT_DEFAULT_TARGETS = {
    **dict.fromkeys(["bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["stablelm", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["q_proj", "v_proj"]),
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
        device = next(base.parameters()).device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32, device=device)
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
        import bitsandbytes  # present: it loaded this 4-bit base

        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)

    def weight_norm(self) -> torch.Tensor:
        """‖W + scale·B A‖ of each output row, in float32; a constant to the gradient (DoRA's §4.3, peft)."""
        with torch.no_grad():
            weight = self.base_weight().to(self.lora_A.weight.dtype) + self.delta_weight()
            return torch.linalg.norm(weight, dim=1)

    def merge(self) -> None:
        if self.merged:
            return
        if type(self.base) is not nn.Linear:
            raise LoraError(
                f"Cannot merge LoRA into a {type(self.base).__name__} (a quantized base). "
                "Load the base model in full precision, load the adapter into it, then merge."
            )
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


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def matches(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex must match the whole name; a plain name matches the name or its last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


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
    if targets == "all-linear":  # every Linear but the output head, as peft
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name in linears if model.get_submodule(name) is not head]
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
    for name in find_modules_to_save(model, settings.modules_to_save):
        parent, child = _parent(model, name)
        # A copy, as peft's ModulesToSaveWrapper makes: a tied embedding is untied from the head.
        trained = copy.deepcopy(getattr(parent, child))
        trained.requires_grad_(True)
        setattr(parent, child, trained)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return LoraReport(targeted, source, trainable, total)


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
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
