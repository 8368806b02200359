"""What every rank of a layout holds, counted on its real shard built on the meta device.

No process group and no memory is needed: Megatron's parallel layers take their tensor- and
expert-parallel size and rank from `megatron.core.parallel_state`'s overrides, which
`simulated_rank` sets for the build (and clears after), so a rank's stage is built by the very
code a training rank runs (`ParallelTrainModule`: `HybridLM` with the Megatron context, cut by
`PipelineStage`), every plugin's plan honoured, on the meta device. A 64-GPU layout of a 52B
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

from arch import HybridLM, count_parameters
from arch.config import ModelConfig
from arch.model_plan import expert_of
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
        """ZeRO over one rank partitions nothing: it runs as stage 0 (the plain engine)."""
        return self.zero if self.zero_group > 1 else 0


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
def simulated_rank(tp: int, tp_rank: int, ep: int, ep_rank: int) -> Iterator[None]:
    """Megatron's layers built as tensor rank ``tp_rank`` of ``tp`` and expert rank ``ep_rank``
    of ``ep``, without process groups (`parallel_state`'s size/rank overrides, cleared after)."""
    from megatron.core import parallel_state as ps

    ps.set_tensor_model_parallel_world_size(tp)
    ps.set_tensor_model_parallel_rank(tp_rank)
    ps.set_expert_model_parallel_world_size(ep)
    ps.set_expert_model_parallel_rank(ep_rank)
    try:
        yield
    finally:
        ps.set_tensor_model_parallel_world_size(None)
        ps.set_tensor_model_parallel_rank(None)
        ps.set_expert_model_parallel_world_size(None)
        ps.set_expert_model_parallel_rank(None)


def rank_stage(
    cfg: ModelConfig, layout: Layout, pp_rank: int, tp_rank: int, ep_rank: int
) -> PipelineStage:
    """The stage rank (``pp_rank``, ``tp_rank``, ``ep_rank``) trains, on the meta device."""
    from arch.tensor_parallel_plan import DENSE
    from trainer.parallel.tensor_parallel import MegatronTensorParallel

    with simulated_rank(layout.tp, tp_rank, layout.ep, ep_rank), torch.device("meta"):
        tp = MegatronTensorParallel() if layout.tp > 1 or layout.ep > 1 else DENSE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HybridLM(cfg, tp=tp, init=False)
    ranges = stage_layer_ranges(cfg, layout.pp, layout.virtual)
    chunks = rank_chunks(ranges, pp_rank, layout.pp)
    return PipelineStage(model, chunks, pp_rank == 0, pp_rank == layout.pp - 1)


def _owned(name: str, p: torch.nn.Parameter, cfg: ModelConfig, tp_rank: int, ep_rank: int) -> bool:
    split = getattr(p, "tensor_model_parallel", False)
    expert = expert_of(name, cfg) is not None
    return (bool(split) or tp_rank == 0) and (expert or ep_rank == 0)


def rank_census(cfg: ModelConfig, layout: Layout) -> list[RankShard]:
    """Every distinct rank role of ``layout``, pipeline rank major."""
    out = []
    for pp_rank in range(layout.pp):
        for tp_rank in range(layout.tp):
            for ep_rank in range(layout.ep):
                stage = rank_stage(cfg, layout, pp_rank, tp_rank, ep_rank)
                params = owned = experts = 0
                for name, p in stage.model.named_parameters():
                    params += p.numel()
                    owned += p.numel() if _owned(name, p, cfg, tp_rank, ep_rank) else 0
                    experts += p.numel() if expert_of(name, cfg) is not None else 0
                out.append(RankShard(pp_rank, tp_rank, ep_rank, params, owned, experts))
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
