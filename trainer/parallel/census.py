"""What every rank of a layout holds, counted on its real shard built on the meta device.

No GPU, no other process and no memory is needed: `simulated_rank` makes this process one rank
of the layout's world on torch's fake process-group backend with Megatron's groups over it, and
the rank's stage is built by the very code a training rank runs (`ParallelTrainModule`:
`HybridLM` with the Megatron context, cut by `PipelineStage`), every plugin's plan honoured, on
the meta device. A 64-GPU layout of a 52B
model is a few dozen such builds: one per distinct (pipeline, tensor, expert) rank role; the
data-parallel replicas of a role hold the same shapes.

`rank_census` gives each role's parameter count and the part of it the role *owns* (counted
once model-wide: a tensor-parallel split on every TP rank, a replicated tensor on TP rank 0, an
expert on its expert rank, a dense tensor on expert rank 0): summed over the roles, the owned
counts are the model's (`tests/test_census.py` checks it for the 52B recipe on 64 ranks).
`state_bytes` turns a role's count into the bytes its engine keeps (weights, gradients, optimizer
state; activations are not part of it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from arch import HybridLM, count_parameters
from arch.config import ModelConfig
from arch.model_plan import expert_of, split_of
from trainer.parallel.data_parallel import effective_zero_stage
from trainer.parallel.stages import PipelineStage, rank_chunks, stage_layer_ranges


@dataclass(frozen=True)
class Layout:
    """A parallel layout: world = tp x pp x dp; ``ep`` expert ranks carved out of dp; ``virtual``
    chunks per pipeline rank; ``zero``: the requested ZeRO stage."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    virtual: int = 1
    zero: int = 0

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def zero_group(self) -> int:
        """The ranks ZeRO partitions over (the expert-data-parallel group under EP)."""
        return self.dp // self.ep

    @property
    def effective_zero(self) -> int:
        """The stage the layout's ranks run (`effective_zero_stage`)."""
        return effective_zero_stage(self.zero, self.zero_group)


@dataclass(frozen=True)
class RankShard:
    """One rank role's shard: ``params`` elements held, ``owned`` of them counted model-wide,
    ``experts`` of them expert parameters."""

    pp_rank: int
    tp_rank: int
    ep_rank: int
    params: int
    owned: int
    experts: int


@contextlib.contextmanager
def simulated_rank(layout: Layout, rank: int) -> Iterator[None]:
    """This process as global rank ``rank`` of ``layout``'s world: torch's fake process-group
    backend (collectives are no-ops, nothing is sent; torchtitan's dry runs use it) under
    Megatron's groups, so Megatron's parallel layers take their real sizes and ranks."""
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a census simulates ranks outside a distributed job")
    dist.init_process_group("fake", rank=rank, world_size=layout.world, store=FakeStore())
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            expert_model_parallel_size=layout.ep,
            create_gloo_process_groups=False,
        )
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _stage(cfg: ModelConfig, layout: Layout, pp_rank: int) -> PipelineStage:
    """The current (simulated) rank's stage on the meta device, as `ParallelTrainModule` cuts it."""
    from arch.tensor_parallel_plan import DENSE

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp = DENSE
        if layout.tp > 1 or layout.ep > 1:  # Megatron's layers (imported only when needed)
            from trainer.parallel.tensor_parallel import MegatronTensorParallel

            tp = MegatronTensorParallel()
        model = HybridLM(cfg, tp=tp, init=False)
    ranges = stage_layer_ranges(cfg, layout.pp, layout.virtual)
    chunks = rank_chunks(ranges, pp_rank, layout.pp)
    return PipelineStage(model, chunks, pp_rank == 0, pp_rank == layout.pp - 1)


def _owned(name: str, cfg: ModelConfig, tp_rank: int, ep_rank: int) -> bool:
    """Whether this rank's copy of ``name`` is the one counted model-wide (the plugins' plans
    say what splits: the marks on parameters come only with `arch.model.materialize`)."""
    split = split_of(name, cfg) is not None
    expert = expert_of(name, cfg) is not None
    return (split or tp_rank == 0) and (expert or ep_rank == 0)


def rank_census(cfg: ModelConfig, layout: Layout) -> list[RankShard]:
    """Every distinct (pipeline, tensor, expert) rank role of ``layout``, in global rank order
    of its first rank."""
    from megatron.core import parallel_state as ps

    out, seen = [], set()
    for rank in range(layout.world):
        with simulated_rank(layout, rank):
            role = (
                ps.get_pipeline_model_parallel_rank(),
                ps.get_tensor_model_parallel_rank(),
                ps.get_expert_model_parallel_rank(),
            )
            if role in seen:
                continue
            seen.add(role)
            pp_rank, tp_rank, ep_rank = role
            stage = _stage(cfg, layout, pp_rank)
        params = owned = experts = 0
        for name, p in stage.model.named_parameters():
            params += p.numel()
            owned += p.numel() if _owned(name, cfg, tp_rank, ep_rank) else 0
            experts += p.numel() if expert_of(name, cfg) is not None else 0
        out.append(RankShard(pp_rank, tp_rank, ep_rank, params, owned, experts))
    return out


def unit_model(cfg: ModelConfig, tp: int = 1, ep: int = 1) -> HybridLM:
    """The whole model as tensor rank 0 / expert rank 0 of a ``tp`` x ``ep`` layout holds it,
    on the meta device (built once under the simulated groups, then cached). A unit's shard
    (``embed``, ``layers.<i>``, ``head``, ...) depends on the tensor and expert sizes only,
    never on the pipeline cut, so every stage of every layout is a selection of its units."""
    key = (repr(cfg), tp, ep)  # ModelConfig is a mutable dataclass: its repr is the key
    if key not in _UNIT_MODELS:
        layout = Layout(tp=tp, dp=ep, ep=ep)
        if tp == ep == 1:  # the dense build: no groups (nor Megatron) needed, e.g. on one GPU
            _UNIT_MODELS[key] = _stage(cfg, layout, 0).model
        else:
            with simulated_rank(layout, 0):
                _UNIT_MODELS[key] = _stage(cfg, layout, 0).model
    return _UNIT_MODELS[key]


_UNIT_MODELS: dict[tuple[str, int, int], HybridLM] = {}


def unit_of(name: str) -> str:
    """The top-level unit a parameter or module name belongs to (``layers.7``, ``embed``)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def stage_units(cfg: ModelConfig, layout: Layout, pp_rank: int) -> list[str]:
    """The units pipeline rank ``pp_rank`` of ``layout`` holds."""
    ranges = stage_layer_ranges(cfg, layout.pp, layout.virtual)
    chunks = rank_chunks(ranges, pp_rank, layout.pp)
    names = [f"layers.{i}" for start, end in chunks for i in range(start, end)]
    if pp_rank == 0:
        names += ["embed", "state_init"]
    if pp_rank == layout.pp - 1:
        names += ["norm", "head"]
    return names


def unit_parameters(cfg: ModelConfig, tp: int = 1, ep: int = 1) -> dict[str, tuple[int, int]]:
    """(parameters, expert parameters) of every unit of `unit_model`."""
    key = (repr(cfg), tp, ep)
    if key not in _UNIT_COUNTS:
        units: dict[str, list[int]] = {}
        for name, p in unit_model(cfg, tp, ep).named_parameters():
            counts = units.setdefault(unit_of(name), [0, 0])
            counts[0] += p.numel()
            counts[1] += p.numel() if expert_of(name, cfg) is not None else 0
        _UNIT_COUNTS[key] = {unit: (n, e) for unit, (n, e) in units.items()}
    return _UNIT_COUNTS[key]


_UNIT_COUNTS: dict[tuple[str, int, int], dict[str, tuple[int, int]]] = {}


def pipeline_census(cfg: ModelConfig, layout: Layout) -> list[RankShard]:
    """One role per pipeline rank (tensor rank 0, expert rank 0), summed from `unit_parameters`:
    what `rank_census` counts for those roles, in a fraction of the time (one meta build per
    tensor x expert size instead of one per role), for the planner's thousands of layouts.
    Every tensor / expert rank of a stage holds as many parameters as rank 0 (the plans split
    evenly or replicate), so these are the layout's sizes; ``owned`` is not counted here (0)."""
    units = unit_parameters(cfg, layout.tp, layout.ep)
    out = []
    for pp_rank in range(layout.pp):
        names = stage_units(cfg, layout, pp_rank)
        counts = [units.get(name, (0, 0)) for name in names]
        params, experts = sum(c[0] for c in counts), sum(c[1] for c in counts)
        out.append(RankShard(pp_rank, 0, 0, params, owned=0, experts=experts))
    return out


def model_parameters(cfg: ModelConfig) -> int:
    """The one-process model's parameter count (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(HybridLM(cfg, init=False))


def state_bytes(shard: RankShard, layout: Layout, moments: int = 2) -> dict[str, float]:
    """Bytes a rank of ``shard`` keeps for weights, gradients and optimizer state (fp32 master
    weights, ``moments`` fp32 tensors per parameter: AdamW's 2), by the engine its layout runs:

    - stage 0 (`DataParallelEngine`): weights, gradients, moments, all whole;
    - DeepSpeed ZeRO-1/2 over a group of z ranks: the model's weights, an fp32 master partition
      and the moments over z; ZeRO-1 keeps whole gradients plus a reduced partition, ZeRO-2 only
      the partition;
    - ZeRO-3: everything over z (plus the layer being gathered, not counted here).
    """
    n, z, stage = shard.params, layout.zero_group, layout.effective_zero
    word = 4
    if stage == 0:
        return {"weights": n * word, "grads": n * word, "optimizer": moments * n * word}
    if stage == 3:
        return {
            "weights": n * word / z,
            "grads": n * word / z,
            "optimizer": (1 + moments) * n * word / z,
        }
    grads = (n * word if stage == 1 else 0) + n * word / z
    return {"weights": n * word, "grads": grads, "optimizer": (1 + moments) * n * word / z}


def optimizer_moments(optimizer: str) -> int:
    """fp32 state tensors per parameter: SGD's momentum 1, AdamW's 2 (Muon: at most 2)."""
    return 1 if optimizer == "sgd" else 2


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
