"""Predicted step time of a layout: compute per pipeline rank from the FLOPs counter, the
pipeline bubble, and communication by kind from ring / all-to-all cost models.

Compute. Forward FLOPs per token of every sub-layer come from `arch.flops.sublayer_flops` on the
one-process model built on the meta device (a plugin's own `flops_per_token` is honoured), split
into matrix products (every nn.Linear, MoE experts at top_k) and the rest (attention scores, the
Mamba scans and convolutions). A training step runs each micro-batch forward once and backward
(2x) once; ``full`` recomputation adds a forward, ``selective`` the regions plugins recompute
(attention kernels, scans and convolutions, MoE experts: the "rest" plus the experts). Tensor
parallelism divides a rank's work by tp; expert parallelism does not (balanced routing: a rank
runs as many expert tokens as without it). Time = FLOPs / (peak x efficiency of its kind).

Mamba-1's scan is not FLOP-bound: with mamba_ssm's kernels (``--mamba-scan cuda``, what a
cluster installs) it moves ~24 bytes per token and inner channel (fwd + bwd, bf16) at HBM speed;
without them, ``chunked`` (parallel in-chunk doubling) is priced per state element and ``cpu``
(a launch-bound loop over time) per time step, both as measured on an H200 (`SCAN_*`).

Pipeline: every rank runs its m micro-batches; the slowest stage sets the pace, and the
fill-and-drain bubble adds (P - 1) / v chunk times (`schedule.bubble_fraction`).

Communication per step on one rank, none of it assumed overlapped with compute (the engines
here reduce gradients after the backward; a conservative bound for the others):
- TP: per sub-layer and micro-batch one all-reduce of the [b, s, d] activations forward and
  one backward (with sequence parallelism a reduce-scatter + all-gather of the same volume),
  one more forward under ``full``; ring cost 2 (t - 1) / t x bytes;
- EP: per MoE sub-layer and micro-batch a dispatch and a combine all-to-all forward and
  backward, (e - 1) / e x tokens x top_k x d x bytes each;
- PP: per micro-batch and chunk boundary the residual state forward and its gradient back;
- DP / ZeRO: per step, gradients all-reduced (2 (z - 1) / z x 4 bytes x params) or, under ZeRO,
  reduce-scattered and the updated weights all-gathered (the same volume); ZeRO-3 gathers the
  weights again in the forward and the backward.
Links: Megatron's rank order puts tensor ranks innermost, then expert and data ranks, pipeline
outermost; a group whose ranks span at most one node uses NVLink, else InfiniBand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arch.config import ModelConfig
from arch.flops import _linear_flops, sublayer_flops, training_flops_per_token
from trainer.config import RunConfig, grad_accumulation_steps
from trainer.parallel.census import Layout, RankShard, unit_model
from trainer.parallel.hardware import Hardware
from trainer.parallel.schedule import bubble_fraction
from trainer.parallel.stages import rank_chunks, stage_layer_ranges

# Fractions of the device peak each kind of work achieves (printed with every plan).
EFFICIENCY = {
    "matmul": 0.55,  # large bf16 GEMMs reach 60-75% of H100 peak; less for the skinny ones
    "attention": 0.40,  # FlashAttention-2 fwd+bwd on H100: ~35-50% of peak
    "other": 0.10,  # convolutions, Mamba-2's small chunked products, norms
    "hbm": 0.60,  # share of HBM bandwidth a bandwidth-bound kernel reaches
    "link": 0.80,  # share of a link's bandwidth a large collective reaches (NCCL bus bandwidth)
}
# Mamba-1 scans without mamba_ssm, fwd + bwd, measured on an H200 (benchmarks/RESULTS.md,
# 2026-11-26): the `cpu` scan is a loop over time, launch-bound (the same at batch 4 and 8), so
# it costs per time step and Mamba sub-layer; `chunked` (its parallel strategy on CUDA) makes
# passes over group-sized state tensors, so it costs per state element (b x l x d_inner x N):
# 38.6 ms for 8 x 2048 x 1024 x 16, scaled by HBM bandwidth from the H200's 4,800 GB/s.
SCAN_STEP_S = {"cpu": 34e-6}
SCAN_PARALLEL_S_PER_STATE = 38.6e-3 / (8 * 2048 * 1024 * 16)
SCAN_PARALLEL_HBM_GBS = 4800.0
SCAN_BYTES_PER_TOKEN_CHANNEL = 24  # mamba_ssm fwd + bwd: u, delta, z, y (+ grads), bf16
# Fixed cost of one sub-layer's forward + backward for one micro-batch, whatever its size: ~40
# kernel launches at ~5 us (norms, casts, residual adds, the collectives' calls). What makes
# larger micro-batches faster at equal tokens.
SUBLAYER_LAUNCH_S = 200e-6


@dataclass(frozen=True)
class LayerCost:
    """Forward FLOPs per token of one sub-layer: matrix products, the rest, the part of each
    that ``selective`` recomputes, and what kind it is."""

    family: str
    matmul: float
    attention: float
    other: float
    selective: float
    mamba1_channels: int = 0  # inner channels of a Mamba-1 scan (0: none)
    experts_top_k: int = 0  # tokens per token an MoE all-to-all moves (top_k; 0: no MoE)


@dataclass
class StepTime:
    """Seconds per optimizer step, with its parts; ``comm`` by kind: (bytes per rank, seconds,
    link)."""

    compute_s: float
    bubble_s: float
    scan_s: float
    optimizer_s: float
    comm: dict[str, tuple[float, float, str]] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return (
            self.compute_s
            + self.bubble_s
            + self.scan_s
            + self.optimizer_s
            + sum(seconds for _, seconds, _ in self.comm.values())
        )


_COSTS: dict[tuple[str, int], tuple[list[LayerCost], float, float]] = {}


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[LayerCost], float, float]:
    """(cost of every sub-layer, forward FLOPs per token of the output head, training FLOPs per
    token as `arch.flops` counts them for MFU), from the one-process model on the meta device
    (`census.unit_model`, the build the memory census already made); cached per model and
    sequence length."""
    key = (repr(cfg), seq_len)
    if key in _COSTS:
        return _COSTS[key]
    model = unit_model(cfg)
    costs = []
    for layer in model.layers:
        inner = layer.inner
        kind = type(inner).__name__
        total = sublayer_flops(inner, seq_len)
        linear = float(_linear_flops(inner))
        if kind == "MoE":
            linear = total  # router + top_k experts, all matrix products
        rest = max(0.0, total - linear)
        attention = rest if kind == "Attention" else 0.0
        other = rest - attention
        experts = total if kind == "MoE" else 0.0
        mamba1 = inner.d_inner if kind == "Mamba" else 0
        if mamba1:
            other -= 6.0 * inner.d_inner * inner.d_state  # the scan: priced by bytes or steps
        costs.append(
            LayerCost(
                family=kind.lower(),
                matmul=linear,
                attention=attention,
                other=max(0.0, other),
                selective=rest + experts,
                mamba1_channels=mamba1,
                experts_top_k=inner.cfg.top_k if kind == "MoE" else 0,
            )
        )
    head = 2.0 * cfg.d_model * cfg.vocab_size
    _COSTS[key] = (costs, head, training_flops_per_token(model, seq_len))
    return _COSTS[key]


def _ring(kind: str, group: int, nbytes: float) -> float:
    """Bytes one rank sends in a ring all-reduce (2 (n-1)/n), all-gather / reduce-scatter /
    all-to-all ((n-1)/n) of ``nbytes``."""
    if group <= 1:
        return 0.0
    share = (group - 1) / group
    return (2 if kind == "all_reduce" else 1) * share * nbytes


def step_time(
    cfg: RunConfig,
    layout: Layout,
    hw: Hardware,
    shards: list[RankShard],
    mamba_scan: str = "cuda",
) -> StepTime:
    """Predicted time of one optimizer step of ``cfg`` on ``layout`` (see the module doc)."""
    t, p = cfg.trainer, cfg.parallel
    eff = dict(hw.efficiency) if hw.efficiency else EFFICIENCY
    world = layout.world
    m = grad_accumulation_steps(cfg, world)  # micro-batches per rank and step
    tokens = t.micro_batch_size * t.seq_len  # per micro-batch
    act_bytes = 2 if t.precision == "bf16" else 4
    peak = hw.bf16_tflops * 1e12 if t.precision == "bf16" else hw.bf16_tflops * 1e12 / 2
    costs, head, _ = layer_costs(cfg.model, t.seq_len)
    ranges = stage_layer_ranges(cfg.model, layout.pp, layout.virtual)
    passes = {"none": 3.0, "selective": 3.0, "full": 4.0}[p.recompute]

    stage_compute, stage_scan = [], []
    for pp_rank in range(layout.pp):
        layers = [
            costs[i]
            for start, end in rank_chunks(ranges, pp_rank, layout.pp)
            for i in range(start, end)
        ]
        matmul = sum(c.matmul for c in layers) + (head if pp_rank == layout.pp - 1 else 0.0)
        seconds = (
            tokens
            / layout.tp
            * (
                passes * matmul / (peak * eff["matmul"])
                + passes * sum(c.attention for c in layers) / (peak * eff["attention"])
                + passes * sum(c.other for c in layers) / (peak * eff["other"])
            )
        )
        seconds += len(layers) * SUBLAYER_LAUNCH_S * passes / 3
        if p.recompute == "selective":
            seconds += (
                tokens / layout.tp * sum(c.selective for c in layers) / (peak * eff["matmul"])
            )
        scan = 0.0
        for c in layers:
            if not c.mamba1_channels:
                continue
            if mamba_scan == "cuda":
                moved = tokens * c.mamba1_channels / layout.tp * SCAN_BYTES_PER_TOKEN_CHANNEL
                scan += moved / (hw.hbm_gbs * 1e9 * eff["hbm"])
            elif mamba_scan == "chunked":
                states = tokens * c.mamba1_channels / layout.tp * cfg.model.mamba.d_state
                per_state = hw.scan_s_per_state or (
                    SCAN_PARALLEL_S_PER_STATE * SCAN_PARALLEL_HBM_GBS / hw.hbm_gbs
                )
                scan += states * per_state
            else:
                scan += t.seq_len * SCAN_STEP_S[mamba_scan]
        if p.recompute != "none":
            scan *= 4 / 3  # the scan's forward (a third of fwd + bwd) runs again
        stage_compute.append(seconds)
        stage_scan.append(scan)
    slowest = max(range(layout.pp), key=lambda r: stage_compute[r] + stage_scan[r])
    compute, scan = m * stage_compute[slowest], m * stage_scan[slowest]
    bubble_share = bubble_fraction(layout.pp, m, layout.virtual)
    bubble = (compute + scan) * bubble_share / (1 - bubble_share) if bubble_share else 0.0

    comm: dict[str, tuple[float, float, str]] = {}

    def add(kind: str, nbytes: float, count: int, span: int) -> None:
        if nbytes <= 0:
            return
        link, gbs = hw.link(span)
        seconds = nbytes / (gbs * 1e9 * eff["link"]) + count * hw.link_latency_s
        comm[kind] = (nbytes, seconds, link)

    busiest = [
        c for start, end in rank_chunks(ranges, slowest, layout.pp) for c in costs[start:end]
    ]
    activation = tokens * cfg.model.d_model * act_bytes
    if layout.tp > 1:
        per_layer = 3 if p.recompute == "full" else 2
        count = m * per_layer * len(busiest) + m * 2  # + embedding / head
        kind = "SP" if p.sequence_parallel else "TP"
        add(kind, count * _ring("all_reduce", layout.tp, activation), count, layout.tp)
    moe_layers = [c for c in busiest if c.experts_top_k]
    if layout.ep > 1 and moe_layers:
        per_layer = 6 if p.recompute in ("full", "selective") else 4
        local = tokens / (layout.tp if p.sequence_parallel else 1)
        moved = local * moe_layers[0].experts_top_k * cfg.model.d_model * act_bytes
        count = m * per_layer * len(moe_layers)
        add("EP", count * _ring("all_to_all", layout.ep, moved), count, layout.tp * layout.ep)
    if layout.pp > 1:
        state = tokens * cfg.model.d_model * 4 / (layout.tp if p.sequence_parallel else 1)
        count = 2 * m * layout.virtual  # forward state out, gradient back, per chunk
        add("PP", count * state, count, 2 * layout.tp * layout.dp)
    params = max(s.params for s in shards)
    z = layout.dp
    if z > 1:
        volume = _ring("all_reduce", z, 4.0 * params)
        if layout.effective_zero == 3:
            volume += 2 * _ring("all_gather", z, 4.0 * params)
        add("DP/ZeRO" if layout.effective_zero else "DP", volume, 2, layout.tp * layout.dp)
    # AdamW reads and writes weights, gradients and two moments (fp32) once per step.
    optimizer = 7 * 4.0 * params / (hw.hbm_gbs * 1e9 * eff["hbm"])
    if layout.effective_zero:
        optimizer /= layout.zero_group
    return StepTime(compute, bubble, scan, optimizer, comm)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (3x forward, no recomputation): the MFU convention."""
    return layer_costs(cfg, seq_len)[2]
