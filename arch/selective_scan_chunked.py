"""The `chunked` Mamba-1 scan: chunk-boundary states only, each chunk recomputed in the backward.

The recurrence (per batch row, channel d and state n; a[d, n] = A[d, n] < 0):

    h_t = k_t exp(dt_t a) h_{t-1} + dt_t u_t B_t          k_t = keep_t in {0, 1}
    y_t = sum_n C_t[n] h_t[d, n]

is cut into chunks of Q steps. Within a chunk, with the entering state h_0 and
S_t = sum_{s<=t} dt_s a (the cumulative log-decay), h_t = exp(S_t) h_0 + local_t, where local_t is
the same recurrence started from zero; the chunk's last state enters the next chunk, so chunks
run one after the other. The forward keeps only the state entering each chunk ([l/Q, b, d, N]
instead of the `cpu` scan's [l, b, d, N]); the backward walks the chunks in reverse, recomputes
a chunk's states from its entering state and runs the adjoint recurrence inside it

    g_t = dL/dh_t|direct + k_{t+1} exp(dt_{t+1} a) g_{t+1}      (g_{Q} of the next chunk: carry)
    dL/d(dt_t a) = g_t h_{t-1} k_t exp(dt_t a),   dL/d(dt_t u_t B_t) = g_t,   dL/dh_0 = carry out.

Why a recurrence inside the chunk and not the quadratic "segment-sum" form of Mamba-2's SSD
(y_t = sum_{s<=t} sum_n C_t[n] exp(S_t - S_s)[d, n] B_s[n] dt_s u_s): Mamba-1's decay differs per
(d, n), so that form needs Q(Q+1)/2 exponentials per (b, d, n) and chunk where the recurrence
needs Q, with no matmul to absorb them. On CPU its forward alone (b4 d256 N16, l = 1024, without
even the carry between chunks) took 5x this scan's forward time at Q = 4 and 13-30x at Q = 16
(benchmarks/RESULTS.md). What makes the `cpu` scan slow at long l is memory traffic: it writes and
reads [l, b, d, N] tensors (decays, states, adjoints) far larger than the caches. Here each tensor
of a chunk is [Q, b, N, d] with Q chosen so that it stays cache-sized, and each per-chunk
operation (decays, drives, read-out, every gradient) is one batched op or matmul over the chunk.

A reset (k_t = 0) multiplies the decay by 0, exactly as `scan_loop`; k must be 0 or 1.
"""

from __future__ import annotations

import torch

# Elements of one [Q, b, N, d] chunk tensor: 2^18 fp32 = 1 MiB, so the ~5 live chunk tensors of the
# backward stay in L2 + L3 (b4 d256 N16: Q = 16, fastest of Q = 4..64 at l = 1024 and 4096 on CPU).
CHUNK_ELEMENTS = 2**18
MIN_CHUNK, MAX_CHUNK = 4, 256


def default_chunk_size(batch: int, d_inner: int, d_state: int) -> int:
    """Q such that one [Q, b, d, N] chunk tensor holds about `CHUNK_ELEMENTS` values."""
    q = CHUNK_ELEMENTS // max(1, batch * d_inner * d_state)
    return max(MIN_CHUNK, min(MAX_CHUNK, q))


def _chunk_states(
    h0: torch.Tensor,
    dt: torch.Tensor,
    dtu: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states h_1..h_Q [Q, b, N, d], decays [Q, b, N, d]) of one chunk entered with h0 [b, N, d].

    dt, dtu = dt * u: [Q, b, d]; a: [N, d]; b: [Q, b, N]; keep: [Q, b, 1, 1] or None.
    """
    decay = torch.exp(dt.unsqueeze(2) * a)
    if keep is not None:
        decay = decay * keep
    h = dtu.unsqueeze(2) * b.unsqueeze(-1)  # the drive, scanned in place
    h[0].addcmul_(decay[0], h0)
    for t in range(1, h.shape[0]):
        h[t].addcmul_(decay[t], h[t - 1])
    return h, decay


def _rowdot(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum_d x[..., d] h[..., n, d] -> [..., n], as a (1 x d) @ (d x N) matmul (measured 6x faster
    on CPU than the (N x d) @ (d x 1) matrix-vector form)."""
    return (x.unsqueeze(-2) @ h.transpose(-1, -2)).squeeze(-2)


class ChunkedScanFn(torch.autograd.Function):
    """The recurrence from ``h0`` in chunks of ``chunk`` steps, time-major; (y [l, b, d], h_l).

    Inputs: u, dt [l, b, d]; a [N, d]; b, c [l, b, N]; keep [l, b, 1, 1] or None; h0 [b, N, d]
    (all one float dtype, fp32 or wider). The state is laid out [.., N, d] with d innermost, so the
    sums over N (read-out, gradients) add contiguous rows. Saves the inputs and the l/Q
    chunk-entering states.
    """

    @staticmethod
    def forward(ctx, u, dt, a, b, c, keep, h0, chunk):  # noqa: ANN001 (autograd.Function)
        length = u.shape[0]
        dtu = dt * u
        y = u.new_empty(u.shape)
        entering = []
        h = h0
        for start in range(0, length, chunk):
            part = slice(start, start + chunk)
            entering.append(h)
            kp = None if keep is None else keep[part]
            hs, _ = _chunk_states(h, dt[part], dtu[part], a, b[part], kp)
            y[part] = (c[part].unsqueeze(-2) @ hs).squeeze(-2)  # sum_n C_t[n] h_t[n, d]
            h = hs[-1].clone()  # not a view: the chunk's [Q, b, N, d] buffer is freed
        ctx.save_for_backward(u, dt, a, b, c, keep, torch.stack(entering))
        ctx.chunk = chunk
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):  # noqa: ANN001
        u, dt, a, b, c, keep, entering = ctx.saved_tensors
        chunk, length = ctx.chunk, u.shape[0]
        dtu = dt * u
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_b, grad_c = torch.empty_like(b), torch.empty_like(c)
        grad_a = torch.zeros_like(a)
        gy = torch.zeros_like(u) if grad_y is None else grad_y
        # dL/dh at the end of the chunk being processed, from everything after it.
        carry = torch.zeros_like(entering[0]) if grad_h_last is None else grad_h_last
        starts = range(0, length, chunk)
        for index in reversed(range(len(starts))):
            part = slice(starts[index], starts[index] + chunk)
            h0 = entering[index]
            kp = None if keep is None else keep[part]
            hs, decay = _chunk_states(h0, dt[part], dtu[part], a, b[part], kp)
            grad_c[part] = _rowdot(gy[part], hs)
            g = gy[part].unsqueeze(2) * c[part].unsqueeze(-1)  # direct dL/dh_t, then adjoint
            g[-1] += carry
            for t in range(g.shape[0] - 2, -1, -1):
                g[t].addcmul_(decay[t + 1], g[t + 1])
            carry = g[0] * decay[0]
            # dL/d(dt_t a) = g_t h_{t-1} decay_t; h_{t-1} is h0 for the chunk's first step.
            g_exponent = g * decay
            g_exponent[0] *= h0
            g_exponent[1:] *= hs[:-1]
            del hs, decay
            grad_dt[part] = (g_exponent * a).sum(2)
            grad_a += (g_exponent * dt[part].unsqueeze(2)).sum((0, 1))
            # Through the drive dt u B.
            g_b = (b[part].unsqueeze(-2) @ g).squeeze(-2)  # sum_n B_t[n] g_t[n, d]: [Q, b, d]
            grad_dt[part] += u[part] * g_b
            grad_u[part] = dt[part] * g_b
            grad_b[part] = _rowdot(dtu[part], g)
        return grad_u, grad_dt, grad_a, grad_b, grad_c, None, carry, None


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest dtype of ``tensors``, at least fp32 (a float64 model stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    keep: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [b, d, l] = <h_t, C_t> (no D skip, no gate) and the last state h_l [b, d, N].

    u, delta [b, d, l] (delta after its bias and softplus); A [d, N]; B, C [b, N, l]; keep [b, l]
    (0 where a document starts, else 1) or None; ``state`` h_0 [b, d, N] or None (zeros). Computes
    in fp32 (float64 stays float64) outside autocast; y and h_l come back in that dtype, and
    gradients reach u, delta, A, B, C and ``state`` in their own dtypes.
    """
    bsz, d, length = u.shape
    n = A.shape[-1]
    chunk = chunk_size or default_chunk_size(bsz, d, n)
    with torch.autocast(device_type=u.device.type, enabled=False):
        dtype = _common_dtype(u, delta, A, B, C)
        u_t = u.to(dtype).permute(2, 0, 1).contiguous()  # [l, b, d]
        dt_t = delta.to(dtype).permute(2, 0, 1).contiguous()
        b_t = B.to(dtype).permute(2, 0, 1).contiguous()  # [l, b, N]
        c_t = C.to(dtype).permute(2, 0, 1).contiguous()
        keep_t = None if keep is None else keep.to(dtype).t()[:, :, None, None].contiguous()
        a_t = A.to(dtype).t().contiguous()  # [N, d]
        h0 = u_t.new_zeros(bsz, n, d) if state is None else state.to(dtype).transpose(1, 2)
        y, last = ChunkedScanFn.apply(u_t, dt_t, a_t, b_t, c_t, keep_t, h0.contiguous(), chunk)
    return y.permute(1, 2, 0), last.transpose(1, 2)
