"""Momentum residual updates (Paper A, "Momentum Streams", arXiv 2605.24425): HB, Yurii, TMM.

Depth plays the optimizer's iteration index: each sub-layer is one step, its oracle
``O(h) = sublayer(norm(h))`` plays the negative gradient, and a velocity stream ``v`` travels
through the layers beside ``x``. Per sub-layer (each with its own learned scalars and LN_v)::

    heavy_ball   v <- LN_v(beta v + gamma O(x));          x <- x + v
    yurii        v <- LN_v(beta v + gamma O(x + mu v));   x <- x + v          (Nesterov)
    tmm          v <- LN_v(beta v + gamma O(x + mu v));   x <- x + nu v       (TMMFormer)

mu, beta (and the Adam family's beta1, beta2, lambda) are ``sigmoid(raw)``, the step sizes gamma
and nu ``softplus(raw)``; raw starts at 0 (0.5 / ln 2), except nu (raw log(e - 1): nu = 1) and
AdamW's lambda (raw -5), as in the released code. ``v0`` comes from a learned token embedding
(``vel_init=embed``; the paper adds a learned position embedding, which this model does not have,
so only the token embedding is used) or is zero (``vel_init=zero``). Every stream is per token.

This module also holds the base class ``StreamResidual`` shared with ``arch.residual_adaptive``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import ModelConfig
from arch.layers_registry import RESIDUALS
from arch.registry import ConfigError
from arch.residual import Oracle, ResidualUpdate, State

UNIT = "unit"  # sigmoid(raw): a coefficient in (0, 1)
POS = "pos"  # softplus(raw): a step size > 0
NU_RAW_INIT = math.log(math.e - 1)  # softplus(log(e - 1)) = 1
NORMS = ("layernorm", "rmsnorm", "none")
VEL_INITS = ("embed", "zero")


def scalar_value(raw: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.sigmoid(raw) if kind == UNIT else F.softplus(raw)


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    """LN_v / LN_u: LayerNorm without bias (the paper's), RMSNorm, or nothing."""
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=eps, bias=False)
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=eps)
    return nn.Identity()


class StreamInit(nn.Module):
    """Initial state: ``x0`` plus each stream as a learned embedding, zeros, ones or identity.

    ``streams`` maps a stream name to ``embed`` (a separate learned token embedding, or zeros when
    ``vel_init=zero``), ``ones`` ([B, T, D] of ones) or ``identity`` (one I_{head_dim} per token).
    """

    def __init__(self, cfg: ModelConfig, streams: dict[str, str], vel_init: str) -> None:
        super().__init__()
        self.streams = dict(streams)
        self.vel_init = vel_init
        self.head_dim = cfg.head_dim
        embedded = [n for n, kind in streams.items() if kind == "embed" and vel_init == "embed"]
        self.embeds = nn.ModuleDict(
            {n: nn.Embedding(cfg.padded_vocab_size, cfg.d_model) for n in embedded}
        )

    def forward(self, x0: torch.Tensor, input_ids: torch.Tensor) -> State:
        state = {"x": x0}
        for name, kind in self.streams.items():
            if kind == "embed":
                state[name] = (
                    self.embeds[name](input_ids) if name in self.embeds else torch.zeros_like(x0)
                )
            elif kind == "ones":
                state[name] = torch.ones_like(x0)
            else:  # identity
                eye = torch.eye(self.head_dim, dtype=x0.dtype, device=x0.device)
                state[name] = eye.expand(*x0.shape[:-1], self.head_dim, self.head_dim)
        return state


class StreamResidual(ResidualUpdate):
    """Base of the optimizer-inspired residuals: learned scalars, extra streams, their options.

    Subclasses declare ``scalars`` (name -> (UNIT | POS, raw initial value)), ``streams`` (extra
    state name -> how it starts, see ``StreamInit``) and ``option_defaults``.
    """

    scalars: ClassVar[dict[str, tuple[str, float]]] = {}
    streams: ClassVar[dict[str, str]] = {}
    option_defaults: ClassVar[dict[str, Any]] = {}
    option_choices: ClassVar[dict[str, tuple]] = {
        "vel_init": VEL_INITS,
        "velocity_norm": NORMS,
        "update_norm": NORMS,
    }

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__(cfg, layer_index)
        self.options = self.options_of(cfg)
        self.n_heads = cfg.n_heads
        for name, (_, raw) in self.scalars.items():
            self.register_parameter(f"{name}_raw", nn.Parameter(torch.full((1,), float(raw))))

    def value(self, name: str) -> torch.Tensor:
        """The learned scalar ``name`` through its sigmoid / softplus."""
        return scalar_value(getattr(self, f"{name}_raw"), self.scalars[name][0])

    @classmethod
    def build_state_init(cls, cfg: ModelConfig) -> nn.Module:
        return StreamInit(cfg, cls.streams, cls.options_of(cfg).get("vel_init", "zero"))

    @staticmethod
    def check_options(options: dict[str, Any], key: str) -> None:
        for name in ("eps", "damping"):
            if name in options and not (
                isinstance(options[name], int | float) and options[name] > 0
            ):
                raise ConfigError(
                    f"{key}.{name}", f"must be a positive number, got {options[name]!r}"
                )
        for name in ("ns_steps", "newton_steps"):
            value = options.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}.{name}", f"must be an integer >= 1, got {value!r}")


class MomentumResidual(StreamResidual):
    """Shared velocity update; ``mu`` (look-ahead) and ``nu`` (iterate step) are optional."""

    state_names = ("x", "v")
    streams = {"v": "embed"}
    option_defaults = {"vel_init": "embed", "velocity_norm": "layernorm"}

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__(cfg, layer_index)
        self.ln_v = make_norm(self.options["velocity_norm"], cfg.d_model, cfg.norm_eps)

    def forward(self, state: State, oracle: Oracle) -> State:
        x, v = state["x"], state["v"]
        y = x + self.value("mu") * v if "mu" in self.scalars else x
        v = self.ln_v(self.value("beta") * v + self.value("gamma") * oracle(y))
        x = x + (self.value("nu") * v if "nu" in self.scalars else v)
        return {**state, "x": x, "v": v}


@RESIDUALS.register("heavy_ball")
class HeavyBallResidual(MomentumResidual):
    """Heavy ball (HBFormer): v <- LN_v(beta v + gamma f(x)); x <- x + v.

    Options: vel_init (embed | zero), velocity_norm (layernorm | rmsnorm | none).
    """

    scalars = {"beta": (UNIT, 0.0), "gamma": (POS, 0.0)}


@RESIDUALS.register("yurii")
class YuriiResidual(MomentumResidual):
    """Nesterov (YuriiFormer): v <- LN_v(beta v + gamma f(x + mu v)); x <- x + v.

    Options: vel_init (embed | zero), velocity_norm (layernorm | rmsnorm | none).
    """

    scalars = {"mu": (UNIT, 0.0), "beta": (UNIT, 0.0), "gamma": (POS, 0.0)}


@RESIDUALS.register("tmm")
class TMMResidual(MomentumResidual):
    """Triple momentum (TMMFormer): v <- LN_v(beta v + gamma f(x + mu v)); x <- x + nu v.

    nu starts at 1 (then it is YuriiFormer). Options: vel_init (embed | zero),
    velocity_norm (layernorm | rmsnorm | none).
    """

    scalars = {
        "mu": (UNIT, 0.0),
        "beta": (UNIT, 0.0),
        "gamma": (POS, 0.0),
        "nu": (POS, NU_RAW_INIT),
    }


def tmm_coeffs(kappa: float, L: float = 1.0) -> dict[str, float]:
    """Van Scoy, Freeman and Lynch's triple-momentum coefficients for condition number kappa.

    In velocity form (``O = -grad``): ``v <- beta v + alpha O(x + gamma v); x <- x + v``, read
    out at ``x + delta v``; ``||x_out - x*||`` falls as ``rho^k``, ``rho = 1 - 1/sqrt(kappa)``.
    Code mapping to ``tmm``: mu = gamma, beta = beta, gamma = alpha, nu = 1.
    """
    r = 1 - kappa**-0.5
    return {
        "rho": r,
        "alpha": (1 + r) / L,
        "beta": r * r / (2 - r),
        "gamma": r * r / ((1 + r) * (2 - r)),
        "delta": r * r / (1 - r * r),
    }
