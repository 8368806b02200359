"""The Mamba-1 mixer (`M`), with Jamba's RMSNorms on dt, B and C (`model.mamba`).

    x, z  = in_proj(h)                          x: the SSM input, z: the gate
    x     = silu(causal depthwise conv1d(x))    (with bias)
    dt, B, C = x_proj(x)                        then RMSNorm each (Jamba; `dt_norms=false` skips)
    delta = softplus(dt_proj(dt))               (bias inside the softplus)
    y     = selective_scan(x, delta, A=-exp(A_log), B, C) + D x
    out   = out_proj(y * silu(z))

Parameter names and layouts are HF Jamba's (`in_proj` rows: x then z; `x_proj` rows: dt, B, C;
`conv1d.weight` [d_inner, 1, K]), so checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arch.cache import MambaState
from arch.config import ModelConfig
from arch.documents import document_starts
from arch.layers_registry import MIXERS
from arch.numerics import fp32_or_wider
from arch.recompute import recompute_region
from arch.selective_scan import (
    cuda_kernels,
    resolve_backend,
    scan_from_state,
    selective_scan,
)
from arch.selective_scan_chunked import scan_chunked
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    DENSE,
    ROW_PARALLEL,
    Split,
    TensorParallel,
    TensorParallelPlan,
)

# The original Mamba's dt initialisation: dt ~ logUniform[DT_MIN, DT_MAX], floored at DT_FLOOR.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def _in_proj_split(cfg: ModelConfig) -> Split:
    """in_proj's rows [x; z], each cut by channel."""
    d = cfg.mamba.expand * cfg.d_model
    return Split(0, (d, d))


@MIXERS.register("mamba")
class Mamba(nn.Module):
    """Mamba-1 selective-scan mixer with Jamba's dt/B/C RMSNorms (model.mamba).

    Under tensor parallelism each rank holds a block of the d_inner channels (``d_inner`` is
    the local width): dt, B and C, full after x_proj's reduction and the replicated norms, enter
    the channel-split scan through ``tp.copy_to_region`` so their gradients sum over ranks.
    """

    selective_recompute = "conv, x_proj and selective scan"

    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TensorParallel = DENSE) -> None:
        super().__init__()
        m = cfg.mamba
        full = m.expand * cfg.d_model
        self.tp = tp
        self.d_inner = full // tp.size
        self.d_state = m.d_state
        self.dt_rank = m.rank(cfg.d_model)
        self.scan = m.scan
        # None: `scan_chunked` picks by device (parallel on CUDA, sequential on CPU).
        self.chunked_strategy = None if m.chunked_strategy == "auto" else m.chunked_strategy
        if m.scan == "cuda" and torch.empty(0).device.type != "meta":
            # Fail at build time, not mid-run; a meta build (plan, --dry-run) only counts.
            resolve_backend("cuda", torch.device("cuda"))
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        self.in_proj = tp.linear(cfg, cfg.d_model, 2 * full, "in_proj", _in_proj_split(cfg))
        self.conv1d = nn.Conv1d(d, d, m.d_conv, groups=d, padding=m.d_conv - 1, bias=m.conv_bias)
        self.x_proj = tp.linear(cfg, full, r + 2 * n, "x_proj", ROW_PARALLEL)
        # dt_proj keeps its bias (the softplus offset that sets dt's range), so it is a plain
        # Linear outside the preconditioner.
        self.dt_proj = nn.Linear(r, d, bias=True)
        norm = (lambda w: nn.RMSNorm(w, eps=cfg.norm_eps)) if m.dt_norms else (lambda w: None)
        self.dt_layernorm, self.b_layernorm, self.c_layernorm = norm(r), norm(n), norm(n)
        self.A_log = nn.Parameter(torch.empty(d, n))
        self.D = nn.Parameter(torch.empty(d))
        self.out_proj = tp.linear(cfg, full, cfg.d_model, "out_proj", ROW_PARALLEL)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True  # mamba_ssm's marker: decaying them pulls A, D to 0
        if not self.A_log.is_meta:  # shapes only (a rank's plan, a census): nothing to fill
            self.post_init_weights()

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Channels split: in_proj column over both halves [x; z]; conv1d, dt_proj, A_log, D by
        channel; x_proj and out_proj row-parallel."""
        d = cfg.mamba.expand * cfg.d_model
        channels = ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D")
        return TensorParallelPlan(
            splits={
                "in_proj.weight": _in_proj_split(cfg),
                "x_proj.weight": ROW_PARALLEL,
                "out_proj.weight": ROW_PARALLEL,
                **dict.fromkeys(channels, COLUMN_PARALLEL),
            },
            divisible={"model.mamba.expand": d},
            collectives="all-reduce of x_proj's and out_proj's outputs; of dt, B, C's gradients",
            boundary=("in_proj", "out_proj"),  # x_proj's all-reduce stays inside
        )

    def _dt_b_c(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt, B, C [b, l, .] from the conv output x [b, d, l] (full on every rank)."""
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        if self.dt_layernorm is not None:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return self.tp.copy_to_region(dt), self.tp.copy_to_region(B), self.tp.copy_to_region(C)

    @torch.no_grad()
    def post_init_weights(self) -> None:
        """The original Mamba's init of A, D and dt_proj, which a generic Linear init would undo.

        The model calls this after its N(0, std) pass over every Linear (`arch.seeded_init.init_unit`).
        """
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(d, n))
        self.D.fill_(1.0)
        bound = r**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(d) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def _conv(self, x: torch.Tensor, backend: str, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """silu(causal depthwise conv) over [b, d, l]; the window never reaches into the previous
        document when ``doc_ids`` [b, l] is given."""
        if doc_ids is not None:
            return F.silu(self._document_conv(x, doc_ids))
        if backend == "cuda":
            _, conv_fn = cuda_kernels()  # type: ignore[misc]
            weight = self.conv1d.weight.squeeze(1)
            return conv_fn(x, weight, self.conv1d.bias, activation="silu")
        return F.silu(self.conv1d(x)[..., : x.shape[-1]])  # padding K-1 then cut: causal

    def _document_conv(self, x: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        """The causal conv as K shifted products, each masked to taps of the same document."""
        weight = self.conv1d.weight.squeeze(1)  # [d, K]; tap j looks back K - 1 - j positions
        k, length = weight.shape[-1], x.shape[-1]
        y = (
            x.new_zeros(x.shape)
            if self.conv1d.bias is None
            else self.conv1d.bias[:, None].expand_as(x)
        )
        for back in range(k):
            earlier = F.pad(x, (back, 0))[..., :length]
            same_doc = doc_ids == F.pad(doc_ids, (back, 0), value=-1)[..., :length]
            y = y + weight[:, k - 1 - back, None] * earlier * same_doc[:, None, :].to(x.dtype)
        return y

    def forward(self, h: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        backend = resolve_backend(self.scan, h.device)
        xz = self.in_proj(h)
        # Between the two projections: a dozen [b, d, l] tensors and the scan's states (the
        # `cpu` scan's [l, b, d, N]), recomputed in the backward under recompute=selective.
        y = recompute_region(lambda xz, doc_ids: self._mix(xz, doc_ids, backend), xz, doc_ids)
        return self.out_proj(y.transpose(1, 2).to(h.dtype))

    def _mix(self, xz: torch.Tensor, doc_ids: torch.Tensor | None, backend: str) -> torch.Tensor:
        """conv, x_proj, dt/B/C and the gated scan: in_proj's output [b, l, 2 d] -> y [b, d, l]."""
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # [b, d, l] each
        x = self._conv(x, backend, doc_ids)
        dt, B, C = self._dt_b_c(x)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # bias added inside the softplus
        return selective_scan(
            x,
            delta,
            -torch.exp(fp32_or_wider(self.A_log)),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            z=z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            backend=backend,
            keep=None if doc_ids is None else document_starts(doc_ids).logical_not().float(),
            chunked_strategy=self.chunked_strategy,
        )

    def step(
        self, h: torch.Tensor, entry: MambaState | None, position: int = 0
    ) -> tuple[torch.Tensor, MambaState]:
        """The recurrent form for incremental decoding: ``forward`` of h [b, t, D] continued from
        ``entry`` (None: a fresh sequence); returns (out [b, t, D], the entry after h).

        The conv is a shift register over the last d_conv - 1 inputs; then per position
        dA = exp(delta A), state = dA state + delta B x, y = C.state + D x, gated by silu(z).
        A prompt (t > 1) runs the same recurrence position by position (t Python steps per
        layer; the `chunked` scan's forward when that is the back-end; no fused-kernel prefill).
        """
        b, t, _ = h.shape
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # [b, d, t] each
        k = self.conv1d.weight.shape[-1]
        if entry is None:
            conv = x.new_zeros(b, self.d_inner, k - 1)
            ssm = x.new_zeros(b, self.d_inner, self.d_state, dtype=torch.float32)
        else:
            conv, ssm = entry.conv.to(x.dtype), entry.ssm
        window = torch.cat([conv, x], dim=-1)  # [b, d, k - 1 + t]
        x = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner))
        dt, B, C = self._dt_b_c(x)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)
        with torch.autocast(device_type=h.device.type, enabled=False):
            delta = F.softplus(fp32_or_wider(delta) + fp32_or_wider(self.dt_proj.bias)[:, None])
            u = fp32_or_wider(x)
            # A prompt with the chunked scan keeps no [b, d, t, N] decays; one token: the step.
            chunked = t > 1 and resolve_backend(self.scan, h.device) == "chunked"
            args = (
                u,
                delta,
                -torch.exp(fp32_or_wider(self.A_log)),
                fp32_or_wider(B.transpose(1, 2)),
                fp32_or_wider(C.transpose(1, 2)),
            )
            if chunked:
                y, ssm = scan_chunked(*args, state=ssm, strategy=self.chunked_strategy)
            else:
                y, ssm = scan_from_state(*args, state=ssm)
            y = (y + u * fp32_or_wider(self.D)[:, None]) * F.silu(fp32_or_wider(z))
        out = self.out_proj(y.transpose(1, 2).to(h.dtype))
        return out, MambaState(conv=window[..., window.shape[-1] - (k - 1) :], ssm=ssm)
