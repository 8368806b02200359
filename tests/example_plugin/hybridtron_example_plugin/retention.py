"""Gated retention: multi-head causal linear attention with a learned decay per head.

    q, k, v, g = W_q x, W_k x, W_v x, W_g x               heads x head_dim each
    y_t        = sum_{s <= t} gamma^(t - s) (q_t . k_s) v_s / sqrt(head_dim)   per head
    out        = W_o (y * silu(g))                         gamma = sigmoid(decay) per head

Under tensor parallelism each rank holds a block of heads: q, k, v, g column-parallel, the decay
by head, W_o row-parallel (its output summed over ranks). The forward never asks how many ranks
there are: the local head count comes from the projections' shapes. Under
``parallel.recompute=selective`` the T x T part is recomputed in the backward instead of kept
(`arch.recompute.recompute_region`); ``full`` recomputes the whole mixer, like any plugin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import ModelConfig
from arch.recompute import recompute_region
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    DENSE,
    ROW_PARALLEL,
    TensorParallel,
    TensorParallelPlan,
)


class GatedRetention(nn.Module):
    """Gated retention: causal linear attention, a learned decay per head (example plugin)."""

    selective_recompute = "T x T scores"  # `registry list` prints it

    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TensorParallel = DENSE) -> None:
        super().__init__()
        d, self.head_dim = cfg.d_model, cfg.head_dim
        width = cfg.n_heads * cfg.head_dim
        # Projections through the context: this rank's shard, wrapped by the preconditioner.
        self.wq = tp.linear(cfg, d, width, "wq", COLUMN_PARALLEL)
        self.wk = tp.linear(cfg, d, width, "wk", COLUMN_PARALLEL)
        self.wv = tp.linear(cfg, d, width, "wv", COLUMN_PARALLEL)
        self.wg = tp.linear(cfg, d, width, "wg", COLUMN_PARALLEL)
        self.wo = tp.linear(cfg, width, d, "wo", ROW_PARALLEL)
        # A per-head parameter is built at the local head count.
        self.decay = nn.Parameter(torch.empty(cfg.n_heads // tp.size))
        self.post_init_weights()

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Heads split: wq, wk, wv, wg column-parallel, decay by head, wo row-parallel."""
        return TensorParallelPlan(
            splits={
                "w[qkvg].weight": COLUMN_PARALLEL,
                "decay": COLUMN_PARALLEL,
                "wo.weight": ROW_PARALLEL,
            },
            divisible={"model.n_heads": cfg.n_heads},
            collectives="all-reduce of wo's output (and of the input's gradient)",
        )

    @torch.no_grad()
    def post_init_weights(self) -> None:
        """Decays from 1 - 2^-5 to 1 - 2^-2 over the heads (HybridLM calls this after its
        generic init of the projections)."""
        heads = self.decay.numel()
        gamma = 1 - 2.0 ** -torch.linspace(5, 2, heads) if heads > 1 else torch.tensor([0.9])
        self.decay.copy_(torch.log(gamma / (1 - gamma)))  # sigmoid^-1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # [b, t, h * p] -> [b, h, t, p]
            return y.view(b, t, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        # The memory-heavy part, a function of its inputs and the parameters only.
        y = recompute_region(self._retention, q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.wo(y * F.silu(self.wg(x)))

    def _retention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sum_s gamma^(t - s) (q_t . k_s) v_s / sqrt(head_dim) per head, [b, h, t, p]."""
        t = q.shape[-2]
        log_gamma = F.logsigmoid(self.decay)[:, None, None]  # [h, 1, 1]
        pos = torch.arange(t, device=q.device, dtype=q.dtype)
        lag = pos[:, None] - pos[None, :]  # [t, t]: t - s
        mask = torch.exp(log_gamma * lag.clamp(min=0)) * (lag >= 0).to(q.dtype)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim) * mask
        return scores @ v
