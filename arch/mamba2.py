"""The Mamba-2 mixer (`S`, `model.mamba2`): SSD (state-space duality) in chunked matmul form.

    z, xBC, dt = in_proj(h)                        z: gate, xBC: x|B|C, dt: one per head
    x, B, C    = silu(causal depthwise conv1d(xBC))  x: heads x head_dim, B/C: groups x d_state
    dt         = softplus(dt + dt_bias);  A = -exp(A_log)   (a scalar per head)
    y          = SSD(x, dt, A, B, C) + D x
    out        = out_proj(RMSNorm_grouped(y * silu(z)))   (Mamba-2's gated norm, norm after gate)

Per head the recurrence is ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t``
(h: head_dim x d_state). Because the decay is a scalar per head, a chunk of Q steps is a masked
"linear attention" computed with matmuls (`ssd_chunked`, after ``ssd_minimal_discrete`` of
state-spaces/mamba); chunk states are passed on by a (T/Q) x (T/Q) product: no Python loop over
time. `ssd_sequential` is the step-by-step reference the tests compare it with.

Packed documents: with ``doc_ids`` the state is reset where a document starts (the decay into
that step is exp(-inf) = 0) and the conv window never reaches into the previous document.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arch.cache import Mamba2State
from arch.config import ModelConfig
from arch.documents import document_starts
from arch.layers_registry import MIXERS
from arch.numerics import fp32_or_wider
from arch.recompute import recompute_region
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    DENSE,
    ROW_PARALLEL,
    Split,
    TensorParallel,
    TensorParallelPlan,
)

# Mamba-2's initialisation ranges: dt ~ logUniform[DT_MIN, DT_MAX] floored, A ~ U[A_MIN, A_MAX].
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_MIN, A_MAX = 1.0, 16.0


def segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = sum_{j < k <= i} a_k, -inf above the diagonal.

    A cumulative sum of a masked copy (never a difference of cumsums), so it stays exact and
    accepts -inf entries (state resets) without producing NaN.
    """
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)  # [..., k, j] = a_k
    strict = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    out = a.masked_fill(~strict, 0.0).cumsum(dim=-2)
    return out.masked_fill(
        ~strict.logical_or(torch.eye(t, dtype=torch.bool, device=a.device)), -math.inf
    )


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C [b, l, g, n] repeated to [b, l, heads, n] (heads of a group share them)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSD output y [b, l, h, p] (without the D skip), chunked; any length l.

    x [b, l, h, p]; dt [b, l, h] (after softplus); A [h] (negative); B, C [b, l, g, n];
    reset [b, l] bool: True where the state carried in from step t-1 is dropped.
    """
    b, length, h, p = x.shape
    q = chunk_size
    pad = -length % q
    a = dt * A  # [b, l, h] log-decay of each step
    if reset is not None:
        a = a.masked_fill(reset[..., None], -math.inf)
    xdt = x * dt[..., None]
    B, C = _heads(B, h), _heads(C, h)
    if pad:  # zero input and zero log-decay: padded steps change nothing before them
        xdt, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xdt, a, B, C))
    c = (length + pad) // q
    xdt, B, C = (t.reshape(b, c, q, *t.shape[2:]) for t in (xdt, B, C))
    a = a.reshape(b, c, q, h).permute(0, 3, 1, 2)  # [b, h, c, q]
    a_cumsum = a.cumsum(dim=-1)
    decay = torch.exp(segsum(a))  # [b, h, c, l, s]: decay from step s to step l of a chunk
    # 1. within each chunk: masked "attention" (C_l . B_s) decay[l, s] x_s
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, xdt)
    # 2. each chunk's final state from its own inputs (decay to the chunk's end = last row)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay[..., -1, :], xdt)
    # 3. pass states across chunks: state entering chunk z = sum_c decay(c -> z) state_c
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
    # 4. the entering state's contribution to each step of the chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cumsum))
    y = (y_diag + y_off).reshape(b, c * q, h, p)
    return y[:, :length]


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recurrence step by step (reference for `ssd_chunked`; same arguments, no chunks)."""
    b, length, h, p = x.shape
    B, C = _heads(B, h), _heads(C, h)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        if reset is not None:
            decay = decay * (~reset[:, t, None]).to(decay.dtype)
        inp = (x[:, t] * dt[:, t, :, None])[..., None] * B[:, t, :, None, :]  # [b, h, p, n]
        state = decay[..., None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1)


def document_conv(conv: nn.Conv1d, x: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """A depthwise causal conv over x [b, d, l] whose taps stay within each document."""
    weight = conv.weight.squeeze(1)  # [d, K]; tap j looks back K - 1 - j positions
    k, length = weight.shape[-1], x.shape[-1]
    y = x.new_zeros(x.shape) if conv.bias is None else conv.bias[:, None].expand_as(x)
    for back in range(k):
        earlier = F.pad(x, (back, 0))[..., :length]
        same_doc = doc_ids == F.pad(doc_ids, (back, 0), value=-1)[..., :length]
        y = y + weight[:, k - 1 - back, None] * earlier * same_doc[:, None, :].to(x.dtype)
    return y


class GatedRMSNorm(nn.Module):
    """Mamba-2's RMSNormGated (norm_before_gate=False): rmsnorm(y * silu(z)) per group."""

    def __init__(self, width: int, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = fp32_or_wider(y * F.silu(z))
        g = g.unflatten(-1, (self.groups, -1))
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(y.dtype)


def _sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    """The whole layer's d_inner, heads and n_groups * d_state."""
    m = cfg.mamba2
    d = m.expand * cfg.d_model
    return d, d // m.head_dim, m.n_groups * m.d_state


@MIXERS.register("mamba2")
class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer: scalar decay per head, chunked matmul scan (model.mamba2)."""

    selective_recompute = "SSD scan"

    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TensorParallel = DENSE) -> None:
        super().__init__()
        m = cfg.mamba2
        d, heads, gn = _sizes(cfg)
        # Local sizes: under tensor parallelism a rank holds a block of heads and of B/C groups.
        self.d_inner = d // tp.size
        self.head_dim, self.d_state, self.n_groups = m.head_dim, m.d_state, m.n_groups // tp.size
        self.n_heads = heads // tp.size
        self.chunk_size = m.chunk_size
        self.conv_dim = self.d_inner + 2 * self.n_groups * m.d_state
        in_proj = Split(0, (d, d, gn, gn, heads))  # rows [z, x, B, C, dt]
        self.in_proj = tp.linear(cfg, cfg.d_model, sum(in_proj.parts), "in_proj", in_proj)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, padding=m.d_conv - 1
        )
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, cfg.norm_eps)
        self.out_proj = tp.linear(cfg, d, cfg.d_model, "out_proj", ROW_PARALLEL)
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True
        if not self.A_log.is_meta:  # shapes only (a rank's plan, a census): nothing to fill
            self.post_init_weights()

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Heads and B/C groups split: in_proj's [z, x, B, C, dt] parts and conv1d's [x, B, C]
        column-parallel; dt_bias, A_log, D and the gated norm's weight by head; out_proj row."""
        d, heads, gn = _sizes(cfg)
        per_head = ("dt_bias", "A_log", "D", "norm.weight")
        return TensorParallelPlan(
            splits={
                "in_proj.weight": Split(0, (d, d, gn, gn, heads)),  # rows [z, x, B, C, dt]
                "conv1d.weight": Split(0, (d, gn, gn)),
                "conv1d.bias": Split(0, (d, gn, gn)),
                "out_proj.weight": ROW_PARALLEL,
                **dict.fromkeys(per_head, COLUMN_PARALLEL),
            },
            divisible={
                "model.mamba2.head_dim": heads,
                "model.mamba2.n_groups": cfg.mamba2.n_groups,
            },
            collectives="all-reduce of out_proj's output (and of the input's gradient)",
            boundary=("in_proj", "out_proj"),
        )

    @torch.no_grad()
    def post_init_weights(self) -> None:
        """Mamba-2's init of A, D and the dt bias (HybridLM calls it after its generic pass)."""
        h = self.n_heads
        self.A_log.copy_(torch.log(torch.empty(h).uniform_(A_MIN, A_MAX)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(h) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.norm.weight.fill_(1.0)

    def forward(self, h: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, length, _ = h.shape
        z, xbc, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = xbc.transpose(1, 2)
        if doc_ids is None:
            xbc = self.conv1d(xbc)[..., :length]  # padding K-1 then cut: causal
        else:
            xbc = document_conv(self.conv1d, xbc, doc_ids)
        xbc = F.silu(xbc).transpose(1, 2)
        gn = self.n_groups * self.d_state
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        B = B.unflatten(-1, (self.n_groups, self.d_state))
        C = C.unflatten(-1, (self.n_groups, self.d_state))
        dt = F.softplus(fp32_or_wider(dt) + fp32_or_wider(self.dt_bias))
        A = -torch.exp(fp32_or_wider(self.A_log))
        reset = None if doc_ids is None else document_starts(doc_ids)

        def scan(x, dt, B, C, reset):  # noqa: ANN001, ANN202 (tensors)
            with torch.autocast(device_type=h.device.type, enabled=False):  # the scan in fp32
                x = fp32_or_wider(x)
                y = ssd_chunked(
                    x, dt, A, fp32_or_wider(B), fp32_or_wider(C), self.chunk_size, reset=reset
                )
                return y + fp32_or_wider(self.D)[:, None] * x

        y = recompute_region(scan, x, dt, B, C, reset)  # not kept under recompute=selective
        y = self.norm(y.flatten(-2).to(h.dtype), z)
        return self.out_proj(y)

    def step(
        self, h: torch.Tensor, entry: Mamba2State | None, position: int = 0
    ) -> tuple[torch.Tensor, Mamba2State]:
        """The recurrent form for incremental decoding: ``forward`` of h [b, t, D] continued from
        ``entry`` (None: a fresh sequence); returns (out [b, t, D], the entry after h).

        The x|B|C conv is a shift register over its last d_conv - 1 inputs; the SSD runs as its
        recurrence (`ssd_sequential` from a state): t Python steps per layer for a prompt.
        """
        b, t, _ = h.shape
        z, xbc, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = xbc.transpose(1, 2)  # [b, conv_dim, t]
        k = self.conv1d.weight.shape[-1]
        if entry is None:
            conv = xbc.new_zeros(b, self.conv_dim, k - 1)
            state = xbc.new_zeros(b, self.n_heads, self.head_dim, self.d_state, dtype=torch.float32)
        else:
            conv, state = entry.conv.to(xbc.dtype), entry.ssm
        window = torch.cat([conv, xbc], dim=-1)  # [b, conv_dim, k - 1 + t]
        xbc = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        xbc = F.silu(xbc).transpose(1, 2)
        gn = self.n_groups * self.d_state
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        B = _heads(B.unflatten(-1, (self.n_groups, self.d_state)), self.n_heads)
        C = _heads(C.unflatten(-1, (self.n_groups, self.d_state)), self.n_heads)
        dt = F.softplus(fp32_or_wider(dt) + fp32_or_wider(self.dt_bias))  # [b, t, heads]
        A = -torch.exp(fp32_or_wider(self.A_log))
        with torch.autocast(device_type=h.device.type, enabled=False):
            x, B, C = fp32_or_wider(x), fp32_or_wider(B), fp32_or_wider(C)
            ys = []
            for i in range(t):
                decay = torch.exp(dt[:, i] * A)[..., None, None]  # [b, heads, 1, 1]
                inp = (x[:, i] * dt[:, i, :, None])[..., None] * B[:, i, :, None, :]
                state = decay * state + inp
                ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, i]))
            y = torch.stack(ys, dim=1) + fp32_or_wider(self.D)[:, None] * x
        y = self.norm(y.flatten(-2).to(h.dtype), z)
        out = self.out_proj(y)
        return out, Mamba2State(conv=window[..., window.shape[-1] - (k - 1) :], ssm=state)
