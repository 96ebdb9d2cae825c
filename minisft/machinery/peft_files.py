"""peft's adapter files: what minisft writes for a LoRA run, and reads to continue or chat with one.

minisft keeps peft's file format, so adapters move both ways between minisft and peft. A folder holds

    adapter_config.json          peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules, use_rslora,
                                 use_dora, modules_to_save, base_model_name_or_path (for the
                                 embedded model its converted folder, so that peft loads it offline)
    adapter_model.safetensors    the trained tensors, under peft's key names:
        base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight            (r × d_in)
        base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight            (d_out × r)
        base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector    (d_out, DoRA's m)
        base_model.model.model.embed_tokens.weight                                (a module to save, whole)

A key is the parameter's name in the adapted model behind peft's wrapper prefix, base_model.model.
Loading injects the layers the config names (minisft/sft/lora.py) into a plain base model and copies
the tensors in; a file that does not fit the model is named, with what is missing or misshapen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minisft.sft.lora import (
    LoraError,
    LoraLinear,
    LoraSettings,
    find_modules_to_save,
    inject_lora,
    lora_layers,
    matches,
)

from .models import loadable_base_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The trained tensors under peft's saved key names."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector  # no .weight, as peft
    for name in find_modules_to_save(model, settings.modules_to_save):
        for parameter_name, parameter in model.get_submodule(name).named_parameters():
            state[f"{PEFT_PREFIX}{name}.{parameter_name}"] = parameter
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def save_adapter(
    model: nn.Module, directory: str | Path, settings: LoraSettings, base_model_name_or_path: str | None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """adapter_model.safetensors and adapter_config.json, as peft writes them; `tensors`: the adapter's tensors
    when they were gathered already (from FSDP's shards, machinery/distributed.py), else taken from the model.
    The embedded model's name is recorded as its converted folder: peft cannot load a name only minisft knows."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, settings) if tensors is None else tensors
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": loadable_base_name(base_model_name_or_path) if base_model_name_or_path else None,
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
