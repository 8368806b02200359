"""The PC layer (Paper B, arXiv 2606.06470): polynomial weight preconditioning, preconditioner `pc`.

A wrapped projection with raw weight W (out x in) computes, as released (torchtitan pc_layer)::

    sigma = u^T W v + eps                  u, v: buffers from a warm-started power iteration
    P     = Wn q(Wn^T Wn)  (out >= in)     Wn = W / sigma; q(Wn Wn^T) Wn when wide (same result)
    W_eff = gamma * sg(sigma) * P          sg: stop-gradient; gamma learned (init 1)

so the normalised singular values go through the odd polynomial g(s) = s q(s^2) (g(1) = 1), which
lifts small ones by q(0) and flattens the bulk near 1. sigma carries gradient through the
normalisation only, so the forward is invariant to W -> cW and <dL/dW, W> = 0. (u, v) are refined
by ``power_iter`` iterations under no-grad after every optimizer step and once before step 0
(``post_optimizer_step``, called by the trainer). The polynomial runs in fp32 (autocast off).
``merge_pc(model)`` replaces every PCLinear by a plain Linear holding W_eff: zero inference cost.

Under tensor parallelism (``tp``, see `arch.tensor_parallel_plan`) ``lin`` holds this rank's
shard of W: the full W is gathered, W_eff computed in full on every rank, passed through
``tp.copy_to_region`` (its gradient summed over ranks) and this rank's slice multiplied column-
or row-parallel. gamma then gets its full gradient on every rank, the gather's backward (own
slice) gives each shard its exact gradient, and the power iteration runs on the gathered W, so
gamma, u and v stay replicated.

Options (``model.preconditioner.options``): level (1-4, default 4; the paper uses 4 with AdamW and
2 with Muon), targets (roles to wrap, default [w1, w2, w3, wo]: FFN projections and the attention
output), power_iter (10), eps (1e-7), learnable_gamma (true), gamma_init (1.0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import PreconditionerConfig
from arch.layers_registry import PRECONDITIONERS
from arch.numerics import fp32_or_wider
from arch.options import resolve_options
from arch.registry import ConfigError
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    DENSE,
    Split,
    TensorParallel,
    TensorParallelPlan,
)

# q's coefficients c0 + c1 x + ... per level (g(1) = sum = 1), as released.
PC_COEFFS: dict[int, tuple[float, ...]] = {
    1: (1.507, -0.507),
    2: (2.083, -1.643, 0.560),
    3: (2.909, -4.649, 4.023, -1.283),
    4: (3.625, -9.261, 14.097, -10.351, 2.890),
}
DEFAULT_TARGETS = ("w1", "w2", "w3", "wo")
INIT_POWER_ITER = 100  # iterations of the first (cold) power iteration, after initialisation


def poly_gram(G: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """q(G) = c0 I + G (c1 I + G (c2 I + ...)) by Horner's rule."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    P = coeffs[-1] * eye
    for c in reversed(coeffs[:-1]):
        P = c * eye + G @ P
    return P


def pc_polynomial(Wn: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """g(Wn) = Wn q(Wn^T Wn), using the smaller Gram matrix."""
    if Wn.shape[0] >= Wn.shape[1]:
        return Wn @ poly_gram(Wn.T @ Wn, coeffs)
    return poly_gram(Wn @ Wn.T, coeffs) @ Wn


@torch.no_grad()
def power_iteration(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int) -> None:
    """Refine the top singular pair (u, v) of W in place, warm-started from their values."""
    a, b = u.to(W.dtype), v.to(W.dtype)
    for _ in range(iterations):
        b = F.normalize(W.T @ a, dim=0)
        a = F.normalize(W @ b, dim=0)
    u.copy_(a)
    v.copy_(b)


class PCLinear(nn.Module):
    """A Linear whose weight is ``gamma * sg(sigma) * g(W / sigma)`` (see the module docstring)."""

    def __init__(
        self,
        linear: nn.Module,
        level: int = 4,
        power_iter: int = 10,
        eps: float = 1e-7,
        learnable_gamma: bool = True,
        gamma_init: float = 1.0,
        tp: TensorParallel = DENSE,
        split: Split = COLUMN_PARALLEL,
    ) -> None:
        super().__init__()
        self.lin = linear
        self.tp, self.split = tp, split
        self.level, self.power_iter, self.eps = level, power_iter, eps
        self.coeffs = PC_COEFFS[level]
        gamma = torch.full((1,), float(gamma_init))
        if learnable_gamma:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        shape = list(linear.weight.shape)
        shape[split.dim] *= tp.size
        out_features, in_features = shape
        # Start vectors from a generator of their own: the model's seeded init stays the same
        # with PC on or off, and a meta-device build needs no RNG.
        gen = torch.Generator().manual_seed(out_features * 1_000_003 + in_features)
        device = linear.weight.device
        for name, n in (("u", out_features), ("v", in_features)):
            start = F.normalize(torch.randn(n, generator=gen, device="cpu"), dim=0)
            self.register_buffer(name, start.to(device))

    @classmethod
    def tensor_parallel_plan(cls, cfg: object) -> TensorParallelPlan:
        """The raw weight splits as the projection it wraps (the owner's plan names it
        ``<role>.weight``); gamma, u and v are replicated."""
        return TensorParallelPlan(
            wraps="lin.weight",
            collectives="all-gather of W; all-reduce of W_eff's gradient (see the module doc)",
        )

    @property
    def weight(self) -> torch.Tensor:
        """This rank's slice of the effective weight (what the layer multiplies by)."""
        return self.tp.shard(self.tp.copy_to_region(self.effective_weight()), self.split)

    def full_weight(self) -> torch.Tensor:
        """The raw W, gathered from every rank under TP."""
        return self.tp.gather(self.lin.weight, self.split)

    def sigma(self, W: torch.Tensor | None = None) -> torch.Tensor:
        """uᵀ W v + eps: the power-iteration estimate of W's top singular value (with grad)."""
        W = fp32_or_wider(self.full_weight() if W is None else W)
        return self.u.to(W.dtype) @ W @ self.v.to(W.dtype) + self.eps

    def effective_weight(self) -> torch.Tensor:
        """The full W_eff (identical on every rank)."""
        W = self.full_weight()
        with torch.autocast(W.device.type, enabled=False):
            sigma = self.sigma(W)
            P = pc_polynomial(fp32_or_wider(W) / sigma, self.coeffs)
            return (self.gamma.to(P.dtype) * sigma.detach() * P).to(W.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.lin, "bias", None)
        if self.split.column_parallel:
            return F.linear(self.tp.copy_to_region(x), self.weight, bias)
        y = self.tp.reduce_from_region(F.linear(x, self.weight).contiguous())
        return y if bias is None else y + bias

    @torch.no_grad()
    def post_optimizer_step(self, iterations: int | None = None) -> None:
        """Refine (u, v) by ``power_iter`` power iterations warm-started from the stored ones."""
        W = fp32_or_wider(self.full_weight())
        power_iteration(W, self.u, self.v, iterations or self.power_iter)

    def post_init_weights(self) -> None:
        """After the model's (re-)initialisation: the first, cold power iteration, before step 0.

        It runs ``INIT_POWER_ITER`` (100) iterations, where the release runs ``power_iter``: from a
        random start on a random matrix (top singular values close together) 10 iterations leave
        sigma several % low (papers.md B8), and later steps only refine from there.
        """
        self.post_optimizer_step(max(self.power_iter, INIT_POWER_ITER))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain Linear with weight W_eff (and the same bias): the same function, no overhead."""
        lin = self.lin
        out = nn.Linear(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
        )
        out.weight.copy_(self.effective_weight())
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
        return out

    def extra_repr(self) -> str:
        parallel = "" if self.tp.size == 1 else f"tp={self.tp.size}, split={self.split}, "
        return f"{parallel}level={self.level}, power_iter={self.power_iter}"


def _check_pc_options(options: dict[str, Any], key: str) -> None:
    targets = options["targets"]
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"{key}.targets",
            f"must be a list of projection roles (e.g. [w1, w2, w3, wo]), got {targets!r}",
        )
    p = options["power_iter"]
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ConfigError(f"{key}.power_iter", f"must be an integer >= 1, got {p!r}")
    if not isinstance(options["eps"], int | float) or options["eps"] <= 0:
        raise ConfigError(f"{key}.eps", f"must be a positive number, got {options['eps']!r}")


@PRECONDITIONERS.register("pc")
def pc_preconditioner(
    linear: nn.Module,
    cfg: PreconditionerConfig,
    role: str,
    *,
    tp: TensorParallel = DENSE,
    split: Split = COLUMN_PARALLEL,
) -> nn.Module:
    """PC layer: polynomial preconditioning of the weight spectrum (levels 1-4); merges away.

    Options: level (4), targets ([w1, w2, w3, wo]), power_iter (10), eps (1e-7),
    learnable_gamma (true), gamma_init (1.0).
    """
    options = resolve_options(pc_preconditioner, cfg.options, "model.preconditioner.options", "pc")
    if role not in options["targets"]:
        return linear
    return PCLinear(
        linear,
        level=options["level"],
        power_iter=options["power_iter"],
        eps=options["eps"],
        learnable_gamma=options["learnable_gamma"],
        gamma_init=options["gamma_init"],
        tp=tp,
        split=split,
    )


pc_preconditioner.option_defaults = {  # type: ignore[attr-defined]
    "level": 4,
    "targets": list(DEFAULT_TARGETS),
    "power_iter": 10,
    "eps": 1e-7,
    "learnable_gamma": True,
    "gamma_init": 1.0,
}
pc_preconditioner.option_choices = {  # type: ignore[attr-defined]
    "level": tuple(PC_COEFFS),
    "learnable_gamma": (True, False),
}
pc_preconditioner.check_options = _check_pc_options  # type: ignore[attr-defined]
pc_preconditioner.tensor_parallel_plan = PCLinear.tensor_parallel_plan  # type: ignore[attr-defined]


@torch.no_grad()
def merge_pc(model: nn.Module) -> nn.Module:
    """Replace every PCLinear in ``model`` by its merged plain Linear, in place; returns model.

    The state dict then has the keys of the same model built with ``preconditioner.name=none``.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PCLinear):
                setattr(module, child_name, child.merge())
    return model
