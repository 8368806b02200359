"""The `chunked` Mamba-1 scan (`arch.selective_scan_chunked`), both in-chunk strategies (the
sequential loop and the parallel doubling scan, run on CPU here): equal to the `loop` reference in
values and every gradient (float64 and fp32), with document resets, from a given state and in its
last state (what decoding continues from), with only chunk-boundary states saved for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arch import ModelConfig, build_model, validate_model_config
from arch.mamba import Mamba
from arch.registry import ConfigError
from arch.selective_scan import scan_from_state, scan_loop, selective_scan
from arch.selective_scan_chunked import _groups, default_chunk_size, scan_chunked

NAMES = ("u", "delta", "A", "B", "C")


def scan_inputs(b: int, d: int, length: int, n: int, dtype: torch.dtype, seed: int = 0) -> list:
    """u, delta (after bias and softplus), A, B, C with realistic ranges (A < 0, dt ~ 0.1)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, length, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(b, d, length, generator=g, dtype=dtype) * 0.5 - 2.0)
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=dtype) * 0.5)
    B = torch.randn(b, n, length, generator=g, dtype=dtype)
    C = torch.randn(b, n, length, generator=g, dtype=dtype)
    return [u, delta, A, B, C]


def resets(b: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """keep [b, l]: 0 where a document starts: at 0, mid-sequence, and right after a chunk edge."""
    keep = torch.ones(b, length, dtype=dtype)
    keep[0, length // 2] = 0.0
    keep[-1, 0] = 0.0
    if length > 9:
        keep[-1, 8] = keep[0, 9] = 0.0
    return keep


def grads_of(fn, inputs: list, state: torch.Tensor | None = None) -> tuple:
    """(y, last state, gradients of inputs and of ``state``) under a non-uniform upstream gradient
    on y and on the last state."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    h0 = None if state is None else state.clone().requires_grad_()
    y, last = fn(*leaves, h0)
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
    w_h = torch.randn(last.shape, generator=g, dtype=y.dtype)
    ((y * w_y).sum() + (last * w_h).sum()).backward()
    grads = [t.grad for t in leaves] + ([] if h0 is None else [h0.grad])
    return y.detach(), last.detach(), grads


def reference(keep: torch.Tensor | None = None):
    """The autograd-recorded references: `scan_loop` and a written-out last state (zero start,
    resets), or `scan_from_state` (from a given state, no resets)."""

    def fn(u, delta, A, B, C, h0):  # noqa: ANN001, ANN202
        if h0 is not None:
            return scan_from_state(u, delta, A, B, C, h0)
        return scan_loop(u, delta, A, B, C, keep), last_state(u, delta, A, B, keep)

    return fn


def last_state(u, delta, A, B, keep):  # noqa: ANN001, ANN201
    """h_l of the recurrence from zero, step by step (keep: None or [b, l])."""
    h = torch.zeros(u.shape[0], *A.shape, dtype=u.dtype)
    for t in range(u.shape[-1]):
        decay = torch.exp(delta[:, :, t, None] * A)
        if keep is not None:
            decay = decay * keep[:, t, None, None]
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
    return h


STRATEGIES = ("sequential", "parallel")
# The parallel strategy's groups of chunks: 2 chunks per group, so the test lengths cross group
# boundaries (the default, 2^27 elements per group, would hold every test sequence in one).
GROUP = 2


def chunked(
    keep: torch.Tensor | None = None, chunk: int | None = None, strategy: str = "sequential"
):
    group = GROUP if strategy == "parallel" else None

    def fn(u, delta, A, B, C, h0):  # noqa: ANN001, ANN202
        return scan_chunked(
            u,
            delta,
            A,
            B,
            C,
            keep,
            state=h0,
            chunk_size=chunk,
            strategy=strategy,
            group_chunks=group,
        )

    return fn


def assert_all_close(got: tuple, want: tuple, rel: float) -> None:
    """Every output and gradient within ``rel`` of the reference's largest magnitude."""
    y, last, grads = got
    y_ref, last_ref, grads_ref = want
    names = ("y", "last state", *NAMES, "state")
    for name, a, b in zip(names, (y, last, *grads), (y_ref, last_ref, *grads_ref), strict=False):
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, name
        scale = b.abs().max().clamp_min(1e-30)
        assert ((a - b).abs().max() / scale).item() <= rel, (
            name,
            ((a - b).abs().max() / scale).item(),
        )


# ---- equality with the reference -----------------------------------------------------------

SHAPES = [  # (b, d, l, N), chunk: several chunks with a ragged tail, chunk 1, one chunk > l
    ((2, 8, 17, 4), 4),  # parallel: groups of 8 steps twice, then a 1-step tail chunk
    ((3, 16, 40, 16), 7),  # parallel: 2 groups of 14 steps, a group of one 7-step chunk, tail 5
    ((2, 5, 33, 3), 1),  # parallel: Q = 1 (no doubling pass), 16 groups and a 1-chunk group
    ((2, 5, 33, 3), 64),  # one chunk longer than l: only the tail
    ((1, 3, 1, 2), None),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("shape", "chunk"), SHAPES)
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_equals_the_loop_in_float64(shape, chunk, with_resets, strategy):
    inputs = scan_inputs(*shape, dtype=torch.float64)
    keep = resets(shape[0], shape[2], torch.float64) if with_resets else None
    # Measured <= 6.6e-16 relative, both strategies (the same products, summed in other orders).
    assert_all_close(
        grads_of(chunked(keep, chunk, strategy), inputs), grads_of(reference(keep), inputs), 1e-10
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("shape", "chunk"), SHAPES[:3])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_equals_the_loop_in_fp32(shape, chunk, with_resets, strategy):
    inputs = scan_inputs(*shape, dtype=torch.float32)
    keep = resets(shape[0], shape[2], torch.float32) if with_resets else None
    # Measured <= 2.9e-7 (sequential, 1 and 2 threads) and <= 3.4e-7 (parallel) relative to each
    # tensor's largest entry: ~30x under 1e-5.
    assert_all_close(
        grads_of(chunked(keep, chunk, strategy), inputs), grads_of(reference(keep), inputs), 1e-5
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuing_from_a_state_equals_the_step_path(dtype, strategy):
    """scan_chunked(state=h) is `scan_from_state`: outputs, last state, and gradients of all
    inputs and of the entering state (what Mamba.step's prefill relies on)."""
    inputs = scan_inputs(2, 6, 23, 5, dtype=dtype, seed=3)
    state = torch.randn(2, 6, 5, dtype=dtype, generator=torch.Generator().manual_seed(4))
    rel = 1e-10 if dtype == torch.float64 else 1e-5  # measured <= 5.4e-16 / 2.7e-7
    got = grads_of(chunked(chunk=5, strategy=strategy), inputs, state)
    assert_all_close(got, grads_of(reference(), inputs, state), rel)


def test_parallel_groups_cover_the_sequence_in_whole_chunks():
    """(span, Q) of the parallel strategy: full groups, then whole chunks, then the ragged tail
    as a chunk of its own length; contiguous and complete."""
    want = [(slice(0, 14), 7), (slice(14, 28), 7), (slice(28, 35), 7), (slice(35, 40), 5)]
    assert _groups(40, 7, 2) == want
    assert _groups(16, 4, 2) == [(slice(0, 8), 4), (slice(8, 16), 4)]
    assert _groups(3, 16, 4) == [(slice(0, 3), 3)]
    for length, chunk, group in [(1, 1, 1), (100, 8, 3), (64, 16, 100)]:
        spans = _groups(length, chunk, group)
        assert spans[0][0].start == 0 and spans[-1][0].stop == length
        for (a, q), (b, _) in zip(spans, spans[1:], strict=False):
            assert a.stop == b.start and (a.stop - a.start) % q == 0


def test_unknown_strategy_is_refused():
    inputs = scan_inputs(1, 2, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        scan_chunked(*inputs, strategy="doubling")


def test_prefill_then_decode_continues_where_the_chunked_prefill_ends():
    """Prefill 30 tokens in chunks, then one step at a time: the same outputs and state as a
    single `scan_from_state` over all of them."""
    u, delta, A, B, C = scan_inputs(2, 8, 34, 4, dtype=torch.float64, seed=5)
    zero = torch.zeros(2, 8, 4, dtype=torch.float64)
    y_all, h_all = scan_from_state(u, delta, A, B, C, zero)
    y, h = scan_chunked(u[..., :30], delta[..., :30], A, B[..., :30], C[..., :30], chunk_size=8)
    ys = [y]
    for t in range(30, 34):
        step = slice(t, t + 1)
        y_t, h = scan_from_state(u[..., step], delta[..., step], A, B[..., step], C[..., step], h)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, dim=-1), y_all, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_all, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selective_scan_chunked_backend_equals_loop_with_skip_gate_and_bias(strategy):
    """The `chunked` back-end through `selective_scan` (softplus, D skip, gate, resets)."""
    g = torch.Generator().manual_seed(7)
    b, d, n, length = 2, 8, 4, 29
    raw = [torch.randn(b, d, length, generator=g, dtype=torch.float64) for _ in range(3)]
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=torch.float64) * 0.5)
    B, C = (torch.randn(b, n, length, generator=g, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(d, generator=g, dtype=torch.float64), torch.full((d,), -2.0).double()
    keep = resets(b, length, torch.float64)
    results = []
    for backend in ("loop", "chunked"):
        leaves = [t.clone().requires_grad_() for t in (*raw, A, B, C, D, bias)]
        u, delta, z, A_, B_, C_, D_, bias_ = leaves
        y = selective_scan(
            u,
            delta,
            A_,
            B_,
            C_,
            D_,
            z,
            bias_,
            backend=backend,
            keep=keep,
            chunked_strategy=strategy,
        )
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ---- memory and chunk size -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backward_saves_chunk_boundary_states_not_per_step_states(strategy):
    b, d, n, length, chunk = 2, 16, 8, 256, 32
    inputs = [t.requires_grad_() for t in scan_inputs(b, d, length, n, dtype=torch.float32)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        y, _ = scan_chunked(*inputs, chunk_size=chunk, strategy=strategy, group_chunks=3)
    per_step_states = b * d * n * length
    # Inputs ([l, b, d] and [l, b, N]) plus l / chunk states of [b, d, N]: 8 boundary states here.
    assert sum(saved) <= 2 * b * d * length + 2 * b * n * length + d * n + b * d * n * (
        length // chunk
    )
    assert sum(saved) < per_step_states / 2
    y.sum().backward()


def test_default_chunk_size_keeps_a_chunk_tensor_cache_sized():
    assert default_chunk_size(4, 256, 16) == 16  # 2^18 / (4 * 256 * 16)
    assert default_chunk_size(1, 8, 4) == 256  # capped
    assert default_chunk_size(64, 8192, 16) == 4  # floored: a step's state alone is larger


# ---- the mixer -----------------------------------------------------------------------------


def tiny(scan: str, **overrides) -> ModelConfig:
    base = dict(pattern="M-", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=300)
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.mamba.scan = scan
    return cfg


def test_config_accepts_the_chunked_scan():
    validate_model_config(tiny("chunked"))
    for strategy in ("auto", *STRATEGIES):
        cfg = tiny("chunked")
        cfg.mamba.chunked_strategy = strategy
        validate_model_config(cfg)
    cfg.mamba.chunked_strategy = "doubling"
    with pytest.raises(ConfigError, match="chunked_strategy"):
        validate_model_config(cfg)


@pytest.mark.parametrize("strategy", ["auto", "parallel"])
def test_mixer_with_chunked_scan_equals_loop_with_documents(strategy):
    torch.manual_seed(0)
    cfg = tiny("chunked")
    cfg.mamba.chunked_strategy = strategy
    mixer = Mamba(cfg, 0).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 9 + [1] * 12, [0] * 4 + [1] * 8 + [2] * 9])
    out = mixer(x, doc_ids)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in mixer.named_parameters()}
    mixer.zero_grad()
    mixer.scan = "loop"
    ref = mixer(x, doc_ids)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for name, p in mixer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("strategy", ["auto", "parallel"])
def test_chunked_prefill_then_decode_equals_the_full_forward(strategy):
    """Mamba.step with the chunked prefill, then one token at a time: the full forward's output."""
    cfg = tiny("chunked", pattern="M-M-")
    cfg.mamba.chunked_strategy = strategy
    model = build_model(cfg, seed=0).double().eval()
    mixer = model.layers[0].inner
    h = torch.randn(2, 19, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(h)
        out, entry = mixer.step(h[:, :15], None)
        outs = [out]
        for t in range(15, 19):
            out, entry = mixer.step(h[:, t : t + 1], entry)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-10)
