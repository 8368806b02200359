"""`hybridtron plan`: every valid layout of a model on a cluster, its per-rank memory and its
predicted step time, ranked.

A candidate is a layout (tensor, pipeline, virtual stages, expert, data parallelism, ZeRO stage)
with a micro-batch size, a recomputation mode and sequence parallelism. Each is checked by the
same validation a launch runs (`validate_run_config`, `validate_layout`: the plugins' plans say
what tensor parallelism must divide), then priced:

- memory per rank role: `trainer.parallel.memory_model.rank_memory` on the roles' real shards
  (`census.pipeline_census`: built on the meta device by the training code);
- time: `trainer.parallel.plan_time.step_time`.

A candidate fits when its largest rank's peak plus the runtime's own reservation is within the
device memory. Ranked by predicted step time (then by memory).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from arch.registry import ConfigError
from trainer.config import RunConfig, validate_run_config
from trainer.parallel.census import Layout, RankShard, pipeline_census
from trainer.parallel.hardware import Hardware
from trainer.parallel.layout import validate_layout
from trainer.parallel.memory_model import RankMemory, rank_memory
from trainer.parallel.plan_time import StepTime, model_flops_per_token, step_time

GIB = 2**30
MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = ("none", "selective", "full")
VIRTUAL = (1, 2, 4)


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    micro_batch: int
    recompute: str
    sequence_parallel: bool

    def label(self) -> str:
        lay = self.layout
        parts = [f"tp{lay.tp}", f"pp{lay.pp}"]
        if lay.virtual > 1:
            parts.append(f"v{lay.virtual}")
        parts.append(f"dp{lay.dp}")
        if lay.ep > 1:
            parts.append(f"ep{lay.ep}")
        parts += [f"zero{lay.effective_zero}", f"mb{self.micro_batch}", self.recompute]
        if self.sequence_parallel:
            parts.append("sp")
        return " ".join(parts)

    def overrides(self) -> list[str]:
        """The `key=value` settings that run this candidate with `hybridtron train`."""
        lay = self.layout
        return [
            f"parallel.tensor={lay.tp}",
            f"parallel.pipeline={lay.pp}",
            f"parallel.virtual_stages={lay.virtual}",
            f"parallel.expert={lay.ep}",
            f"parallel.zero_stage={lay.zero}",
            f"parallel.recompute={self.recompute}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"trainer.micro_batch_size={self.micro_batch}",
        ]


@dataclass
class Prediction:
    candidate: Candidate
    ranks: list[RankMemory]
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    fits: bool

    @property
    def largest(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def peak_gib(self) -> float:
        return self.largest.total / GIB


def configured(cfg: RunConfig, c: Candidate) -> RunConfig:
    """``cfg`` with the candidate's parallel and micro-batch settings."""
    lay = c.layout
    parallel = dataclasses.replace(
        cfg.parallel,
        tensor=lay.tp,
        pipeline=lay.pp,
        virtual_stages=lay.virtual,
        expert=lay.ep,
        zero_stage=lay.zero,
        recompute=c.recompute,
        sequence_parallel=c.sequence_parallel,
    )
    trainer = dataclasses.replace(cfg.trainer, micro_batch_size=c.micro_batch)
    return dataclasses.replace(cfg, parallel=parallel, trainer=trainer)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: RunConfig, hw: Hardware) -> Iterator[Candidate]:
    """Every combination worth pricing that the launch-time validation accepts. Tensor
    parallelism stays inside a node (its per-layer all-reduces would cross InfiniBand); ZeRO 0
    is tried only where there is nothing to partition or as the plain engine's baseline."""
    world = hw.gpus
    experts = max([1, *(_expert_counts(cfg))])
    for tp in _divisors(world):
        if tp > hw.gpus_per_node:
            continue
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            for virtual, ep, zero in itertools.product(VIRTUAL, _divisors(dp), (0, 1, 2, 3)):
                if (virtual > 1 and pp == 1) or experts % ep:
                    continue
                layout = Layout(tp=tp, pp=pp, dp=dp, ep=ep, virtual=virtual, zero=zero)
                if zero and layout.zero_group == 1:
                    continue  # ZeRO over one rank runs as the plain engine: zero 0 covers it
                for micro, recompute in itertools.product(MICRO_BATCHES, RECOMPUTE):
                    for sp in (False, True) if tp > 1 else (False,):
                        c = Candidate(layout, micro, recompute, sp)
                        if _valid(cfg, c):
                            yield c


def _expert_counts(cfg: RunConfig) -> list[int]:
    from arch.model_plan import expert_plugins

    return [count for _, count in expert_plugins(cfg.model)]


def _valid(cfg: RunConfig, c: Candidate) -> bool:
    run = configured(cfg, c)
    try:
        validate_run_config(run, c.layout.world)
        validate_layout(run, c.layout.world)
    except ConfigError:
        return False
    return True


def predict(
    cfg: RunConfig,
    c: Candidate,
    hw: Hardware,
    mamba_scan: str = "cuda",
    shards: list[RankShard] | None = None,
) -> Prediction:
    """Memory and time of one candidate on ``hw`` (``shards``: its layout's pipeline census, when
    already counted)."""
    run = configured(cfg, c)
    shards = shards or pipeline_census(run.model, c.layout)
    ranks = rank_memory(run, c.layout, shards, device="cuda", mamba_scan=mamba_scan)
    time = step_time(run, c.layout, hw, shards, mamba_scan)
    tokens = run.trainer.global_batch_size * run.trainer.seq_len
    per_gpu = tokens / time.total / hw.gpus
    mfu = per_gpu * model_flops_per_token(run.model, run.trainer.seq_len) / (hw.bf16_tflops * 1e12)
    peak = max(r.total for r in ranks) / GIB
    fits = peak + hw.runtime_reserved_gib <= hw.memory_gib
    return Prediction(c, ranks, time, per_gpu, mfu, fits)


def plan(cfg: RunConfig, hw: Hardware, mamba_scan: str = "cuda") -> list[Prediction]:
    """Every valid candidate, fitting ones first, each group by predicted step time."""
    censuses: dict[tuple[int, int, int, int], list[RankShard]] = {}
    out = []
    for c in candidates(cfg, hw):
        lay = c.layout
        key = (lay.tp, lay.pp, lay.ep, lay.virtual)  # what a rank's shard depends on
        if key not in censuses:
            censuses[key] = pipeline_census(cfg.model, lay)
        out.append(predict(cfg, c, hw, mamba_scan, censuses[key]))
    out.sort(key=lambda p: (not p.fits, p.time.total, p.peak_gib))
    return out


def smallest_fitting_world(
    cfg: RunConfig, hw: Hardware, mamba_scan: str = "cuda", limit: int = 16
) -> int | None:
    """The smallest GPU count (doubling, up to ``limit`` x) at which some layout fits."""
    gpus = hw.gpus
    for _ in range(limit.bit_length()):
        gpus *= 2
        bigger = dataclasses.replace(hw, gpus=gpus)
        if any(p.fits for p in plan(cfg, bigger, mamba_scan)):
            return gpus
    return None
