"""The attention mixer (`*`) and its kernels (registry `attention`).

Incremental decoding (`Attention.step`, see `arch.cache`) needs each kernel's pattern as a
function of absolute positions: `POSITION_MASKS` maps a kernel name to ``allowed(cfg, q_pos,
k_pos) -> [Tq, Tk] bool`` and how many past keys the cache must keep (None: all). A kernel
without an entry cannot be stepped, so `generate` falls back to full recomputation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arch.cache import KVCache
from arch.config import AttentionConfig, ModelConfig
from arch.documents import attention_mask
from arch.layers_registry import ATTENTION, MIXERS
from arch.numerics import fp32_or_wider
from arch.recompute import recompute_region
from arch.rope import apply_rope, rope_cos_sin
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    DENSE,
    ROW_PARALLEL,
    TensorParallel,
    TensorParallelPlan,
)


@dataclass(frozen=True)
class PositionMask:
    """A kernel's pattern over absolute positions, for cached decoding."""

    allowed: Callable[[AttentionConfig, torch.Tensor, torch.Tensor], torch.Tensor]
    keep: Callable[[AttentionConfig], int | None] = lambda cfg: None  # past keys to keep


def causal_allowed(cfg: AttentionConfig, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[Tq, Tk] bool: key position <= query position."""
    return k_pos[None, :] <= q_pos[:, None]


POSITION_MASKS: dict[str, PositionMask] = {
    "sdpa": PositionMask(causal_allowed),
    "eager": PositionMask(causal_allowed),
}


@ATTENTION.register("sdpa")
def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full causal attention through torch's scaled_dot_product_attention (flash on GPU).

    With ``doc_ids`` a block-diagonal causal mask keeps packed documents apart (SDPA then uses
    its masked kernels instead of flash).
    """
    gqa = k.shape[1] != q.shape[1]
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = attention_mask(doc_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@ATTENTION.register("eager")
def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference causal attention written out (materialises T x T scores; for checks)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    if doc_ids is None:
        allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = attention_mask(doc_ids)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(fp32_or_wider(scores), dim=-1).to(q.dtype) @ v


@MIXERS.register("attention")
class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and optional RoPE.

    Under tensor parallelism each rank holds a block of (kv) heads: ``n_heads`` and
    ``n_kv_heads`` are the model's, the local counts come from the projections' shapes.
    """

    selective_recompute = "attention kernel"

    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TensorParallel = DENSE) -> None:
        super().__init__()
        self.cfg = cfg.attention
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.kernel = ATTENTION.get(cfg.attention.name)
        d, kv_dim = cfg.d_model, self.n_kv_heads * self.head_dim
        self.wq = tp.linear(cfg, d, d, "wq", COLUMN_PARALLEL)
        self.wk = tp.linear(cfg, d, kv_dim, "wk", COLUMN_PARALLEL)
        self.wv = tp.linear(cfg, d, kv_dim, "wv", COLUMN_PARALLEL)
        self.wo = tp.linear(cfg, d, d, "wo", ROW_PARALLEL)

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Heads split: wq, wk, wv column-parallel, wo row-parallel (the kernels are per head)."""
        return TensorParallelPlan(
            splits={
                "wq.weight": COLUMN_PARALLEL,
                "wk.weight": COLUMN_PARALLEL,
                "wv.weight": COLUMN_PARALLEL,
                "wo.weight": ROW_PARALLEL,
            },
            divisible={"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.kv_heads},
            collectives="all-reduce of wo's output (and of the input's gradient)",
            boundary=("wq", "wk", "wv", "wo"),
        )

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, heads, t, head_dim] and k, v [b, kv heads, t, head_dim] (local heads)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    @property
    def supports_cache(self) -> bool:
        """Cached decoding needs the kernel's pattern over positions (`POSITION_MASKS`)."""
        return self.cfg.name in POSITION_MASKS

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._heads(x)
        if self.cfg.rope:
            cos, sin = rope_cos_sin(t, self.head_dim, self.cfg.rope_theta, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if doc_ids is None:
                return self.kernel(q, k, v, self.cfg)
            return self.kernel(q, k, v, self.cfg, doc_ids=doc_ids)  # kernels that keep documents

        out = recompute_region(core, q, k, v)  # eager and masked kernels keep T x T scores
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def step(
        self, x: torch.Tensor, entry: KVCache | None, position: int = 0
    ) -> tuple[torch.Tensor, KVCache]:
        """``forward`` of x [b, t, D] at absolute positions ``position ... position + t - 1``,
        attending to the cached keys and values ``entry`` (None: a fresh sequence) as well;
        returns (out [b, t, D], the cache with these keys appended).

        Keys are cached after RoPE, so they are rotated once, at their own positions. The
        kernel's mask (`POSITION_MASKS`) is rebuilt over the cached and new positions and the
        attention runs through SDPA; ``sliding_window`` keeps only the last window - 1 keys,
        ``block_sparse`` keeps them all (its strided blocks reach arbitrarily far back).
        """
        b, t, _ = x.shape
        q, k, v = self._heads(x)
        if self.cfg.rope:
            cos, sin = rope_cos_sin(
                position + t, self.head_dim, self.cfg.rope_theta, x.device, q.dtype
            )
            cos, sin = cos[position:], sin[position:]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if entry is not None:
            k = torch.cat([entry.k.to(k.dtype), k], dim=2)
            v = torch.cat([entry.v.to(v.dtype), v], dim=2)
        mask = POSITION_MASKS[self.cfg.name]
        q_pos = torch.arange(position, position + t, device=x.device)
        k_pos = torch.arange(position + t - k.shape[2], position + t, device=x.device)
        allowed = mask.allowed(self.cfg, q_pos, k_pos)
        gqa = k.shape[1] != q.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
        keep = mask.keep(self.cfg)
        if keep is not None:
            k, v = (
                k[:, :, k.shape[2] - min(keep, k.shape[2]) :],
                v[:, :, v.shape[2] - min(keep, v.shape[2]) :],
            )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1)), KVCache(k=k, v=v)
