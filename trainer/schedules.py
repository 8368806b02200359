"""Learning-rate schedules (registry `scheduler`): pure functions of the step."""

from __future__ import annotations

import dataclasses
import math

from trainer.config import OptimConfig, effective_warmup
from trainer.registries import SCHEDULERS


def _warmup(step: int, cfg: OptimConfig) -> float | None:
    """Linear warm-up from lr/warmup to lr; None once warm-up is over."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return None


@SCHEDULERS.register("cosine")
def cosine(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""
    if (w := _warmup(step, cfg)) is not None:
        return w
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    progress = min(progress, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULERS.register("wsd")
def warmup_stable_decay(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Warm-up, a constant plateau, then linear decay to min_lr_ratio over the last decay_fraction."""
    if (w := _warmup(step, cfg)) is not None:
        return w
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1 - cfg.min_lr_ratio) * progress


@SCHEDULERS.register("constant")
def constant(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then the constant lr."""
    w = _warmup(step, cfg)
    return 1.0 if w is None else w


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """The lr of ``step`` (0-based) in a run of ``max_steps``; a warm-up that is not shorter than
    the run is shortened to ``max_steps - 1`` (as the CLI does), so every schedule, plugins
    included, sees a well-defined one."""
    warmup = effective_warmup(cfg.warmup_steps, max_steps)
    if warmup != cfg.warmup_steps:
        cfg = dataclasses.replace(cfg, warmup_steps=warmup)
    return cfg.lr * SCHEDULERS.get(cfg.scheduler)(step, max_steps, cfg)
