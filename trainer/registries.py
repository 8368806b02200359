"""The trainer's plugin registries.

- ``optimizer``: ``fn(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer``.
- ``scheduler``: ``fn(step: int, max_steps: int, cfg: OptimConfig) -> float``, the LR multiplier
  at ``step`` (a pure function of the step, so resuming needs nothing but the step counter).
"""

from __future__ import annotations

from arch.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer", "optimizers over the model's parameter groups")
SCHEDULERS: Registry = Registry("scheduler", "learning-rate multipliers as a function of the step")
