"""The process grid: world = dp x pp x tp, in Megatron's rank order (tp fastest, then dp, then pp).

Process groups come from `megatron.core.parallel_state`; this module starts them from the
environment any launcher sets (``hybridtron train --nproc-per-node``, torchrun, Slurm, Ray Train)
and hands DeepSpeed the small ``mpu`` adapter it needs to see the same groups. A one-process run
is the degenerate grid (`Grid.one_process`): no process group, and its collectives are identities.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from arch.registry import UserError
from trainer.parallel.watchdog import operation


@dataclass(frozen=True)
class Grid:
    """This process's place in the dp x pp x tp grid (global ranks of its pipeline neighbours)."""

    world: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    prev_rank: int | None  # global rank of the previous pipeline stage (same dp, tp)
    next_rank: int | None
    device: torch.device
    ep: int = 1  # expert-parallel size: ep consecutive data-parallel ranks share the experts
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that logs, plots and writes shared checkpoint files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} (dp {self.dp_rank}, pp {self.pp_rank}, tp {self.tp_rank})"

    @property
    def expert_dp_rank(self) -> int:
        """Rank among the data-parallel ranks that hold the same experts."""
        return self.dp_rank // self.ep

    @classmethod
    def one_process(cls) -> Grid:
        """The grid of a one-process run (world 1), on the current GPU when there is one, else
        the CPU; it starts no process group."""
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        return cls(1, 0, 1, 1, 1, 0, 0, 0, None, None, device)

    @property
    def layout(self) -> dict[str, int]:
        """The layout a checkpoint records and a resume compares: tp, pp, dp (and ep) sizes."""
        layout = {"tp": self.tp, "pp": self.pp, "dp": self.dp}
        return layout if self.ep == 1 else {**layout, "ep": self.ep}

    @property
    def data_partition(self) -> tuple[int, int] | None:
        """(data-parallel rank, size) the training stream is partitioned over; None for one
        process, which reads the stream as streaming partitions it (over itself)."""
        return (self.dp_rank, self.dp) if self.world > 1 else None

    # ---- collectives over the whole world (identities in a one-process run) ------------------
    def barrier(self, what: str = "barrier") -> None:
        if self.world > 1:
            with operation(what):
                dist.barrier()

    def any_rank(self, *flags: bool, what: str = "agree on stopping") -> tuple[bool, ...]:
        """Each flag, raised on any rank."""
        if self.world == 1:
            return flags
        t = torch.tensor([float(f) for f in flags])
        with operation(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        with operation(what):
            dist.all_gather_object(values, value)
        return values


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/Ray variables, else from Slurm's."""
    if "WORLD_SIZE" in os.environ:
        return (
            int(os.environ.get("RANK", 0)),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
        )
    return 0, 1, 0


def slurm_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """Under ``srun`` (no launcher of ours): where rank 0 listens and how many ranks share a node.

    MASTER_ADDR is the job's first node (``scontrol show hostnames``), MASTER_PORT is derived
    from the job id so concurrent jobs on a node do not collide. Empty outside Slurm.
    """
    if "SLURM_PROCID" not in env or "WORLD_SIZE" in env:
        return {}
    out = {"MASTER_PORT": str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)}
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodes:
        try:
            hosts = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
            ).stdout.split()
            out["MASTER_ADDR"] = hosts[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            out["MASTER_ADDR"] = nodes.split(",")[0].split("[")[0]  # a plain "node1,node2"
    if "SLURM_NTASKS_PER_NODE" in env:
        out["LOCAL_WORLD_SIZE"] = env["SLURM_NTASKS_PER_NODE"].split("(")[0]
    return out


def init_grid(tensor: int, pipeline: int, timeout_s: float, expert: int = 1) -> Grid:
    """Join the process group (NCCL on GPU, gloo on CPU) and build Megatron's groups.

    ``timeout_s`` bounds every collective: a hung or dead peer becomes an error on every rank
    instead of a silent hang.
    """
    rank, world, local_rank = env_world()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    for key, value in slurm_rendezvous(os.environ).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise UserError(
            "MASTER_PORT is not set; launch with hybridtron train --nproc-per-node N, torchrun, "
            "srun or hybridtron submit"
        )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert,
        distributed_timeout_minutes=timeout_s / 60,  # type: ignore[arg-type]  (a float works)
    )
    pp_rank = ps.get_pipeline_model_parallel_rank()
    return Grid(
        world=world,
        rank=rank,
        tp=tensor,
        pp=pipeline,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=pp_rank,
        dp_rank=ps.get_data_parallel_rank(),
        prev_rank=ps.get_pipeline_model_parallel_prev_rank() if pp_rank > 0 else None,
        next_rank=ps.get_pipeline_model_parallel_next_rank() if pp_rank < pipeline - 1 else None,
        device=device,
        ep=expert,
        ep_rank=ps.get_expert_model_parallel_rank(),
    )


def destroy_grid() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """What DeepSpeed asks of an ``mpu``, answered from Megatron's groups.

    Without it DeepSpeed takes every rank for a data-parallel peer and averages TP shards
    together (silently wrong). "Model parallel" here is TP x PP. The sequence-parallel methods
    are deliberately absent: their presence makes DeepSpeed ignore the data-parallel group.

    ``expert_parallel``: DeepSpeed's data parallelism is then the expert-data-parallel group and
    its model parallelism TP x PP x EP (see `trainer.parallel.expert_parallel`).
    """

    def __init__(self, expert_parallel: bool = False) -> None:
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.expert_parallel = expert_parallel

    def get_data_parallel_group(self):
        if self.expert_parallel:
            return self.ps.get_expert_data_parallel_group()
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_data_parallel_group())

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.get_data_parallel_group())

    def get_model_parallel_group(self):
        if self.expert_parallel:
            return self.ps.get_expert_tensor_model_pipeline_parallel_group()
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()
