"""Muon: Newton-Schulz-orthogonalised momentum for hidden matrices, AdamW for everything else.

Keller Jordan's recipe (github.com/KellerJordan/Muon, muon.py): per hidden 2-D weight W with
gradient G::

    B <- beta B + (1 - beta) G                    (momentum, beta = optim.muon_momentum = 0.95)
    U <- (1 - beta) G + beta B  (Nesterov) or B
    O <- NS5(U)                                   5 quintic Newton-Schulz steps, (3.4445, -4.7750, 2.0315)
    W <- (1 - lr wd) W - lr * scale * O

``scale`` is ``optim.muon_scale``: ``jordan`` (default) is Keller Jordan's ``sqrt(max(1,
rows/cols))`` with its own learning rate ``optim.muon_lr`` (0.02); ``moonlight`` is Moonlight's
RMS-matching ``0.2 sqrt(max(rows, cols))`` (Liu et al. 2025), which makes an update's RMS about
AdamW's so ``optim.muon_lr`` can equal ``optim.lr``. Both learning rates follow the schedule: a
Muon group keeps ``lr_ratio = muon_lr / lr`` and steps with ``group["lr"] * lr_ratio``.

Which parameters: the "decay" group of ``trainer.optim.param_groups`` (weights of the model's
nn.Linear sub-modules other than the head, PC layers' raw weights included) when 2-D. Embeddings,
norms, learned scalars (residual scalars, PC gamma), the untied head and non-Linear tensors go to
AdamW with ``optim.lr``, ``optim.betas``, ``optim.eps``. NS5 runs in fp32 here (bf16 in the
reference GPU code). All state (momentum buffers, Adam moments and step counts) is in
``state_dict()``, so resume is exact.
"""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig

NS5_COEFFS = (3.4445, -4.7750, 2.0315)
SCALES = ("jordan", "moonlight")


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximate orthogonalisation U V^T of a 2-D G (singular values end in ~[0.68, 1.13])."""
    a, b, c = NS5_COEFFS
    X = G.to(torch.promote_types(G.dtype, torch.float32))
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def update_scale(shape: torch.Size, kind: str) -> float:
    rows, cols = shape[-2], shape[-1]
    if kind == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True`` (2-D tensors), AdamW on the others."""

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        scale: str = "jordan",
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            scale=scale,
            use_muon=False,
            lr_ratio=1.0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D tensors only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr = group["lr"] * group["lr_ratio"]
        beta = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)
            update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
            update = newton_schulz5(update, group["ns_steps"]) * update_scale(
                p.shape, group["scale"]
            )
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-lr)

    def _adamw_step(self, group: dict) -> None:
        """Decoupled-weight-decay Adam, the arithmetic of torch.optim.AdamW (single tensor)."""
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            p.mul_(1 - lr * group["weight_decay"])
            state["exp_avg"].lerp_(grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            bias1, bias2_sqrt = 1 - b1**step, math.sqrt(1 - b2**step)
            denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


def build_muon(groups: list[dict], cfg: OptimConfig) -> Muon:
    """Split trainer.optim.param_groups: 2-D tensors of the "decay" group -> Muon, rest -> AdamW."""
    out = []
    for group in groups:
        params = group["params"]
        muon_params = [p for p in params if p.ndim == 2] if group.get("group") == "decay" else []
        rest = [p for p in params if all(p is not q for q in muon_params)]
        if muon_params:
            out.append(
                {
                    **group,
                    "params": muon_params,
                    "use_muon": True,
                    "lr_ratio": cfg.muon_lr / cfg.lr,
                    "group": group.get("group", "") + "/muon",
                }
            )
        if rest:
            out.append({**group, "params": rest, "use_muon": False})
    return Muon(
        out,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        scale=cfg.muon_scale,
    )
