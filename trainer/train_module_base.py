"""The TrainModule contract: what the Trainer asks of the part that trains the model.

The Trainer (`trainer.loop`) owns the *when* (data, schedule, logging, checkpoints); a
TrainModule owns the *how* of a step on this process's place in the grid. Two implement it, with
the same constructor: `trainer.train_module.SingleProcessTrainModule` (world 1: the whole model
and a torch optimizer) and `trainer.parallel.train_module.ParallelTrainModule` (a tensor-parallel
pipeline stage, 1F1B, a DeepSpeed engine). `build_train_module` picks one from the grid, so the
Trainer never knows which it drives. (OLMo-core's ``TrainModule`` is the model of this split.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.config import RunConfig
from trainer.parallel.grid import Grid

if TYPE_CHECKING:  # the checkpoint format (safetensors) loads where checkpoints are written
    from trainer.checkpoint import Checkpoint


@dataclass
class StepResult:
    loss: float  # mean loss over the step's micro-batches
    grad_norm: float  # global gradient norm before clipping
    # The model's auxiliary losses and diagnostics (MoE balance, z-loss, expert loads), averaged
    # over the micro-batches; "loss" above stays the LM loss so runs compare across models.
    metrics: dict[str, float] = field(default_factory=dict)


class TrainModule(ABC):
    """Model + optimizer + precision on this rank, and what one optimizer step does.

    ``checkpoint``: start from its weights and optimizer state, whatever layout wrote it. It is
    a constructor argument rather than a later call because DeepSpeed copies the weights into
    its fp32 partitions when its engine is built: the distributed module needs them before.
    Implementations set ``num_params`` and ``train_flops_per_token`` (the whole model's, whatever
    part this rank holds).
    """

    num_params: int
    train_flops_per_token: float

    def __init__(self, cfg: RunConfig, grid: Grid, checkpoint: Checkpoint | None = None) -> None:
        self.cfg, self.grid = cfg, grid
        # The end-of-document token when packed documents are kept apart (data.document_masking);
        # set by the Trainer once it knows the tokenizer.
        self.eos_id: int | None = None

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that logs and writes a checkpoint's shared files."""
        return self.grid.is_main

    @property
    @abstractmethod
    def layout(self) -> str:
        """How the model is laid out over the processes, for the logs ("" for one process)."""

    @property
    @abstractmethod
    def checkpoint_layout(self) -> dict[str, int] | None:
        """The layout the checkpoint manifest records (tp, pp, dp of sharded files); None for
        the one-process format (one model file, one optimizer file)."""

    @abstractmethod
    def train_step(
        self, micro_batches: list[torch.Tensor], lr: float, gather_metrics: bool = True
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches at learning rate ``lr``. Without
        ``gather_metrics`` the auxiliary metrics may be left out (they cost a collective)."""

    @abstractmethod
    def eval_loss(self, samples: torch.Tensor, micro_batch_size: int) -> float:
        """Mean LM loss over held-out samples [N, T + 1], the same on every rank."""

    @abstractmethod
    def prepare_save(self, copy: bool) -> Callable[[Path], list[str]]:
        """What this rank holds (weights, optimizer state, its own RNG where it differs), taken
        now, and the function that writes it into a checkpoint directory (returning the names
        of the files it wrote). Every rank calls it; the writer may be a collective (the ranks
        plan one checkpoint together), nothing is gathered. ``copy``: copy the tensors
        to host memory, so the writer may run in a background thread while training goes on
        (``trainer.checkpoint_async``); else the writer must run before the next step."""

    def save_state(self, directory: Path) -> None:
        """Write what this rank holds into the checkpoint being written in ``directory`` (a
        collective, like `prepare_save`); the trainer state and shared files are the Trainer's."""
        self.prepare_save(copy=False)(directory)

    @abstractmethod
    def saved_rng(self, checkpoint: Checkpoint, trainer_state: dict) -> dict | None:
        """This rank's RNG state in ``checkpoint`` (whose trainer state is ``trainer_state``),
        or None where the checkpoint holds none that maps onto this rank."""

    def state_bytes(self) -> int | None:
        """About how many bytes `save_state` writes, for a full disk's message; None: unknown
        (the message then estimates from the previous checkpoint)."""
        return None


def build_train_module(
    cfg: RunConfig, grid: Grid, checkpoint: Checkpoint | None = None
) -> TrainModule:
    """The module for ``grid``: one process trains with the plain torch step (the fastest, and
    the reference every layout is tested against), several with the distributed module."""
    if grid.world == 1:
        from trainer.train_module import SingleProcessTrainModule

        return SingleProcessTrainModule(cfg, grid, checkpoint)
    from trainer.parallel.train_module import ParallelTrainModule

    return ParallelTrainModule(cfg, grid, checkpoint)
