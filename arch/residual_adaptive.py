"""Preconditioned residual updates (Paper A, "Momentum Streams"): Adam, Muon and SOAP families.

Per sub-layer, with ``g = sublayer(norm(x))`` and LN_u a bias-free LayerNorm on the update::

    adam      m <- b1 m + (1-b1) g;  s <- b2 s + (1-b2) g^2;  x <- x + gamma LN_u(m / (sqrt(s) + eps))
    adamw     as adam, but x <- (1 - lambda) x + ...
    rmsprop   s <- b2 s + (1-b2) g^2;                          x <- x + gamma LN_u(g / (sqrt(s) + eps))
    muon      m <- b m + (1-b) g;                              x <- x + gamma LN_u(NS5(m))
    ortho                                                      x <- x + gamma LN_u(NS5(g))
    soap      G = g as (heads x head_dim); M <- b1 M + (1-b1) G; R <- bR R + (1-bR) G^T G;
              x <- x + gamma LN_u(vec(M R^{-1/2}))
    shampoo   as soap with M replaced by G

NS5 and R^{-1/2} act on each token's own (heads x head_dim) matrix, so no stream ever mixes
tokens (the predecessor's SOAP averaged R over the sequence and leaked the future). The released
"SOAP" is momentum + right-factor Shampoo (exponent -1/2), not SOAP proper: no Adam in an
eigenbasis, no left factor. ``m0`` comes from a learned token embedding (``vel_init=embed``) or
is zero; ``s0 = 1``; ``R0 = I`` per token. Both matrix functions run in fp32 (autocast off).
"""

from __future__ import annotations

import torch

from arch.layers_registry import RESIDUALS
from arch.numerics import fp32_or_wider
from arch.residual import Oracle, State
from arch.residual_momentum import POS, UNIT, StreamResidual, make_norm

NS5_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz coefficients


def ns5(y: torch.Tensor, n_heads: int, steps: int = 5) -> torch.Tensor:
    """Per-token, head-wise quintic Newton-Schulz: [..., D] -> each (heads x head_dim) block
    Frobenius-normalised, then ``Y <- a Y + (b A + c A^2) Y`` with ``A = Y Y^T``, ``steps`` times.

    Not an exact polar factor: after 5 steps the singular values are in about [0.68, 1.13].
    """
    a, b, c = NS5_COEFFS
    with torch.autocast(y.device.type, enabled=False):
        Y = fp32_or_wider(y).unflatten(-1, (n_heads, -1))
        tall = Y.shape[-2] > Y.shape[-1]
        if tall:  # the Gram of the short side is the cheaper one
            Y = Y.mT
        Y = Y / Y.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        for _ in range(steps):
            A = Y @ Y.mT
            Y = a * Y + (b * A + c * A @ A) @ Y
        if tall:
            Y = Y.mT
        return Y.flatten(-2)


def newton_inv_sqrt(R: torch.Tensor, steps: int = 10, damping: float = 1e-6) -> torch.Tensor:
    """R^{-1/2} of symmetric PSD matrices [..., n, n] by the uncoupled Newton iteration:
    ``R~ = (R + damping I) / ||R + damping I||_F``, ``X0 = I``, ``X <- X (3I - X R~ X) / 2``,
    result ``X / sqrt(||R + damping I||_F)``."""
    with torch.autocast(R.device.type, enabled=False):
        R = fp32_or_wider(R)
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
        Rd = R + damping * eye
        norm = Rd.norm(dim=(-2, -1), keepdim=True)
        Rn = Rd / norm
        X = eye.expand_as(Rn)
        for _ in range(steps):
            X = 0.5 * X @ (3 * eye - X @ Rn @ X)
        return X / norm.sqrt()


class UpdateNormResidual(StreamResidual):
    """Base of the preconditioned variants: ``x <- x + gamma LN_u(update)``."""

    option_defaults = {"update_norm": "layernorm"}

    def __init__(self, cfg, layer_index: int) -> None:
        super().__init__(cfg, layer_index)
        self.ln_u = make_norm(self.options["update_norm"], cfg.d_model, cfg.norm_eps)

    def step(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return x + self.value("gamma") * self.ln_u(update)


# ---- Adam family ---------------------------------------------------------------------------


@RESIDUALS.register("adam")
class AdamResidual(UpdateNormResidual):
    """AdamFormer: moment streams m, s; x <- x + gamma LN_u(m / (sqrt(s) + eps)).

    Options: vel_init (embed | zero; m0), update_norm (layernorm | rmsnorm | none), eps (1e-8).
    """

    state_names = ("x", "m", "s")
    streams = {"m": "embed", "s": "ones"}
    scalars = {"beta1": (UNIT, 0.0), "beta2": (UNIT, 0.0), "gamma": (POS, 0.0)}
    option_defaults = {"vel_init": "embed", "update_norm": "layernorm", "eps": 1e-8}

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        g = oracle(x)
        b1, b2 = self.value("beta1"), self.value("beta2")
        m = b1 * state["m"] + (1 - b1) * g
        s = b2 * state["s"] + (1 - b2) * g * g
        if "lam" in self.scalars:
            x = (1 - self.value("lam")) * x
        x = self.step(x, m / (s.sqrt() + self.options["eps"]))
        return {**state, "x": x, "m": m, "s": s}


@RESIDUALS.register("adamw")
class AdamWResidual(AdamResidual):
    """AdamWFormer: Adam with decoupled decay, x <- (1 - lambda) x + gamma LN_u(...).

    lambda starts at sigmoid(-5). Options as adam.
    """

    scalars = {**AdamResidual.scalars, "lam": (UNIT, -5.0)}


@RESIDUALS.register("rmsprop")
class RMSPropResidual(UpdateNormResidual):
    """RMSPropFormer (ablation: Adam without m): x <- x + gamma LN_u(g / (sqrt(s) + eps)).

    Options: update_norm (layernorm | rmsnorm | none), eps (1e-8).
    """

    state_names = ("x", "s")
    streams = {"s": "ones"}
    scalars = {"beta2": (UNIT, 0.0), "gamma": (POS, 0.0)}
    option_defaults = {"update_norm": "layernorm", "eps": 1e-8}

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        g = oracle(x)
        b2 = self.value("beta2")
        s = b2 * state["s"] + (1 - b2) * g * g
        return {**state, "x": self.step(x, g / (s.sqrt() + self.options["eps"])), "s": s}


# ---- Muon family ---------------------------------------------------------------------------


@RESIDUALS.register("muon")
class MuonResidual(UpdateNormResidual):
    """MuonFormer: m <- beta m + (1-beta) g; x <- x + gamma LN_u(NS5(m)), NS5 per token, head-wise.

    Options: vel_init (embed | zero; m0), update_norm, ns_steps (5).
    """

    state_names = ("x", "m")
    streams = {"m": "embed"}
    scalars = {"beta": (UNIT, 0.0), "gamma": (POS, 0.0)}
    option_defaults = {"vel_init": "embed", "update_norm": "layernorm", "ns_steps": 5}

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        beta = self.value("beta")
        m = beta * state["m"] + (1 - beta) * oracle(x)
        x = self.step(x, ns5(m, self.n_heads, self.options["ns_steps"]))
        return {**state, "x": x, "m": m}


@RESIDUALS.register("ortho")
class OrthoResidual(UpdateNormResidual):
    """OrthoFormer (ablation: Muon without m): x <- x + gamma LN_u(NS5(g)).

    Options: update_norm, ns_steps (5).
    """

    scalars = {"gamma": (POS, 0.0)}
    option_defaults = {"update_norm": "layernorm", "ns_steps": 5}

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        return {**state, "x": self.step(x, ns5(oracle(x), self.n_heads, self.options["ns_steps"]))}


# ---- SOAP family ---------------------------------------------------------------------------


class RightShampooResidual(UpdateNormResidual):
    """Right-factor Kronecker preconditioning of each token's (heads x head_dim) update."""

    option_defaults = {"update_norm": "layernorm", "newton_steps": 10, "damping": 1e-6}

    def precondition(self, state: State, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (G as [..., heads, head_dim], the new R)."""
        G = fp32_or_wider(g).unflatten(-1, (self.n_heads, -1))
        b_r = self.value("beta_r")
        R = b_r * state["r"] + (1 - b_r) * (G.mT @ G)
        return G, R

    def preconditioned_step(
        self, x: torch.Tensor, M: torch.Tensor, R: torch.Tensor
    ) -> torch.Tensor:
        inv = newton_inv_sqrt(R, self.options["newton_steps"], self.options["damping"])
        return self.step(x, (M @ inv).flatten(-2))


@RESIDUALS.register("soap")
class SOAPResidual(RightShampooResidual):
    """SOAPFormer as released: momentum + right-factor Shampoo, x += gamma LN_u(vec(M R^-1/2)).

    R is per token (head_dim x head_dim, R0 = I); R^-1/2 by 10 Newton steps. Options: vel_init
    (embed | zero; M0), update_norm, newton_steps (10), damping (1e-6).
    """

    state_names = ("x", "m", "r")
    streams = {"m": "embed", "r": "identity"}
    scalars = {"beta1": (UNIT, 0.0), "beta_r": (UNIT, 0.0), "gamma": (POS, 0.0)}
    option_defaults = {**RightShampooResidual.option_defaults, "vel_init": "embed"}

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        G, R = self.precondition(state, oracle(x))
        b1 = self.value("beta1")
        M = b1 * state["m"].unflatten(-1, (self.n_heads, -1)) + (1 - b1) * G
        return {**state, "x": self.preconditioned_step(x, M, R), "m": M.flatten(-2), "r": R}


@RESIDUALS.register("shampoo")
class ShampooResidual(RightShampooResidual):
    """ShampooFormer (ablation: SOAP without M): x <- x + gamma LN_u(vec(G R^-1/2)).

    Options: update_norm, newton_steps (10), damping (1e-6).
    """

    state_names = ("x", "r")
    streams = {"r": "identity"}
    scalars = {"beta_r": (UNIT, 0.0), "gamma": (POS, 0.0)}

    def forward(self, state: State, oracle: Oracle) -> State:
        x = state["x"]
        G, R = self.precondition(state, oracle(x))
        return {**state, "x": self.preconditioned_step(x, G, R), "r": R}
