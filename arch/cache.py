"""The inference cache of incremental decoding (`HybridLM.forward_step`, `arch.generate`).

A full forward over ``T`` tokens recomputes every earlier token each time one is generated;
with the cache, each sub-layer keeps what its next step needs and a step costs O(1) tokens of
work (attention: O(T) keys read):

- Mamba-1 (`M`): `MambaState`, the last ``d_conv - 1`` conv inputs (a shift register) and the
  SSM state h [B, d_inner, d_state] (fp32).
- Mamba-2 (`S`): `Mamba2State`, the same for the x|B|C conv and h [B, heads, head_dim, d_state].
- attention (`*`): `KVCache`, keys (RoPE already applied at their absolute positions) and values
  [B, kv_heads, T_kept, head_dim]; ``sliding_window`` keeps only the last ``window - 1``.
- FFNs (`-`, `E`) and the residual streams are per token: they keep nothing. A residual
  plugin that evaluates a mixer at several points per token gets one entry per evaluation.

Entries are replaced, never modified in place, so a step is a pure function of (cache, tokens).
A mixer takes part by providing ``step(h [B, t, D], entry | None, position) -> (y, entry)``
(``None``: a fresh sequence); a plugin that mixes tokens some other way sets
``supports_cache = False`` and `generate` falls back to full recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from arch.registry import UserError


@dataclass
class MambaState:
    """Mamba-1: conv [B, d_inner, d_conv - 1] (pre-conv inputs), ssm [B, d_inner, d_state]."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class Mamba2State:
    """Mamba-2: conv [B, conv_dim, d_conv - 1] (pre-conv x|B|C), ssm [B, heads, head_dim, N]."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class KVCache:
    """Attention: k, v [B, kv_heads, T_kept, head_dim], the last T_kept positions before now."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class InferenceCache:
    """Per sub-layer entry (None: nothing cached yet, or a per-token sub-layer) and the number of
    tokens processed so far (the absolute position of the next token)."""

    layers: list[Any] = field(default_factory=list)
    position: int = 0


class PerEvaluation(list):
    """The entries of a sub-layer whose residual plugin evaluates the mixer more than once per
    token: the k-th evaluation continues from the k-th entry (see `SubLayer.step`)."""


class CacheUnsupportedError(UserError):
    """The model has a sub-layer that cannot be stepped one token at a time."""


def cache_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` (a `HybridLM`) cannot decode with a cache, or None when it can."""
    layers = getattr(model, "layers", None)
    if layers is None or not callable(getattr(model, "forward_step", None)):
        return f"{type(model).__name__} has no forward_step"
    for i, layer in enumerate(layers):
        inner, residual = layer.inner, layer.residual
        where = f"sub-layer {i} ({layer.symbol!r}, {type(inner).__name__})"
        if not getattr(residual, "supports_cache", True):
            return f"{where}: residual {type(residual).__name__} mixes tokens"
        if not getattr(inner, "supports_cache", True):
            return f"{where} does not support cached decoding"
        if layer.kind == "mixer" and not callable(getattr(inner, "step", None)):
            return f"{where}: the mixer has no step(h, entry, position) method"
    return None


def new_cache(model: nn.Module) -> InferenceCache:
    """An empty cache for ``model``; CacheUnsupportedError names the sub-layer that cannot step."""
    reason = cache_unsupported_reason(model)
    if reason is not None:
        raise CacheUnsupportedError(
            f"cached decoding is not supported: {reason}; use generate(..., use_cache=False)"
        )
    return InferenceCache(layers=[None] * len(model.layers))
