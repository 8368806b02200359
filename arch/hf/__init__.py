"""Hugging Face interop: one adapter per HF family, looked up by config.json's ``model_type``.

Adding a family is one new file in this package: a subclass of `arch.hf.base.HFAdapter`
decorated with `register_family` (every module here is imported, so it registers itself).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arch.config import ModelConfig
from arch.hf.base import (
    FAMILIES,
    HFAdapter,
    HFInteropError,
    load_hf_state,
    read_hf_config,
    split_layers,
    unsupported,
    write_hf_dir,
)
from arch.model import HybridLM, build_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def hf_dict(hf: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """A config.json dict from itself or from a transformers config object (``to_dict``)."""
    return hf if isinstance(hf, Mapping) else hf.to_dict()


def adapter_for(hf: Mapping[str, Any] | Any) -> HFAdapter:
    """The adapter of an HF config's ``model_type``; an error naming the field otherwise."""
    model_type = hf_dict(hf).get("model_type")
    if model_type not in FAMILIES:
        raise unsupported("model_type", model_type, f"only {', '.join(FAMILIES)} can be imported")
    return FAMILIES[model_type]


def adapter_for_model(cfg: ModelConfig) -> HFAdapter:
    """The family a HybridLM is exported as (a model of HF layers: mixer + FFN pairs)."""
    mixers, ffns = split_layers(cfg)
    for adapter in FAMILIES.values():
        if adapter.exports(mixers, ffns):
            return adapter
    raise HFInteropError(
        f"cannot export to Hugging Face: no family ({', '.join(FAMILIES)}) has mixers "
        f"{sorted(set(mixers))} with FFNs {sorted(set(ffns))}"
    )


def config_from_hf(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """The ModelConfig that reproduces an HF config (a config.json dict or config object)."""
    return adapter_for(hf).config_from_hf(hf_dict(hf))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the HF model that equals ``cfg``."""
    return adapter_for_model(cfg).config_to_hf(cfg)


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists()


def import_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) of a local HF model directory."""
    hf = read_hf_config(hf_dir)
    adapter = adapter_for(hf)
    cfg = adapter.config_from_hf(hf)
    return cfg, adapter.from_hf(load_hf_state(hf_dir), cfg)


def export_hf_dir(cfg: ModelConfig, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' from_pretrained loads."""
    adapter = adapter_for_model(cfg)
    return write_hf_dir(adapter.config_to_hf(cfg), adapter.to_hf(state, cfg), out_dir)


def from_hf(
    hf_model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    hf_config: Any | None = None,
    **overrides: Any,
) -> HybridLM:
    """A HybridLM with the weights of a transformers model (or of an HF state dict and its
    config). ``hf_config`` defaults to the model's ``.config``; ``overrides`` set ModelConfig
    fields or nested ones with dots, e.g. ``**{"mamba.scan": "loop"}``."""
    if isinstance(hf_model_or_state_dict, nn.Module):
        hf_config = hf_config or hf_model_or_state_dict.config
        hf_state = hf_model_or_state_dict.state_dict()
    else:
        hf_state = hf_model_or_state_dict
    if hf_config is None:
        raise HFInteropError("from_hf needs hf_config with a state dict")
    adapter = adapter_for(hf_config)
    cfg = adapter.config_from_hf(hf_dict(hf_config))
    for key, value in overrides.items():
        *path, name = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    model = build_model(cfg, seed=0)
    model.load_state_dict(adapter.from_hf(hf_state, cfg), strict=True)
    return model


__all__ = [
    "FAMILIES",
    "HFAdapter",
    "HFInteropError",
    "adapter_for",
    "adapter_for_model",
    "config_from_hf",
    "config_to_hf",
    "export_hf_dir",
    "from_hf",
    "import_hf_dir",
    "is_hf_dir",
    "read_hf_config",
]
