"""Weight preconditioners (registry `preconditioner`): how a projection's weight is parameterised.

Every projection in the model is made by `make_linear`, so a preconditioner plugin (e.g. the PC
layer) reaches all of them without the mixers knowing. A plugin is
``fn(linear: nn.Linear, cfg: PreconditionerConfig, role: str) -> nn.Module``; ``role`` is the
projection's name inside its sub-layer (wq, wk, wv, wo, w1, w2, w3, ...) so a plugin can target some.
"""

from __future__ import annotations

from torch import nn

from arch.config import ModelConfig, PreconditionerConfig
from arch.layers_registry import PRECONDITIONERS


@PRECONDITIONERS.register("none")
def no_preconditioner(linear: nn.Linear, cfg: PreconditionerConfig, role: str) -> nn.Module:
    """Plain weights: the projection is used as it is."""
    return linear


no_preconditioner.option_defaults = {}  # type: ignore[attr-defined]  (takes no options)


def make_linear(cfg: ModelConfig, in_features: int, out_features: int, role: str) -> nn.Module:
    """A bias-free projection, wrapped by the configured preconditioner."""
    linear = nn.Linear(in_features, out_features, bias=False)
    return PRECONDITIONERS.get(cfg.preconditioner.name)(linear, cfg.preconditioner, role)
