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

Two strategies inside a chunk (`scan_chunked`'s ``strategy``):
- ``sequential`` (`ChunkedScanFn`, the CPU default): the above, a per-step ``addcmul_`` loop over
  cache-sized chunks. On a GPU every step is a kernel launch: ~3 per-step loops (forward,
  recomputation, adjoint) plus ~35 launches per chunk of Q = 4 (H200, bf16 autocast, a Mamba
  layer's fwd+bwd at 8 x 2048 tokens: 381 ms with it, 69.9 ms with the `cpu` scan).
- ``parallel`` (`ParallelChunkedScanFn`, the CUDA default): groups of chunks at once, viewed as
  [G, Q, b, N, d]: decays and drives for the whole group, the in-chunk recurrence as a log2(Q)
  Hillis-Steele doubling scan (products of decays <= 1: stable), then the chunk-end states carried
  across chunks one chunk at a time (two small ops per chunk), then each position's cumulative
  decay times its chunk's entering state added. The adjoint runs the same scan reversed. Kernel
  launches: ~4 log2(Q) per group and scan, a few per chunk, none per step; the price is log2(Q)
  passes over group-sized tensors, so on CPU it is 2.3-9x slower than ``sequential``. Measured
  on an H200 (the scan alone, fp32 fwd+bwd, b 8, d 1024, N 16, l = 2048): 38 ms at Q = 16,
  against 71 ms for the `cpu` scan and 404 ms for ``sequential`` (benchmarks/RESULTS.md).
  Groups are cut so that one [group * Q, b, N, d] tensor stays under `GROUP_ELEMENTS` and run
  one after the other, which bounds the transient memory whatever the length.

Both save only the inputs and the l/Q chunk-entering states and recompute the states in the
backward. A reset (k_t = 0) multiplies the decay by 0, exactly as `scan_loop`; k must be 0 or 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Elements of one [Q, b, N, d] chunk tensor: 2^18 fp32 = 1 MiB, so the ~5 live chunk tensors of the
# backward stay in L2 + L3 (b4 d256 N16: Q = 16; on CPU at l = 1024 and 4096, 16 and 32 tie and
# 8 and 64 are 5-25% slower).
CHUNK_ELEMENTS = 2**18
MIN_CHUNK, MAX_CHUNK = 4, 256


# Intra-op threads: one per this many state elements of a step ([b, N, d]), at most torch's setting.
# The scan issues ~30 mid-sized ops per chunk; with 2 threads on a shared 2-core machine each op's
# thread hand-off cost more than it saved (b4 d256 N16, l = 4096: 3.6 s with 2 threads, 0.95 s
# with 1), so small states run single-threaded.
ELEMENTS_PER_THREAD = 2**16


@contextlib.contextmanager
def _intra_op_threads(state_elements: int) -> Iterator[None]:
    """torch's intra-op threads limited to one per `ELEMENTS_PER_THREAD`, restored on exit."""
    before = torch.get_num_threads()
    wanted = max(1, min(before, state_elements // ELEMENTS_PER_THREAD))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)


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
    out: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states h_1..h_Q, decays), both [Q, b, N, d], of one chunk entered with h0 [b, N, d],
    written into the buffers ``out``.

    dt, dtu = dt * u: [Q, b, d]; a: [N, d]; b: [Q, b, N]; keep: [Q, b, 1, 1] or None.
    """
    h, decay = (buf[: dt.shape[0]] for buf in out)
    torch.mul(dt.unsqueeze(2), a, out=decay).exp_()
    if keep is not None:
        decay.mul_(keep)
    torch.mul(dtu.unsqueeze(2), b.unsqueeze(-1), out=h)  # the drive, scanned in place
    h[0].addcmul_(decay[0], h0)
    for t in range(1, h.shape[0]):
        h[t].addcmul_(decay[t], h[t - 1])
    return h, decay


def _rowdot(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum_d x[..., d] h[..., n, d] -> [..., n], as a (1 x d) @ (d x N) matmul (measured 6x faster
    on CPU than the (N x d) @ (d x 1) matrix-vector form)."""
    return (x.unsqueeze(-2) @ h.transpose(-1, -2)).squeeze(-2)


def _buffers(like: torch.Tensor, chunk: int, count: int) -> list[torch.Tensor]:
    """``count`` [chunk, b, N, d] work buffers, reused by every chunk: a fresh 1 MiB tensor per op
    costs its page faults again (measured 4x the time of exp into a reused buffer)."""
    return [like.new_empty(chunk, *like.shape) for _ in range(count)]


def _time_major(x: torch.Tensor, part: slice) -> torch.Tensor:
    """The chunk ``part`` of x [b, ..., l] as a contiguous [Q, b, ...] (a cache-sized copy)."""
    x = x[..., part]
    return x.permute(x.dim() - 1, *range(x.dim() - 1)).contiguous()


def _keep(keep: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if keep is None else _time_major(keep, part)[:, :, None, None]


# ---- the parallel strategy ------------------------------------------------------------------
# Chunk length Q of the parallel strategy: log2(Q) doubling passes over a group's tensors (memory
# bound) against l/Q sequential carry steps of one [b, N, d] state (launch bound). Measured on an
# H200 (scan fwd+bwd, fp32, b 8, d 1024, N 16, l = 2048; benchmarks/RESULTS.md): Q = 4 / 8 / 16 /
# 32 / 64 took 37 / 35 / 38 / 43 / 47 ms. 16 is within 8% of the fastest there and keeps half of
# Q = 8's carry launches, which dominate for small states.
PARALLEL_CHUNK = 16
# Elements of one full-size [group * Q, b, N, d] tensor of the parallel strategy: 2^27 fp32 =
# 512 MiB. Its forward holds 4 such tensors at once (decays and states, each with the doubling's
# second buffer) and its backward 6 (plus the adjoint and its multipliers), so a group's transient
# memory stays under ~3 GiB whatever l is; groups run one after the other.
GROUP_ELEMENTS = 2**27
STRATEGIES = ("sequential", "parallel")


def default_group_chunks(batch: int, d_inner: int, d_state: int, chunk: int) -> int:
    """Chunks per group of the parallel strategy: a [group * Q, b, N, d] tensor of at most
    `GROUP_ELEMENTS` values (at least one chunk)."""
    return max(1, GROUP_ELEMENTS // max(1, chunk * batch * d_inner * d_state))


def _groups(length: int, chunk: int, group: int) -> list[tuple[slice, int]]:
    """(part, q): spans of whole chunks of q steps covering [0, length): groups of ``group``
    chunks of ``chunk`` steps, then the remaining whole chunks, then the ragged tail as one
    chunk of its own length."""
    spans, start = [], 0
    step = chunk * group
    while length - start >= step:
        spans.append((slice(start, start + step), chunk))
        start += step
    whole = (length - start) // chunk * chunk
    if whole:
        spans.append((slice(start, start + whole), chunk))
        start += whole
    if length > start:
        spans.append((slice(start, length), length - start))
    return spans


def _doubling_scan(
    x: torch.Tensor, m: torch.Tensor, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, m) scanned along dim 1 of [G, Q, ...]: x_t + m_t x_{t-1} (reverse: x_t + m_t x_{t+1}),
    and m's inclusive cumulative product, in log2(Q) Hillis-Steele passes.

    Each pass composes every position with the one k before it (k = 1, 2, 4, ...). The slices
    overlap, so each pass writes into a second pair of buffers (ping-pong) and the result lies in
    either pair; both inputs are overwritten. m only multiplies decays <= 1, so nothing overflows
    (unlike exp of a cumulative log-decay sum).
    """
    q = x.shape[1]
    if q == 1:
        return x, m
    x_next, m_next = torch.empty_like(x), torch.empty_like(m)
    k = 1
    while k < q:
        dst, src, same = slice(k, None), slice(None, q - k), slice(None, k)
        if reverse:
            dst, src, same = src, dst, slice(q - k, None)
        torch.addcmul(x[:, dst], m[:, dst], x[:, src], out=x_next[:, dst])
        torch.mul(m[:, dst], m[:, src], out=m_next[:, dst])
        x_next[:, same] = x[:, same]  # no partner k steps away: already complete
        m_next[:, same] = m[:, same]
        x, x_next, m, m_next = x_next, x, m_next, m
        k *= 2
    return x, m


def _decays(dt: torch.Tensor, a: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """keep_t exp(dt_t a) [T, b, N, d] from dt [T, b, d], a [N, d], keep [T, b, 1, 1] or None."""
    decay = torch.mul(dt.unsqueeze(2), a).exp_()
    return decay if keep is None else decay.mul_(keep)


def _group_states(
    h_in: torch.Tensor,
    decay: torch.Tensor,
    drive: torch.Tensor,
    q: int,
    entering: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states h [T, b, N, d], chunk-entering states [T / q, b, N, d]) of a group of T / q chunks
    entered with h_in [b, N, d], all chunks at once.

    ``drive`` (dt u B) is scanned inside each chunk with ``decay`` (both overwritten); the
    chunk-end states are carried across chunks one chunk at a time (h_end = P_end h_enter +
    local_end, two small ops per chunk), then every position adds its in-chunk cumulative decay
    times its chunk's entering state. With ``entering`` given (the backward's recomputation)
    the carry loop is skipped.
    """
    chunks = drive.shape[0] // q
    shape = (chunks, q, *drive.shape[1:])
    h, cumulative = _doubling_scan(drive.view(shape), decay.view(shape), reverse=False)
    if entering is None:
        entering = h.new_empty(chunks, *h_in.shape)
        state = h_in
        for c in range(chunks):
            entering[c] = state
            state = torch.addcmul(h[c, -1], cumulative[c, -1], state)
    h.addcmul_(cumulative, entering.unsqueeze(1))
    return h.view(drive.shape), entering


class ChunkedScanFn(torch.autograd.Function):
    """The recurrence from ``h0`` in chunks of ``chunk`` steps; (y [b, d, l], h_l [b, N, d]).

    Inputs: u, dt [b, d, l]; a [N, d]; b, c [b, N, l]; keep [b, l] or None; h0 [b, N, d] (all one
    float dtype, fp32 or wider). Each chunk is computed time-major, with the state laid out
    [Q, b, N, d] (d innermost, so the sums over N add contiguous rows); only chunk-sized slices
    are transposed, never the whole sequence. Saves the inputs and the l/Q chunk-entering states.
    """

    @staticmethod
    def forward(ctx, u, dt, a, b, c, keep, h0, chunk):  # noqa: ANN001 (autograd.Function)
        with _intra_op_threads(h0.numel()):
            return ChunkedScanFn._forward(ctx, u, dt, a, b, c, keep, h0, chunk)

    @staticmethod
    def _forward(ctx, u, dt, a, b, c, keep, h0, chunk):  # noqa: ANN001, ANN205
        length = u.shape[-1]
        y = u.new_empty(u.shape)
        buffers = _buffers(h0, min(chunk, length), 2)
        entering = []
        h = h0
        for start in range(0, length, chunk):
            part = slice(start, start + chunk)
            entering.append(h)
            dt_c = _time_major(dt, part)
            dtu_c = dt_c * _time_major(u, part)
            hs, _ = _chunk_states(
                h, dt_c, dtu_c, a, _time_major(b, part), _keep(keep, part), buffers
            )
            y_c = (_time_major(c, part).unsqueeze(-2) @ hs).squeeze(-2)  # sum_n C_t[n] h_t[n, d]
            y[..., part] = y_c.permute(1, 2, 0)
            h = hs[-1].clone()  # the buffer is overwritten by the next chunk
        ctx.save_for_backward(u, dt, a, b, c, keep, torch.stack(entering))
        ctx.chunk = chunk
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):  # noqa: ANN001
        # saved_tensors read once: inside a recomputed region (`arch.recompute`) each saved
        # tensor can be unpacked only once.
        saved = ctx.saved_tensors
        with _intra_op_threads(saved[-1][0].numel()):
            return ChunkedScanFn._backward(ctx, saved, grad_y, grad_h_last)

    @staticmethod
    def _backward(ctx, saved, grad_y, grad_h_last):  # noqa: ANN001, ANN205
        u, dt, a, b, c, keep, entering = saved
        chunk, length = ctx.chunk, u.shape[-1]
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_b, grad_c = torch.empty_like(b), torch.empty_like(c)
        grad_a = torch.zeros_like(a)
        gy = torch.zeros_like(u) if grad_y is None else grad_y
        # dL/dh at the end of the chunk being processed, from everything after it.
        carry = torch.zeros_like(entering[0]) if grad_h_last is None else grad_h_last
        buffers = _buffers(entering[0], min(chunk, length), 4)
        starts = range(0, length, chunk)
        for index in reversed(range(len(starts))):
            part = slice(starts[index], starts[index] + chunk)
            h0 = entering[index]
            dt_c, u_c, b_c, gy_c = (_time_major(x, part) for x in (dt, u, b, gy))
            dtu_c = dt_c * u_c
            hs, decay = _chunk_states(h0, dt_c, dtu_c, a, b_c, _keep(keep, part), buffers[:2])
            g, work = (buf[: hs.shape[0]] for buf in buffers[2:])
            grad_c[..., part] = _rowdot(gy_c, hs).permute(1, 2, 0)
            torch.mul(gy_c.unsqueeze(2), _time_major(c, part).unsqueeze(-1), out=g)  # direct
            g[-1] += carry
            for t in range(g.shape[0] - 2, -1, -1):  # ... plus what flows back through h_{t+1}
                g[t].addcmul_(decay[t + 1], g[t + 1])
            carry = g[0] * decay[0]
            # dL/d(dt_t a) = g_t h_{t-1} decay_t, in place of the decays; h_{t-1} is h0 first.
            g_exponent = decay.mul_(g)
            g_exponent[0] *= h0
            g_exponent[1:] *= hs[:-1]
            grad_dt_c = torch.mul(g_exponent, a, out=work).sum(2)
            grad_a += torch.mul(g_exponent, dt_c.unsqueeze(2), out=work).sum((0, 1))
            # Through the drive dt u B.
            g_b = (b_c.unsqueeze(-2) @ g).squeeze(-2)  # sum_n B_t[n] g_t[n, d]: [Q, b, d]
            grad_dt[..., part] = grad_dt_c.addcmul_(u_c, g_b).permute(1, 2, 0)
            grad_u[..., part] = (dt_c * g_b).permute(1, 2, 0)
            grad_b[..., part] = _rowdot(dtu_c, g).permute(1, 2, 0)
        return grad_u, grad_dt, grad_a, grad_b, grad_c, None, carry, None


class ParallelChunkedScanFn(torch.autograd.Function):
    """`ChunkedScanFn`'s recurrence, parallel inside each chunk: (y [b, d, l], h_l [b, N, d]).

    The same inputs, plus ``group``: chunks processed at once. Per group of chunks the decays,
    drives, read-out and gradients are each one batched op over the whole group and each doubling
    pass is four, so a group issues O(log2 Q) kernels plus a few per chunk for the carry between
    chunks, never one per step; only that carry and the order of the groups are sequential.
    Saves the inputs and the l/Q chunk-entering states; the backward recomputes a group's states
    from them all at once (no carry loop) and runs the adjoint recurrence with the same doubling
    scan reversed.
    """

    @staticmethod
    def forward(ctx, u, dt, a, b, c, keep, h0, chunk, group):  # noqa: ANN001 (autograd.Function)
        y = u.new_empty(u.shape)
        entering = []
        h = h0
        for part, q in _groups(u.shape[-1], chunk, group):
            dt_g = _time_major(dt, part)
            decay = _decays(dt_g, a, _keep(keep, part))
            drive = (dt_g * _time_major(u, part)).unsqueeze(2) * _time_major(b, part).unsqueeze(-1)
            hs, enter = _group_states(h, decay, drive, q)
            entering.append(enter)
            del decay, drive  # the doubling's buffers: free before the read-out
            y[..., part] = (_time_major(c, part).unsqueeze(-2) @ hs).squeeze(-2).permute(1, 2, 0)
            h = hs[-1].clone()
        ctx.save_for_backward(u, dt, a, b, c, keep, torch.cat(entering))
        ctx.chunk, ctx.group = chunk, group
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):  # noqa: ANN001
        u, dt, a, b, c, keep, entering = ctx.saved_tensors  # read once (see ChunkedScanFn)
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_b, grad_c = torch.empty_like(b), torch.empty_like(c)
        grad_a = torch.zeros_like(a)
        gy = torch.zeros_like(u) if grad_y is None else grad_y
        carry = torch.zeros_like(entering[0]) if grad_h_last is None else grad_h_last
        spans = _groups(u.shape[-1], ctx.chunk, ctx.group)
        ends = [0]
        for part, q in spans:
            ends.append(ends[-1] + (part.stop - part.start) // q)
        for index in reversed(range(len(spans))):
            part, q = spans[index]
            enter = entering[ends[index] : ends[index + 1]]
            carry, grad_a_group = ParallelChunkedScanFn._backward_group(
                part, q, enter, carry, (u, dt, a, b, c, keep, gy), (grad_u, grad_dt, grad_b, grad_c)
            )
            grad_a += grad_a_group
        return grad_u, grad_dt, grad_a, grad_b, grad_c, None, carry, None, None

    @staticmethod
    def _backward_group(part, q, enter, carry, inputs, grads):  # noqa: ANN001, ANN205
        """Writes the group's slices of ``grads``; returns (dL/dh at the group's entry, its
        contribution to dL/da)."""
        u, dt, a, b, c, keep, gy = inputs
        grad_u, grad_dt, grad_b, grad_c = grads
        dt_g, u_g, b_g, gy_g = (_time_major(x, part) for x in (dt, u, b, gy))
        dtu_g = dt_g * u_g
        decay = _decays(dt_g, a, _keep(keep, part))
        drive = dtu_g.unsqueeze(2) * b_g.unsqueeze(-1)
        h, _ = _group_states(enter[0], decay.clone(), drive, q, entering=enter)
        del drive
        grad_c[..., part] = _rowdot(gy_g, h).permute(1, 2, 0)
        # Adjoint: g_t = C_t gy_t + m_t g_{t+1}, m_t = decay_{t+1} inside a chunk; the chunk's last
        # position takes the carry from the next chunk instead (m = 1: R_t = prod_{s>t} decay_s).
        chunks = decay.shape[0] // q
        decay_c = decay.view(chunks, q, *decay.shape[1:])
        m = torch.empty_like(decay_c)
        m[:, :-1] = decay_c[:, 1:]
        m[:, -1] = 1.0
        g = torch.mul(gy_g.unsqueeze(2), _time_major(c, part).unsqueeze(-1))
        g_c, m = _doubling_scan(g.view_as(m), m, reverse=True)
        g = g_c.view(g.shape)
        chunk_carry = torch.empty_like(enter)
        for index in range(chunks - 1, -1, -1):  # dL/dh at each chunk's end, back to front
            chunk_carry[index] = carry
            carry = decay_c[index, 0] * torch.addcmul(g_c[index, 0], m[index, 0], carry)
        g_c.addcmul_(m, chunk_carry.unsqueeze(1))
        del m
        # dL/d(dt_t a) = g_t h_{t-1} decay_t, in place of the decays; h_{t-1} is h_in first.
        g_exponent = decay.mul_(g)
        g_exponent[0] *= enter[0]
        g_exponent[1:] *= h[:-1]
        grad_dt_g = (g_exponent * a).sum(2)
        grad_a = (g_exponent * dt_g.unsqueeze(2)).sum((0, 1))
        g_b = (b_g.unsqueeze(-2) @ g).squeeze(-2)  # sum_n B_t[n] g_t[n, d]: [T, b, d]
        grad_dt[..., part] = grad_dt_g.addcmul_(u_g, g_b).permute(1, 2, 0)
        grad_u[..., part] = (dt_g * g_b).permute(1, 2, 0)
        grad_b[..., part] = _rowdot(dtu_g, g).permute(1, 2, 0)
        return carry, grad_a


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
    strategy: str | None = None,
    group_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [b, d, l] = <h_t, C_t> (no D skip, no gate) and the last state h_l [b, d, N].

    u, delta [b, d, l] (delta after its bias and softplus); A [d, N]; B, C [b, N, l]; keep [b, l]
    (0 where a document starts, else 1) or None; ``state`` h_0 [b, d, N] or None (zeros). Computes
    in fp32 (float64 stays float64) outside autocast; y and h_l come back in that dtype, and
    gradients reach u, delta, A, B, C and ``state`` in their own dtypes.

    ``strategy`` inside a chunk: ``sequential`` (a per-step loop over cache-sized chunks,
    `ChunkedScanFn`) or ``parallel`` (doubling scans over groups of chunks,
    `ParallelChunkedScanFn`); None: ``parallel`` on CUDA, where the sequential loop is bound by kernel launches, else
    ``sequential``. ``chunk_size`` Q defaults per strategy (`default_chunk_size`,
    `PARALLEL_CHUNK`); ``group_chunks`` (parallel only) defaults to `default_group_chunks`.
    """
    bsz, d, length = u.shape
    n = A.shape[-1]
    strategy = strategy or ("parallel" if u.device.type == "cuda" else "sequential")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {'|'.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "parallel":
        chunk = chunk_size or PARALLEL_CHUNK
        group = group_chunks or default_group_chunks(bsz, d, n, chunk)
    else:
        chunk = chunk_size or default_chunk_size(bsz, d, n)
    with torch.autocast(device_type=u.device.type, enabled=False):
        dtype = _common_dtype(u, delta, A, B, C)
        u, delta, B, C = (x.to(dtype).contiguous() for x in (u, delta, B, C))
        keep = None if keep is None else keep.to(dtype).contiguous()
        a_t = A.to(dtype).t().contiguous()  # [N, d]
        h0 = u.new_zeros(bsz, n, d) if state is None else state.to(dtype).transpose(1, 2)
        if strategy == "parallel":
            y, last = ParallelChunkedScanFn.apply(
                u, delta, a_t, B, C, keep, h0.contiguous(), chunk, group
            )
        else:
            y, last = ChunkedScanFn.apply(u, delta, a_t, B, C, keep, h0.contiguous(), chunk)
    return y, last.transpose(1, 2)
