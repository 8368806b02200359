"""Mamba-1's selective scan and its back-ends (`model.mamba.scan`).

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        h: [b, d, N], h_0 = 0
    y_t = <h_t, C_t> + D * u_t,   then  y * silu(z)

Shapes follow `mamba_ssm.selective_scan_fn`: u, delta, z [b, d, l]; A [d, N]; B, C [b, N, l];
D, delta_bias [d]. The decay exp(delta * A) differs per (channel, state) pair, so the
recurrence has no matmul form (unlike Mamba-2's SSD) and is computed step by step.

Back-ends:
- ``loop``: the per-timestep reference recorded by autograd (as in HF's slow path); tests only,
  its backward is slow and its graph grows with l.
- ``cpu``: `SelectiveScanFn`, the same loop run outside autograd with an explicit reverse-scan
  backward; exact against ``loop`` (fp32) and ~10x faster fwd+bwd on CPU. Stores every state.
- ``chunked``: `arch.selective_scan_chunked`, chunks that keep only the chunk-boundary states and
  are recomputed in the backward; exact against ``loop``. On CPU a per-step loop in cache-sized
  chunks, 2.7-5x faster than ``cpu`` fwd+bwd with ~7.6x less peak memory at l = 4096; on CUDA
  parallel inside each chunk (doubling scans, no per-step launches; benchmarks/RESULTS.md).
- ``cuda``: `mamba_ssm`'s fused kernel, when it can be imported (a CUDA build).
- ``auto``: ``cuda`` on CUDA tensors when `mamba_ssm` imports, ``chunked`` on CPU, else
  `AUTO_CUDA_WITHOUT_KERNEL` (see `resolve_backend`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from arch.numerics import fp32_or_wider
from arch.registry import ConfigError
from arch.selective_scan_chunked import scan_chunked

Kernel = Callable[..., torch.Tensor]

# What ``auto`` means on CUDA when mamba_ssm does not import: ``chunked`` (its parallel strategy).
# Measured on an H200 (benchmarks/RESULTS.md, b 8, d_inner 1024, N 16): the whole selective scan
# fwd+bwd 1.98x / 1.83x faster than ``cpu`` at l = 2048 / 4096, the Mamba sub-layer in bf16
# autocast 42 ms against 74 ms, with 0.67x / 0.4x of ``cpu``'s peak memory (which stores every
# state). A whole training run on a GPU with it is still to be measured (gpu_check's jamba row).
AUTO_CUDA_WITHOUT_KERNEL = "chunked"


@functools.cache
def cuda_kernels() -> tuple[Kernel, Kernel] | None:
    """(selective_scan_fn, causal_conv1d_fn) from mamba_ssm / causal_conv1d, or None.

    Imported lazily: mamba_ssm's module top imports its CUDA extension, so it fails without one.
    """
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        return None
    return selective_scan_fn, causal_conv1d_fn


def resolve_backend(name: str, device: torch.device) -> str:
    """The back-end that ``name`` means for tensors on ``device``.

    ``auto``: the fused kernel on CUDA when `mamba_ssm` imports; ``chunked`` on CPU, where it was
    faster than ``cpu`` at every measured length (2.7-5x at l = 256..4096) with ~7.6x less memory;
    `AUTO_CUDA_WITHOUT_KERNEL` on CUDA without the kernel.
    """
    if name == "auto":
        if device.type == "cuda":
            return "cuda" if cuda_kernels() is not None else AUTO_CUDA_WITHOUT_KERNEL
        return "chunked"
    if name == "cuda" and cuda_kernels() is None:
        raise ConfigError(
            "model.mamba.scan",
            "cuda needs the mamba_ssm and causal_conv1d CUDA packages, which do not import here; "
            "install them or use scan=auto",
        )
    return name


def scan_loop(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference recurrence y_t = <h_t, C_t>, one autograd-recorded step per position.

    ``keep`` [b, l] (1, or 0 where a new document starts) multiplies the decay: the state is
    reset at document boundaries of packed sequences.
    """
    b, d, length = u.shape
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None])  # [b, d, l, N]
    if keep is not None:
        decay = decay * keep[:, None, :, None]
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # [b, d, l, N]
    h = u.new_zeros(b, d, A.shape[-1])
    ys = []
    for t in range(length):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h @ C[:, :, t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, dim=-1)


def scan_from_state(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence continued from ``state`` h [b, d, N]: (y [b, d, l], the last state).

    Inference only (incremental decoding, `Mamba.step`): delta already through its bias and
    softplus, everything fp32. One Python step per position, as `scan_loop`; a one-token decode
    step is one iteration, a prompt (prefill) costs l iterations per Mamba layer.
    """
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None])  # [b, d, l, N]
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # [b, d, l, N]
    h = state
    ys = []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h @ C[:, :, t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, dim=-1), h


class SelectiveScanFn(torch.autograd.Function):
    """The recurrence with a hand-written backward; all work in fp32, time-major [l, b, d, N].

    Forward stores every state h_t (b*d*l*N floats). Backward recomputes the decays and runs
    the adjoint recurrence backwards in time: g_t = dL/dh_t|direct + exp(delta_{t+1} A) g_{t+1};
    then dL/d(delta_t A) = g_t * h_{t-1} * exp(delta_t A) and dL/d(delta_t u_t B_t) = g_t.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, keep):  # noqa: ANN001 (autograd.Function signature)
        dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        with torch.autocast(device_type=u.device.type, enabled=False):
            u_t = fp32_or_wider(u).permute(2, 0, 1).contiguous()  # [l, b, d]
            dt_t = fp32_or_wider(delta).permute(2, 0, 1).contiguous()
            a = fp32_or_wider(A)
            b_t = fp32_or_wider(B).permute(2, 0, 1).contiguous()  # [l, b, N]
            c_t = fp32_or_wider(C).permute(2, 0, 1).contiguous()
            # keep_t [l, b, 1, 1]: 0 resets the state where a document starts (see scan_loop).
            keep_t = None if keep is None else keep.float().t()[:, :, None, None].contiguous()
            decay = _decay(dt_t, a, keep_t)  # [l, b, d, N]
            h = (dt_t * u_t).unsqueeze(-1) * b_t.unsqueeze(2)  # the drive, scanned in place
            for t in range(1, h.shape[0]):
                h[t].addcmul_(decay[t], h[t - 1])
            y = (h @ c_t.unsqueeze(-1)).squeeze(-1)  # [l, b, d]
        ctx.save_for_backward(u_t, dt_t, a, b_t, c_t, h, keep_t)
        ctx.dtypes = dtypes
        return y.permute(1, 2, 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001
        u_t, dt_t, a, b_t, c_t, h, keep_t = ctx.saved_tensors
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            gy = fp32_or_wider(grad_y).permute(2, 0, 1)  # [l, b, d]
            grad_c = (h.transpose(-1, -2) @ gy.unsqueeze(-1)).squeeze(-1)  # [l, b, N]
            g = gy.unsqueeze(-1) * c_t.unsqueeze(2)  # dL/dh_t, accumulated backwards in place
            decay = _decay(dt_t, a, keep_t)  # d(keep exp(x))/dx = keep exp(x): same formulas
            for t in range(g.shape[0] - 2, -1, -1):
                g[t].addcmul_(decay[t + 1], g[t + 1])
            # Through the decay exp(delta A): h_0's predecessor is zero, so t = 0 contributes 0.
            g_exponent = g[1:] * h[:-1] * decay[1:]  # dL/d(delta_t A), [l-1, b, d, N]
            grad_delta = torch.zeros_like(dt_t)
            grad_delta[1:] = (g_exponent * a).sum(-1)
            grad_a = torch.einsum("lbdn,lbd->dn", g_exponent, dt_t[1:])
            # Through the drive delta u B.
            g_b = (g @ b_t.unsqueeze(-1)).squeeze(-1)  # sum_N g * B, [l, b, d]
            grad_delta += u_t * g_b
            grad_u = dt_t * g_b
            grad_b = ((dt_t * u_t).unsqueeze(-2) @ g).squeeze(-2)  # [l, b, N]
        grads = (grad_u, grad_delta, grad_a, grad_b, grad_c)
        grads = tuple(g if g.ndim == 2 else g.permute(1, 2, 0) for g in grads)
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)), None)


def _decay(dt_t: torch.Tensor, a: torch.Tensor, keep_t: torch.Tensor | None) -> torch.Tensor:
    decay = torch.exp(dt_t.unsqueeze(-1) * a)
    return decay if keep_t is None else decay * keep_t


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    backend: str = "auto",
    keep: torch.Tensor | None = None,
    chunked_strategy: str | None = None,
) -> torch.Tensor:
    """The full selective scan, ``mamba_ssm.selective_scan_fn``'s signature; fp32 result.

    ``keep`` [b, l] resets the state where it is 0 (document starts); mamba_ssm's kernel has no
    such input, so a reset scan runs the pure-torch path (``cpu``) on any device.
    ``chunked_strategy``: `scan_chunked`'s ``strategy`` (None: by device) for the ``chunked``
    back-end.
    """
    backend = resolve_backend(backend, u.device)
    if backend == "cuda" and keep is not None:
        backend = "cpu"
    if backend == "cuda":
        scan_fn, _ = cuda_kernels()  # type: ignore[misc]
        return scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus).float()
    u, delta = fp32_or_wider(u), fp32_or_wider(delta)
    if delta_bias is not None:
        delta = delta + fp32_or_wider(delta_bias)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if backend == "loop":
        y = scan_loop(u, delta, fp32_or_wider(A), fp32_or_wider(B), fp32_or_wider(C), keep)
    elif backend == "cpu":
        y = SelectiveScanFn.apply(u, delta, A, B, C, keep)
    elif backend == "chunked":
        y, _ = scan_chunked(u, delta, A, B, C, keep, strategy=chunked_strategy)
    else:
        raise ValueError(f"unknown selective-scan back-end {backend!r}")
    if D is not None:
        y = y + u * fp32_or_wider(D)[:, None]
    if z is not None:
        y = y * F.silu(fp32_or_wider(z))
    return y
