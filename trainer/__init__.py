"""trainer: the training loop, optimizers, schedules, checkpointing and metrics.

Imports `arch` and `data_pipeline`; never `launch`. Owns the optim/trainer/parallel configs and
composes them with the model and data configs into the run config.
"""

from trainer import optim, schedules  # noqa: F401  (register built-ins)
from trainer.config import OptimConfig, ParallelConfig, RunConfig, TrainerConfig
from trainer.loop import Trainer, TrainResult
from trainer.registries import OPTIMIZERS, SCHEDULERS

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
]
