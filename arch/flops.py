"""FLOPs per token, by layer family, for throughput (TFLOP/s) and MFU.

Forward FLOPs count a multiply-add as 2; training is 3x forward (backward = 2x forward), the
usual convention (PaLM appendix B, Megatron). Per family:

- projections (every nn.Linear inside a sub-layer): 2 x weight elements;
- attention scores: 4 x heads x head_dim x (keys each query sees, averaged over positions):
  (T + 1) / 2 for causal attention, less with a sliding window or block-sparse mask;
- Mamba-1 scan: 6 x d_inner x d_state (decay x state, + drive, readout), conv 2 x d_inner x K;
- Mamba-2 SSD (chunked): 2 x chunk x (heads x head_dim + groups x d_state) within chunks plus
  4 x heads x head_dim x d_state across them, conv 2 x conv_dim x K;
- MoE: the router plus top_k experts (the active parameters), not all of them;
- the output head: 2 x d_model x vocab. Embedding lookups are free.
"""

from __future__ import annotations

import torch
from torch import nn


def _linear_flops(module: nn.Module) -> int:
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _keys_per_query(inner: nn.Module, seq_len: int) -> float:
    """Average number of keys a query attends to under this mixer's attention kernel."""
    cfg = inner.cfg
    name = cfg.name
    if name == "sliding_window" and cfg.window:
        w = min(cfg.window, seq_len)
        # positions t < w see t + 1 keys, the rest see w
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    if name == "block_sparse":
        from arch.attention_sparse import block_sparse_mask

        mask = block_sparse_mask(seq_len, cfg.block_size, cfg.stride)
        return mask.sum().item() / seq_len
    return (seq_len + 1) / 2


def sublayer_flops(inner: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of one sub-layer's mixer or FFN."""
    if hasattr(inner, "flops_per_token"):  # a plugin that knows better
        return float(inner.flops_per_token(seq_len))
    kind = type(inner).__name__
    if kind == "Attention":
        scores = 4 * inner.n_heads * inner.head_dim * _keys_per_query(inner, seq_len)
        return _linear_flops(inner) + scores
    if kind == "Mamba":
        conv = 2 * inner.d_inner * inner.conv1d.weight.shape[-1]
        return _linear_flops(inner) + conv + 6 * inner.d_inner * inner.d_state
    if kind == "Mamba2":
        heads, p, n, g = inner.n_heads, inner.head_dim, inner.d_state, inner.n_groups
        chunk = min(inner.chunk_size, seq_len)
        ssd = 2 * chunk * (heads * p + g * n) + 4 * heads * p * n
        conv = 2 * inner.conv_dim * inner.conv1d.weight.shape[-1]
        return _linear_flops(inner) + conv + ssd
    if kind == "MoE":
        expert = _linear_flops(next(iter(inner.experts.values())))
        return 2 * inner.router.weight.numel() + inner.cfg.top_k * expert
    return float(_linear_flops(inner))


def flops_per_token(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a HybridLM by family (the pattern's plugin names + "head")."""
    out: dict[str, float] = {}
    for layer in model.layers:
        family = layer.inner.__class__.__name__.lower()
        out[family] = out.get(family, 0.0) + sublayer_flops(layer.inner, seq_len)
    cfg = model.cfg
    out["head"] = 2.0 * cfg.d_model * cfg.vocab_size
    return out


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    return 3.0 * sum(flops_per_token(model, seq_len).values())


# Dense bf16 peak TFLOP/s per device (vendor figures, no sparsity), matched by substring of
# torch.cuda.get_device_name(); `trainer.peak_tflops` overrides.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,
}


def peak_tflops(override: float | None = None) -> float | None:
    """The device's peak for MFU: the override, else the table for the CUDA device, else None."""
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None
