"""Per-rank peak memory of a layout (`hybridtron plan`, issue #16): parameters, gradients and
optimizer state from the rank's real shard (`census`), activations from a per-family model.

Model (its assumptions, each checked by `tests/test_memory_model.py` against the exact bytes a
`memory_probe.StorageTracker` sees alive between forward and backward, or stated as a constant):

- Activations are counted per token of one micro-batch, per sub-layer, by family. Each family's
  function lists the tensors its forward saves for backward (read off the code and the tracker's
  listing of the storages alive at the end of a forward): the pre-norm's input, normalised input
  and rms, then the plugin's own tensors. Widths use the rank's local sizes (tensor parallel
  splits d_inner, heads, the FFN width; the dt/B/C projections of Mamba-1 stay whole).
- dtype: fp32 everywhere in fp32. Under bf16 autocast the residual stream and the norms stay
  fp32, every Linear's input is cast to bf16 once per consumer (the cast is what is saved), its
  output is bf16; the scans run in fp32 (their inputs are fp32 copies); the routers in fp32; the
  loss keeps its fp32 log-softmax (the logits are dropped once the loss is computed). Autocast
  also saves a bf16 copy of every Linear weight that ran (2 bytes per weight, per micro-batch in
  flight; under ``selective`` not those inside recomputed regions, under ``full`` the head's only).
- Recompute ``full`` keeps each sub-layer's input state only; ``selective`` keeps what the
  plugin's `recompute_region` leaves outside (its inputs and outputs): see each family.
- Attention: SDPA (flash) keeps its output and log-sum-exp, never a T x T matrix.
- Mamba-1 ``chunked`` scan keeps the l/Q chunk-entering states ([l/Q, b, d, N] fp32, Q from
  `default_chunk_size` for the sequential strategy, `PARALLEL_CHUNK` for the parallel one, which
  also needs a workspace of `PARALLEL_SCAN_BUFFERS` group-sized tensors while it runs); the
  ``cpu`` scan keeps all l states and one more [b, l, d] copy.
- MoE: balanced routing, each rank processes top_k x tokens assignments (under expert
  parallelism as well: it receives from every expert rank what its experts were given).
- Pipeline: 1F1B holds min(P - p, m) micro-batches on stage p; interleaving holds warmup + 1
  chunks (`InterleavedOrder.warmup`), each 1/v of the stage.
- Sequence parallelism divides the residual stream and the norm's saved tensors by tp; the
  norm's output is gathered (whole sequence) before the plugin.
- The peak (`RankMemory.total`): weights + optimizer state + the larger of the backward's peak
  and the optimizer step's. Gradients are freed after every step (set_to_none), so they count
  at the backward's peak only when a forward follows the step's first backward (more
  micro-batches than in flight); else the peak is at that backward's start (no gradients yet)
  or end (gradients complete, one micro-batch's activations gone). The backward frees each
  sub-layer's activations as it passes (`_transient`). Buffers are counted where they are live:
  ZeRO-2's bucket and the pipeline's p2p tensors in the backward, the plain engine's bucket and
  ZeRO-1's reduction at the step.

A plugin may supply its own family function: a classmethod
``activation_bytes_per_token(cfg: ModelConfig, ctx: ActivationContext) -> float`` on the mixer
or FFN class (the bytes its forward saves per token beyond the pre-norm, at ``ctx.recompute``),
like ``flops_per_token`` in `arch.flops`. Without one, a plugin is counted as an MLP of
d_model width (stated, not measured).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from arch.config import ModelConfig
from arch.layers_registry import FFNS, MIXERS
from arch.moe import expert_hidden
from arch.selective_scan import AUTO_CUDA_WITHOUT_KERNEL
from arch.selective_scan_chunked import PARALLEL_CHUNK, default_chunk_size, default_group_chunks
from trainer.config import RunConfig
from trainer.parallel.census import (
    Layout,
    RankShard,
    rank_census,
    stage_units,
    state_bytes,
    unit_model,
    unit_of,
)
from trainer.parallel.data_parallel import BUCKET_ELEMENTS
from trainer.parallel.schedule import InterleavedOrder
from trainer.parallel.stages import rank_chunks, stage_layer_ranges

# Allocator overhead: a constant fraction on top of every byte counted (module doc of
# MEMORY_CONSTANTS says where each value comes from).
CUDA_OVERHEAD = 0.10
CPU_OVERHEAD = 0.05
AUTOCAST_WORD = 2  # bf16
FP32 = 4
ZERO_BUCKET = int(5e8)  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size (elements)

MEMORY_CONSTANTS: dict[str, str] = {
    "cuda_allocator_overhead": f"{CUDA_OVERHEAD:.0%} of the counted bytes: PyTorch's caching "
    "allocator rounds blocks and keeps freed segments; on an H200 max_memory_reserved was 2-15% "
    "above max_memory_allocated over six gpu_check runs (RESULTS.md), mean 9%",
    "cpu_allocator_overhead": f"{CPU_OVERHEAD:.0%}: glibc malloc with MALLOC_MMAP_THRESHOLD_ "
    "pinned (large tensors are their own mmaps, returned when freed); page rounding and the small "
    "heap (stated, not fitted)",
    "activation_dtype": "fp32: 4 bytes; bf16 autocast: 2 bytes for Linear inputs/outputs, 4 for "
    "the residual stream, norms, scans, routers and the loss",
    "autocast_weight_copies": "bf16: 2 bytes per Linear weight of the stage, per micro-batch "
    "in flight (autocast's cast of each weight is saved for the backward); not under full",
    "ddp_bucket": f"{BUCKET_ELEMENTS * FP32 / 2**20:.0f} MiB: the plain engine's flattened "
    "gradient bucket (data_parallel.BUCKET_ELEMENTS), when dp > 1, after the backward",
    "zero_buckets": f"{ZERO_BUCKET:.0e} elements (DeepSpeed's default reduce_bucket_size) capped "
    "at the rank's parameters, fp32: ZeRO-2's contiguous gradient bucket during the backward, "
    "ZeRO-1's reduction after it",
    "gradients": "fp32, freed after every step: held at the backward's peak only when a "
    "forward follows the step's first backward (RankMemory.backward_peak)",
    "p2p": "pipeline: the residual state sent and received, forward and backward (4 tensors of "
    "micro x seq/tp_sp x d_model x state streams, fp32)",
    "transient": "backward order: at sub-layer i, what it recomputes plus two fp32 gradients "
    "of its widest tensor, less what the sub-layers after i have freed; the last stage's loss "
    "first: two fp32 [tokens, vocab] gradients with every activation held",
}


@dataclass(frozen=True)
class ActivationContext:
    """What a family function needs: local sizes and the run's numerics."""

    tokens: int  # per micro-batch on this rank (batch x seq)
    batch: int
    seq: int
    tp: int
    sequence_parallel: bool
    bf16: bool
    recompute: str  # none | selective | full
    device: str  # cuda | cpu
    ep: int = 1

    @property
    def act(self) -> int:
        """Bytes of a Linear's input/output element."""
        return AUTOCAST_WORD if self.bf16 else FP32

    mamba_scan: str | None = None  # the Mamba-1 scan to count (None: model.mamba.scan)


@dataclass(frozen=True)
class RankMemory:
    """One rank role's predicted peak, in bytes."""

    pp_rank: int
    tp_rank: int
    ep_rank: int
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    buffers: float  # live during the backward (ZeRO-2 bucket, pipeline p2p)
    overhead: float
    step_buffers: float = 0.0  # live after the backward only (DDP bucket, ZeRO-1 reduction)
    # Gradients not yet allocated at the backward's peak (the first backward of a step with
    # every micro-batch in flight: its gradients appear as its activations go).
    grads_late: float = 0.0
    # Activations of one micro-batch (the one whose backward frees them as its gradients grow).
    one_micro_batch: float = 0.0

    @property
    def backward_peak(self) -> float:
        """Bytes above weights + optimizer at the backward's peak: at its start (every
        activation in flight and the transient; ``grads_late`` not yet there) or at its end
        (the gradients complete, one micro-batch's activations gone)."""
        early = self.grads - self.grads_late + self.activations + self.transient
        late = self.grads + self.activations - self.one_micro_batch
        return max(early, late) + self.buffers

    @property
    def total(self) -> float:
        """The peak: weights + optimizer + the larger of the backward's peak and the step's
        (gradients and the buffers live after the backward), + the allocator overhead."""
        step = self.grads + self.step_buffers
        return self.weights + self.optimizer + max(self.backward_peak, step) + self.overhead

    def breakdown(self) -> dict[str, float]:
        """Each part in bytes; they do not simply add up (`total`: the backward's and the step's
        peaks are different moments, and ``grads_late`` is part of ``grads``)."""
        return {
            "weights": self.weights,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "buffers": self.buffers,
            "step_buffers": self.step_buffers,
            "grads_late": self.grads_late,
            "overhead": self.overhead,
        }


# --- the families: bytes per token of one sub-layer beyond the pre-norm (`_prenorm`) ----------


def _prenorm(cfg: ModelConfig, c: ActivationContext, casts: int) -> float:
    """The sub-layer's input x (fp32), RMSNorm's x * rstd and rstd (divided by tp under sequence
    parallelism), and the normalised input the plugin's first Linears save: fp32 once, or one
    bf16 cast per consuming Linear under autocast (``casts`` 0: an fp32 reader, MoE's router,
    keeps it in fp32)."""
    d, shard = cfg.d_model, (c.tp if c.sequence_parallel else 1)
    kept = (2 * FP32 * d + FP32) / shard
    return kept + (casts * AUTOCAST_WORD * d if c.bf16 and casts else FP32 * d)


def mlp_bytes(cfg: ModelConfig, c: ActivationContext, hidden: int | None = None) -> float:
    """SwiGLU: w1's output (silu's input), silu's output, w3's output, their product (w2's
    input): 4 x f/tp values of a Linear's dtype. Selective keeps the same."""
    f = (hidden or cfg.ffn_hidden_size) // c.tp
    return 4 * f * c.act


def attention_bytes(cfg: ModelConfig, c: ActivationContext) -> float:
    """q, k, v (local heads), SDPA's output and its log-sum-exp (fp32 per head); no T x T
    matrix. Selective keeps q, k, v anyway (the region's inputs) and the output: the same."""
    q = cfg.d_model // c.tp
    kv = cfg.kv_heads * cfg.head_dim // c.tp
    return (2 * q + 2 * kv) * c.act + FP32 * cfg.n_heads // c.tp


def mamba_bytes(cfg: ModelConfig, c: ActivationContext) -> float:
    """Mamba-1, d = d_inner/tp, N = d_state, r = dt_rank, per token:

    - none, fp32: in_proj's x|z (2d), conv output, silu output and its transposed copy, delta
      and its contiguous copy, y + Dx, silu(z), the gated output (10d) x 4 bytes; bf16: x|z,
      conv output, the copies for x_proj and out_proj in bf16 and the scan's fp32 (34 bytes/d);
    - dt, B, C (whole under TP): x_proj's output, the three RMSNorms' saved tensors, B and C's
      contiguous copies: (3r + 6N) x 4 (bf16: 10r + 24N bytes);
    - the scan's states: ``chunked`` the l/Q chunk-entering states (N d / Q x 4); ``cpu`` every
      state (N d x 4) and one more time-major copy (d x 4; the other replaces a copy the
      chunked path makes);
    - selective: x|z (the region's input) and the gated output only (3d of a Linear's dtype).
    """
    m = cfg.mamba
    d, n, r = m.expand * cfg.d_model // c.tp, m.d_state, m.rank(cfg.d_model)
    conv = (c.seq + m.d_conv - 1) / c.seq  # the conv output keeps its K - 1 padding
    if c.recompute == "selective":
        return 3 * d * c.act
    if c.bf16:
        body = (34 + 2 * (conv - 1)) * d + 10 * r + 24 * n
    else:  # at batch 1 x_proj's transposed input folds to 2-D without a copy
        body = (40 - 4 * (c.batch == 1) + 4 * (conv - 1)) * d + FP32 * (3 * r + 6 * n)
    scan = _mamba_scan(cfg, c)
    if scan == "cpu":
        body += FP32 * (n * d + d)
    elif scan == "kernel":
        pass
    elif scan == "parallel":
        body += FP32 * n * d / PARALLEL_CHUNK
    else:
        body += FP32 * n * d / default_chunk_size(c.batch, d, n)
    return body


def _mamba_scan(cfg: ModelConfig, c: ActivationContext) -> str:
    """The scan a training rank runs: ``kernel`` (mamba_ssm's, which keeps no states), ``cpu``
    (all states kept; ``loop`` is counted as it, a lower bound), or ``chunked`` with its in-chunk
    strategy, ``sequential`` (CPU's default) or ``parallel`` (CUDA's). ``auto`` is ``chunked``
    on CPU and `AUTO_CUDA_WITHOUT_KERNEL` on CUDA, as `arch.selective_scan.resolve_backend`."""
    scan = c.mamba_scan or cfg.mamba.scan
    if scan == "auto":
        scan = "chunked" if c.device == "cpu" else AUTO_CUDA_WITHOUT_KERNEL
    if scan == "cuda":
        return "kernel"  # mamba_ssm recomputes its states in the backward: none kept
    if scan != "chunked":
        return "cpu"
    strategy = cfg.mamba.chunked_strategy
    if strategy == "auto":
        strategy = "sequential" if c.device == "cpu" else "parallel"
    return "parallel" if strategy == "parallel" else "chunked"


# Live [group x Q, b, N, d] fp32 tensors of the parallel chunked scan's backward (decays,
# drives, states, adjoints and their doubling partners): the scan alone peaked at 4,042 MiB on an
# H200 at b 8, d_inner 1024, N 16, l 2048, i.e. 8 groups of 2^27 elements (benchmarks/RESULTS.md).
PARALLEL_SCAN_BUFFERS = 8


def scan_workspace(cfg: ModelConfig, c: ActivationContext) -> float:
    """Bytes the parallel chunked scan allocates while it runs (0 for the other scans)."""
    if _mamba_scan(cfg, c) != "parallel":
        return 0.0
    d, n = cfg.mamba.expand * cfg.d_model // c.tp, cfg.mamba.d_state
    chunks = -(-c.seq // PARALLEL_CHUNK)
    group = min(chunks, default_group_chunks(c.batch, d, n, PARALLEL_CHUNK))
    return PARALLEL_SCAN_BUFFERS * FP32 * group * PARALLEL_CHUNK * c.batch * n * d


def mamba2_bytes(cfg: ModelConfig, c: ActivationContext) -> float:
    """Mamba-2 (SSD), d = d_inner/tp, H heads, G groups, N, chunk Q, per token:

    - in_proj's z|x|B|C|dt and the conv output (a Linear's dtype), the conv's silu output
      (fp32: kept by the scan; bf16: the scan's fp32 copy of x instead), dt and softplus (2H);
    - the chunked SSD (fp32): 4HQ (decay, scores and their products), 4HN (B and C per head),
      3d, 2 dN/Q and the (l/Q + 1) chunk states dN/Q, H;
    - the gated norm: silu(z), y*silu(z), its normalised form, the output (4d x 4 in fp32;
      bf16: 12 bytes/d with out_proj's cast);
    - selective drops the SSD's tensors but keeps its output y + Dx (d x 4) and, under bf16,
      the bf16 silu output the region starts from (the fp32 copy of x is made inside it) and the
      fp32 normalised input the region's closure holds.
    """
    m = cfg.mamba2
    d = m.expand * cfg.d_model // c.tp
    h, g, n, q = d // m.head_dim, m.n_groups // c.tp, m.d_state, m.chunk_size
    conv_dim = d + 2 * g * n
    chunks = math.ceil(c.seq / q)
    conv = (c.seq + m.d_conv - 1) / c.seq
    proj = (2 * d + 2 * g * n + h) * c.act + conv_dim * conv * c.act + 2 * h * FP32
    if c.bf16:
        proj += FP32 * d
        gate = 12 * d
    else:
        proj += FP32 * conv_dim
        gate = 16 * d
    states = d * n / q * (chunks + 1) / chunks
    ssd = FP32 * (4 * h * q + 4 * h * n + 3 * d + 2 * d * n / q + states + h)
    if c.recompute == "selective":
        # bf16: the region starts from the bf16 silu output, and its closure holds the fp32
        # normalised input h (it reads h.device), which fp32 keeps anyway.
        kept = FP32 * d
        if c.bf16:
            kept += AUTOCAST_WORD * conv_dim - FP32 * d + FP32 * cfg.d_model
        return proj + gate + kept
    return proj + gate + ssd


def moe_bytes(cfg: ModelConfig, c: ActivationContext) -> float:
    """MoE, k = top_k, E experts, f = expert width/tp, per token (balanced routing):

    - router logits and softmax (fp32, E each), top-k indices, the sort order and token ids
      (int64, k each), the gathered inputs (k x d: fp32, or two bf16 casts per assignment),
      each expert's SwiGLU (4f per assignment), the experts' concatenated output (k d) and its
      weighted form (k d, fp32: the fp32 routing weight promotes it);
    - the MoE output feeds the residual add (counted by the next sub-layer's input);
    - selective keeps the router's and the two k x d outputs only.
    """
    m = cfg.moe
    k, e, d = m.top_k, m.num_experts, cfg.d_model
    f = expert_hidden(cfg) // c.tp
    router = 2 * e * FP32 + 3 * k * 8 + k * FP32
    outputs = k * d * c.act + k * d * FP32
    if c.recompute == "selective":
        return router + outputs
    gathered = k * d * (2 * AUTOCAST_WORD if c.bf16 else FP32)
    return router + outputs + gathered + k * 4 * f * c.act


FAMILY_BYTES = {
    "mlp": mlp_bytes,
    "attention": attention_bytes,
    "mamba": mamba_bytes,
    "mamba2": mamba2_bytes,
    "moe": moe_bytes,
}
# Linears that read the pre-norm's output (one bf16 cast each under autocast; MoE's fp32 router
# keeps the fp32 output instead).
PRENORM_CASTS = {"mlp": 2, "attention": 3, "mamba": 1, "mamba2": 1, "moe": 0}


def sublayer_bytes(cfg: ModelConfig, symbol: str, c: ActivationContext) -> float:
    """Held bytes per token of one sub-layer (its input state included) at ``c.recompute``:
    the pre-norm (`_prenorm`, which counts the stream x), the other residual-state streams
    (momentum residuals), and the plugin's own tensors: its ``activation_bytes_per_token``
    classmethod when it has one, else the family function (`FAMILY_BYTES`), else an MLP of
    d_model width (a stated stand-in, not measured)."""
    kind, plugin = cfg.symbol_table()[symbol]
    shard = c.tp if c.sequence_parallel else 1
    state = FP32 * cfg.d_model * _state_streams(cfg) / shard
    if c.recompute == "full":
        return state
    others = state - FP32 * cfg.d_model / shard  # streams beyond x
    cls = (MIXERS if kind == "mixer" else FFNS).get(plugin)
    own = getattr(cls, "activation_bytes_per_token", None)
    if own is not None:
        return _prenorm(cfg, c, 1) + own(cfg, c) + others
    fn = FAMILY_BYTES.get(plugin)
    if fn is None:
        return _prenorm(cfg, c, 2) + mlp_bytes(cfg, c, cfg.d_model * c.tp) + others
    return _prenorm(cfg, c, PRENORM_CASTS[plugin]) + fn(cfg, c) + others


def _state_streams(cfg: ModelConfig) -> int:
    """Residual-state tensors of d_model each (plain: x; momentum: x, v; Adam-style: x, m, s)."""
    from arch.layers_registry import RESIDUALS

    names = getattr(RESIDUALS.get(cfg.residual.name), "state_names", ("x",))
    return max(1, len(names))


def head_bytes(cfg: ModelConfig, c: ActivationContext) -> float:
    """The final norm (a pre-norm read by one Linear) and the loss per token: the fp32
    log-softmax (Megatron's vocabulary-parallel loss under TP: its fp32 softmax of the rank's
    padded-vocabulary slice) and the int64 targets. The logits themselves are not kept: the
    training step drops its reference once the loss is computed and the loss's backward needs
    only its own output (their transient is counted in `_transient`)."""
    vocab = cfg.vocab_size if c.tp == 1 else cfg.padded_vocab_size // c.tp
    return _prenorm(cfg, c, 1) + vocab * FP32 + 8


def embedding_bytes(cfg: ModelConfig, c: ActivationContext) -> float:
    """The embedding keeps only the token ids (its output is the first sub-layer's input)."""
    return 8.0


def _context(
    cfg: RunConfig, layout: Layout, device: str, mamba_scan: str | None = None
) -> ActivationContext:
    t, p = cfg.trainer, cfg.parallel
    sp = bool(p.sequence_parallel) and layout.tp > 1
    return ActivationContext(
        tokens=t.micro_batch_size * t.seq_len,
        batch=t.micro_batch_size,
        seq=t.seq_len,
        tp=layout.tp,
        sequence_parallel=sp,
        bf16=t.precision == "bf16",
        recompute=p.recompute,
        device=device,
        ep=layout.ep,
        mamba_scan=mamba_scan,
    )


def _chunks(cfg: ModelConfig, layout: Layout, pp_rank: int) -> list[range]:
    ranges = stage_layer_ranges(cfg, layout.pp, layout.virtual)
    return [range(start, end) for start, end in rank_chunks(ranges, pp_rank, layout.pp)]


def activation_bytes(
    cfg: RunConfig,
    layout: Layout,
    pp_rank: int,
    device: str = "cuda",
    mamba_scan: str | None = None,
) -> dict[str, float]:
    """One micro-batch's held bytes on pipeline rank ``pp_rank``, by family (+ 'embedding',
    'head', and under bf16 'autocast_weights'); every chunk of the rank (interleaving) counted
    once. ``mamba_scan`` counts another Mamba-1 scan than the config's (the planner's
    ``--mamba-scan``)."""
    c = _context(cfg, layout, device, mamba_scan)
    model = cfg.model
    table, symbols = model.symbol_table(), model.layers
    per_symbol: dict[str, float] = {}  # a stage repeats a handful of symbols many times
    out: dict[str, float] = {}
    for chunk in _chunks(model, layout, pp_rank):
        for i in chunk:
            sym = symbols[i]
            if sym not in per_symbol:
                per_symbol[sym] = sublayer_bytes(model, sym, c) * c.tokens
            plugin = table[sym][1]
            out[plugin] = out.get(plugin, 0.0) + per_symbol[sym]
    if pp_rank == 0:
        out["embedding"] = embedding_bytes(model, c) * c.tokens
    if pp_rank == layout.pp - 1:
        out["head"] = head_bytes(model, c) * c.tokens
    if c.bf16:
        out["autocast_weights"] = AUTOCAST_WORD * cast_weights(model, layout, pp_rank, c.recompute)
    return out


# Linears whose autocast copy is made inside a `recompute_region` (not kept under selective).
_REGION_LINEARS = (".experts.", ".x_proj.", ".dt_proj.")


def cast_weights(cfg: ModelConfig, layout: Layout, pp_rank: int, recompute: str) -> int:
    """Elements of the Linear weights whose bf16 copy autocast keeps for the backward on
    ``pp_rank`` (TP rank 0's shard, built on the meta device): every Linear's under none; under
    selective, all but those inside recomputed regions (`_REGION_LINEARS`); under full only the
    output head's (outside every sub-layer). Embeddings and convolutions are not cast."""
    counts = _unit_casts(cfg, layout.tp, layout.ep)
    index = {"none": 0, "selective": 1, "full": 2}[recompute]
    return sum(counts.get(unit, (0, 0, 0))[index] for unit in stage_units(cfg, layout, pp_rank))


def _unit_casts(cfg: ModelConfig, tp: int, ep: int) -> dict[str, tuple[int, int, int]]:
    """Per unit of `census.unit_model`: the cast Linear weight elements under none, selective
    and full (cached: the planner asks for thousands of layouts)."""
    import torch

    key = (repr(cfg), tp, ep)
    if key not in _CASTS:
        units: dict[str, list[int]] = {}
        for name, module in unit_model(cfg, tp, ep).named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            if isinstance(module, torch.nn.Embedding) or "embed" in name:
                continue
            counts = units.setdefault(unit_of(name), [0, 0, 0])
            counts[0] += weight.numel()
            if not any(r in f".{name}." for r in _REGION_LINEARS):
                counts[1] += weight.numel()
            if name == "head" or name.endswith(".head"):
                counts[2] += weight.numel()
        _CASTS[key] = {unit: (a, s, f) for unit, (a, s, f) in units.items()}
    return _CASTS[key]


_CASTS: dict[tuple[str, int, int], dict[str, tuple[int, int, int]]] = {}


def micro_batches(cfg: RunConfig, layout: Layout) -> int:
    t = cfg.trainer
    return max(1, t.global_batch_size // (t.micro_batch_size * layout.dp))


def in_flight(cfg: RunConfig, layout: Layout, pp_rank: int) -> float:
    """Micro-batches (in units of the whole stage) held at once on ``pp_rank``."""
    m = micro_batches(cfg, layout)
    if layout.pp == 1:
        return 1.0
    if layout.virtual == 1:
        return float(min(layout.pp - pp_rank, m))
    order = InterleavedOrder(layout.pp, layout.virtual, m)
    return min(order.total, order.warmup(pp_rank) + 1) / layout.virtual


def _transient(cfg: RunConfig, layout: Layout, pp_rank: int, c: ActivationContext) -> float:
    """Extra peak inside one micro-batch's backward above its held activations.

    The backward walks the stage's sub-layers in reverse and frees each one's activations as it
    goes, so at sub-layer i only the layers up to i still hold theirs (the head's are gone
    too). Sub-layer i adds what it
    recomputes (none - kept at ``c.recompute``) and two activation gradients of its widest
    tensor (fp32); the peak over i is taken against the whole micro-batch's held bytes. The
    last stage's loss comes first, with everything held: the log-softmax's gradient and the
    logits' gradient, both fp32 [tokens, vocabulary]."""
    model = cfg.model
    none = ActivationContext(**{**c.__dict__, "recompute": "none"})
    layers = [i for chunk in _chunks(model, layout, pp_rank) for i in chunk]
    # Bytes per token already released when sub-layer i's backward runs: the sub-layers after
    # it and, on the last stage, the final norm's and the loss's (their backward runs first).
    freed = head_bytes(model, c) if pp_rank == layout.pp - 1 else 0.0
    worst = 0.0
    symbols, table = model.layers, model.symbol_table()
    costs: dict[str, tuple[float, float]] = {}  # symbol -> (kept, extra) per token
    for i in reversed(layers):
        sym = symbols[i]
        if sym not in costs:
            kept = sublayer_bytes(model, sym, c)
            extra = sublayer_bytes(model, sym, none) - kept + 2 * FP32 * _widest(model, sym, c)
            if table[sym][1] == "mamba":
                extra += scan_workspace(model, c) / c.tokens
            costs[sym] = (kept, extra)
        kept, extra = costs[sym]
        worst = max(worst, extra - freed)
        freed += kept
    if pp_rank == layout.pp - 1:
        vocab = model.vocab_size if c.tp == 1 else model.padded_vocab_size // c.tp
        worst = max(worst, 2 * FP32 * vocab)
    return worst * c.tokens


def _widest(cfg: ModelConfig, symbol: str, c: ActivationContext) -> int:
    plugin = cfg.symbol_table()[symbol][1]
    if plugin == "mamba":
        return 2 * cfg.mamba.expand * cfg.d_model // c.tp
    if plugin == "mamba2":
        return 2 * cfg.mamba2.expand * cfg.d_model // c.tp
    if plugin == "moe":
        return cfg.moe.top_k * expert_hidden(cfg) // c.tp
    if plugin == "mlp":
        return cfg.ffn_hidden_size // c.tp
    return cfg.d_model


def _backward_grads(shard: RankShard, layout: Layout) -> float:
    """Gradient bytes the backward allocates (param.grad, freed after each step): all of them
    under the plain engine and ZeRO-1 (which reduces them after the backward); none under
    ZeRO-2/3 (reduced into buckets and partitions as they come)."""
    return FP32 * shard.params if layout.effective_zero <= 1 else 0.0


def _buffers(
    cfg: RunConfig, layout: Layout, shard: RankShard, c: ActivationContext
) -> tuple[float, float]:
    """Communication buffers (bytes live during the backward, bytes live at the step after it).

    Backward: ZeRO-2's contiguous gradient bucket (DeepSpeed's reduce_bucket_size, capped at the
    rank's parameters); the pipeline's send/receive tensors. After the backward, when the
    activations are gone: the plain engine's flattened bucket, ZeRO-1's reduction of the
    gradients."""
    n = shard.params
    backward = step = 0.0
    if layout.dp > 1:
        if layout.effective_zero == 0:
            step = FP32 * min(n, BUCKET_ELEMENTS)
        elif layout.effective_zero == 1:
            step = FP32 * min(n, ZERO_BUCKET)
        else:
            backward = FP32 * min(n, ZERO_BUCKET)
    if layout.pp > 1:
        seq = c.seq // (c.tp if c.sequence_parallel else 1)
        backward += 4 * FP32 * c.batch * seq * cfg.model.d_model * _state_streams(cfg.model)
    return backward, step


def rank_memory(
    cfg: RunConfig,
    layout: Layout,
    shards: list[RankShard] | None = None,
    device: str = "cuda",
    mamba_scan: str | None = None,
) -> list[RankMemory]:
    """Every rank role's predicted peak; shards default to `census.rank_census(cfg.model,
    layout)`. Micro-batch, seq_len, recompute, sequence_parallel, precision come from ``cfg``;
    ``device`` 'cuda' (allocator figures) or 'cpu' (what benchmarks/plan_accuracy.py measures).

    The peak is the larger of the backward's (weights, optimizer, activations of the
    micro-batches in flight, one backward's transient, the buffers live then, and the gradients
    allocated by then) and the step's (gradients + the buffers live after the backward), plus
    the allocator overhead on it. Gradients are freed after each step (set_to_none): when no
    forward follows the first backward of a step (m micro-batches <= those in flight), the peak
    comes before its gradients exist or after its micro-batch's activations are gone."""
    from trainer.parallel.census import optimizer_moments

    shards = rank_census(cfg.model, layout) if shards is None else shards
    c = _context(cfg, layout, device, mamba_scan)
    overhead = CUDA_OVERHEAD if device == "cuda" else CPU_OVERHEAD
    per_stage: dict[int, tuple[float, float, float]] = {}
    out = []
    for shard in shards:
        if shard.pp_rank not in per_stage:
            held = sum(activation_bytes(cfg, layout, shard.pp_rank, device, mamba_scan).values())
            flight = in_flight(cfg, layout, shard.pp_rank)
            transient = _transient(cfg, layout, shard.pp_rank, c)
            per_stage[shard.pp_rank] = (held * flight, transient, held * min(1.0, flight))
        acts, transient, one = per_stage[shard.pp_rank]
        state = state_bytes(shard, layout, optimizer_moments(cfg.optim.name))
        backward, step = _buffers(cfg, layout, shard, c)
        steady = micro_batches(cfg, layout) > math.ceil(in_flight(cfg, layout, shard.pp_rank))
        late = 0.0 if steady else _backward_grads(shard, layout)
        memory = RankMemory(
            shard.pp_rank,
            shard.tp_rank,
            shard.ep_rank,
            shard.params,
            state["weights"],
            state["grads"],
            state["optimizer"],
            acts,
            transient,
            backward,
            0.0,
            step_buffers=step,
            grads_late=late,
            one_micro_batch=one,
        )
        out.append(dataclasses.replace(memory, overhead=overhead * memory.total))
    return out


def dry_run_line(cfg: RunConfig, world: int, device: str = "cuda") -> str:
    """One line for ``hybridtron train --dry-run``: the layout and its largest rank's predicted
    peak by part, from the same census and model as `hybridtron plan`."""
    from trainer.parallel.census import _size

    p = cfg.parallel
    layout = Layout(
        tp=p.tensor,
        pp=p.pipeline,
        dp=world // (p.tensor * p.pipeline),
        ep=p.expert,
        virtual=p.virtual_stages,
        zero=p.zero_stage,
    )
    shards = rank_census(cfg.model, layout)
    ranks = rank_memory(cfg, layout, shards, device)
    r = max(ranks, key=lambda m: m.total)
    roles = f"{len(shards)} rank role" + ("s" if len(shards) > 1 else "")
    t = cfg.trainer
    scan = ""
    if "mamba" in {plugin for _, plugin in cfg.model.symbol_table().values()}:
        scan = f", Mamba-1 scan {_mamba_scan(cfg.model, _context(cfg, layout, device))}"
    return (
        f"# layout tp {layout.tp} x pp {layout.pp} x dp {layout.dp} (ep {layout.ep}, ZeRO "
        f"{layout.effective_zero}): {roles}; the largest (pp {r.pp_rank}, tp {r.tp_rank}, ep "
        f"{r.ep_rank}) holds {r.params:,} parameters and peaks at {_size(r.total)} on a "
        f"{'GPU' if device == 'cuda' else 'CPU'}: weights {_size(r.weights)}, gradients "
        f"{_size(r.grads)}, optimizer {_size(r.optimizer)}, activations {_size(r.activations)} "
        f"(micro-batch {t.micro_batch_size} x {t.seq_len}, recompute {p.recompute}{scan}), "
        f"transient "
        f"{_size(r.transient)}, buffers {_size(r.buffers + r.step_buffers)}, allocator "
        f"{_size(r.overhead)} (hybridtron plan --explain shows every role)"
    )
