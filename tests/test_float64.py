"""A float64 model computes in float64 end to end (the reference for chaotic comparisons).

Routing, scans, softmaxes and the loss upcast bf16/fp16 to fp32 but never float64 down
(`arch.numerics.fp32_or_wider`). The check: a central finite difference of the training loss
(LM + MoE auxiliary losses) along a random direction equals the gradient's projection on it. In
float64 the two agree to ~1e-9 (truncation O(eps^2), rounding ~1e-16 / eps); one fp32 step
anywhere in the forward or a hand-written backward would leave ~1e-7 / eps = 1e-1 of noise.
"""

from __future__ import annotations

import pytest
import torch

from arch import ModelConfig, build_model
from arch.model import aux_loss_counts
from trainer.train_module import train_loss

EPS = 1e-6


def directional_check(scan: str) -> tuple[float, float, torch.dtype]:
    cfg = ModelConfig(pattern="*MSE-", d_model=16, n_heads=2, n_kv_heads=1, vocab_size=50)
    cfg.mamba.scan = scan
    cfg.moe.num_experts, cfg.moe.top_k = 4, 2
    model = build_model(cfg, seed=3).double()
    batch = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(5))
    counts = aux_loss_counts(cfg)

    def loss() -> torch.Tensor:
        lm, aux = train_loss(model, batch, "fp32", {}, aux_counts=counts)
        return lm + sum(aux.values())

    value = loss()
    value.backward()
    g = torch.Generator().manual_seed(9)
    params = [p for p in model.parameters() if p.grad is not None]
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    projected = sum((p.grad * d).sum() for p, d in zip(params, direction, strict=True)).item()

    @torch.no_grad()
    def loss_at(step: float) -> float:
        for p, d in zip(params, direction, strict=True):
            p.add_(step * d)
        value = loss().item()
        for p, d in zip(params, direction, strict=True):
            p.sub_(step * d)
        return value

    plus, minus = loss_at(EPS), loss_at(-EPS)
    return (plus - minus) / (2 * EPS), projected, value.dtype


@pytest.mark.parametrize("scan", ["cpu", "loop"])
def test_float64_gradients_match_finite_differences(scan):
    numeric, analytic, dtype = directional_check(scan)
    assert dtype == torch.float64
    # Measured 1.7e-9 relative (1 and 2 threads); with the fp32 casts it replaced: 0.2.
    assert abs(numeric - analytic) <= 1e-7 * abs(analytic), (numeric, analytic)
