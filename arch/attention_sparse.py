"""Sparse attention kernels (registry `attention`): `sliding_window` and `block_sparse`.

Both are causal, take grouped-query k/v and honour ``doc_ids`` (keys of other documents masked).
They run through torch's scaled_dot_product_attention with a boolean mask, so on CPU they cost as
much as full attention; the point is the pattern (what each query may see), which a GPU kernel
(FlexAttention, a block-sparse flash kernel) turns into savings.

- ``sliding_window``: query i sees keys j with i - window < j <= i (`model.attention.window`).
- ``block_sparse``: positions fall in blocks of `model.attention.block_size`; a query in block I
  sees its own block causally (local) and every earlier block J with (I - J) % stride == 0
  (strided, `model.attention.stride`). stride 1, or block_size >= T, is full causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arch.attention import POSITION_MASKS, PositionMask, causal_allowed
from arch.config import AttentionConfig
from arch.documents import attention_mask
from arch.layers_registry import ATTENTION


def sliding_window_mask(t: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """[T, T] bool, True = query i may attend key j: causal, at most ``window`` keys back."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & (i - j < window)


def block_sparse_mask(
    t: int, block_size: int, stride: int, device: torch.device | None = None
) -> torch.Tensor:
    """[T, T] bool: own block (causal) plus earlier blocks J with (I - J) % stride == 0."""
    pos = torch.arange(t, device=device)
    bi, bj = (pos // block_size)[:, None], (pos // block_size)[None, :]
    causal = pos[None, :] <= pos[:, None]
    return causal & ((bi == bj) | ((bi - bj) % stride == 0))


def _masked_sdpa(q, k, v, allowed: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    if doc_ids is not None:
        allowed = allowed & attention_mask(doc_ids)  # [B, 1, T, T]
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)


@ATTENTION.register("sliding_window")
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention to the last `model.attention.window` keys (SDPA with a band mask)."""
    if cfg.window is None:
        raise ValueError("sliding_window attention needs model.attention.window")
    return _masked_sdpa(q, k, v, sliding_window_mask(q.shape[-2], cfg.window, q.device), doc_ids)


@ATTENTION.register("block_sparse")
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local + strided blocks (`model.attention.block_size`, `stride`), causal, via SDPA."""
    allowed = block_sparse_mask(q.shape[-2], cfg.block_size, cfg.stride, q.device)
    return _masked_sdpa(q, k, v, allowed, doc_ids)


# Cached decoding (`Attention.step`): the same patterns over absolute positions.


def _sliding_window_allowed(
    cfg: AttentionConfig, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    return causal_allowed(cfg, q_pos, k_pos) & (q_pos[:, None] - k_pos[None, :] < cfg.window)


def _block_sparse_allowed(
    cfg: AttentionConfig, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    bi, bj = (q_pos // cfg.block_size)[:, None], (k_pos // cfg.block_size)[None, :]
    return causal_allowed(cfg, q_pos, k_pos) & ((bi == bj) | ((bi - bj) % cfg.stride == 0))


POSITION_MASKS["sliding_window"] = PositionMask(
    _sliding_window_allowed, keep=lambda cfg: cfg.window - 1
)
POSITION_MASKS["block_sparse"] = PositionMask(_block_sparse_allowed)
