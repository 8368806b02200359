"""The dense feed-forward sub-layer (`-`): a gated (SwiGLU) MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import ModelConfig
from arch.layers_registry import FFNS
from arch.preconditioner import make_linear


@FFNS.register("mlp")
class SwiGLU(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), hidden width model.ffn_hidden (8/3 d by default)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_size if hidden is None else hidden  # MoE experts pass theirs
        self.w1 = make_linear(cfg, cfg.d_model, hidden, "w1")
        self.w3 = make_linear(cfg, cfg.d_model, hidden, "w3")
        self.w2 = make_linear(cfg, hidden, cfg.d_model, "w2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
