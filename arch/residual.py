"""The residual stream as a *state*, and how sub-layers update it (registry `residual`).

Plain residual carries ``x``; momentum variants carry ``(x, v)``; Adam-style ones ``(x, m, s)``.
A plugin is a ``ResidualUpdate`` subclass, instantiated once per sub-layer (so learned scalars
are per sub-layer). The block hands it an *oracle*, ``h -> sublayer(norm(h))``, and the plugin
decides where to evaluate it and how to fold the result into the state: heavy-ball or Nesterov
variants call it at a look-ahead point, Adam-style ones keep moment streams.
Pipeline stages send the whole state dict to the next stage, so every stream is a [B, T, ...]
tensor that never mixes tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from arch.config import ModelConfig
from arch.layers_registry import RESIDUALS
from arch.options import resolve_options
from arch.tensor_parallel_plan import REPLICATED, TensorParallelPlan

State = dict[str, torch.Tensor]
Oracle = Callable[[torch.Tensor], torch.Tensor]


class StateInit(nn.Module):
    """Builds the initial residual state from the token embeddings: here just ``{"x": x0}``."""

    def forward(self, x0: torch.Tensor, input_ids: torch.Tensor) -> State:
        return {"x": x0}


class ResidualUpdate(nn.Module):
    """Base class of residual plugins. Subclasses set ``state_names`` and ``forward``."""

    state_names: ClassVar[tuple[str, ...]] = ("x",)
    # Every option the plugin reads from `model.residual.options`, with its default; None: the
    # plugin declares none and gets the options unchecked (see `arch.options`).
    option_defaults: ClassVar[dict[str, Any] | None] = None
    # Cached decoding (`arch.cache`) runs the update on the new tokens' state only, which is
    # exact because no stream mixes tokens; a plugin that breaks that rule sets this False.
    supports_cache: ClassVar[bool] = True
    # How many times ``forward`` evaluates its oracle: sub-layers' auxiliary losses (MoE
    # balance) are averaged over every evaluation in the model (`arch.aux_losses`).
    oracle_calls: ClassVar[int] = 1

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index

    @classmethod
    def options_of(cls, cfg: ModelConfig) -> dict[str, Any]:
        """``model.residual.options`` over the defaults; ConfigError on an unknown option."""
        return resolve_options(
            cls, cfg.residual.options, "model.residual.options", cfg.residual.name
        )

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Residual updates act on the replicated stream: every parameter replicated (a plugin
        that splits something overrides this and builds its local form itself)."""
        return REPLICATED

    @classmethod
    def build_state_init(cls, cfg: ModelConfig) -> nn.Module:
        """The module that turns embeddings into the initial state (may hold parameters)."""
        return StateInit()

    def forward(self, state: State, oracle: Oracle) -> State:
        raise NotImplementedError


@RESIDUALS.register("plain")
class PlainResidual(ResidualUpdate):
    """x <- x + f(norm(x)): the ordinary pre-norm residual connection."""

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        return {**state, "x": x + oracle(x)}
