"""A mixer without a tensor-parallel plan: it trains in one process and under pipeline or data
parallelism; at tensor-parallel size > 1 hybridtron refuses it with one line."""

from __future__ import annotations

import torch
from torch import nn


class NoPlanMixer(nn.Module):
    """A per-channel scaled causal mean (declares no tensor-parallel plan)."""

    def __init__(self, cfg, layer_index: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return self.scale * x.cumsum(1) / steps
