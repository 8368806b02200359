"""The attention mixer (`*`) and its kernels (registry `attention`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import AttentionConfig, ModelConfig
from arch.documents import attention_mask
from arch.layers_registry import ATTENTION, MIXERS
from arch.preconditioner import make_linear
from arch.rope import apply_rope, rope_cos_sin


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
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


@MIXERS.register("attention")
class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and optional RoPE."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.cfg = cfg.attention
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.kernel = ATTENTION.get(cfg.attention.name)
        kv_dim = self.n_kv_heads * self.head_dim
        self.wq = make_linear(cfg, cfg.d_model, cfg.d_model, "wq")
        self.wk = make_linear(cfg, cfg.d_model, kv_dim, "wk")
        self.wv = make_linear(cfg, cfg.d_model, kv_dim, "wv")
        self.wo = make_linear(cfg, cfg.d_model, cfg.d_model, "wo")

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.cfg.rope:
            cos, sin = rope_cos_sin(t, self.head_dim, self.cfg.rope_theta, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if doc_ids is None:
            out = self.kernel(q, k, v, self.cfg)
        else:  # kernels that support packed documents take doc_ids
            out = self.kernel(q, k, v, self.cfg, doc_ids=doc_ids)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))
