"""Checks of a dp x pp x tp layout that can fail before any process starts."""

from __future__ import annotations

from arch.model_plan import check_tensor_parallel
from arch.recompute import check_mode
from arch.registry import ConfigError
from trainer.config import RunConfig, grad_accumulation_steps

DISTRIBUTED_OPTIMIZERS = ("adamw", "sgd")


def validate_layout(cfg: RunConfig, world: int) -> None:
    """Raise ConfigError (one line naming the key and the fix) for a layout that cannot work."""
    p = cfg.parallel
    grad_accumulation_steps(cfg, world)  # tp x pp divides the world; the batch divides too
    check_mode(p.recompute)
    unbuilt = {
        "parallel.sequence_parallel": p.sequence_parallel,
        "parallel.expert": p.expert != 1,
        "parallel.virtual_stages": p.virtual_stages != 1,
    }
    for key, set_ in unbuilt.items():  # being built (issue 14); refused until then
        if set_:
            raise ConfigError(key, "is not available yet; leave it at its default")
    if world == 1:
        return
    from trainer.parallel.stages import stage_layer_ranges

    check_tensor_parallel(cfg.model, p.tensor)
    stage_layer_ranges(cfg.model, p.pipeline)
    if cfg.optim.name not in DISTRIBUTED_OPTIMIZERS:
        raise ConfigError(
            "optim.name",
            f"{cfg.optim.name!r} runs in one process only; multi-process runs use "
            f"{' or '.join(DISTRIBUTED_OPTIMIZERS)}",
        )
    if p.zero_stage == 3 and cfg.model.preconditioner.name != "none":
        raise ConfigError(
            "parallel.zero_stage",
            "ZeRO-3 partitions the weights the preconditioner reads between steps; use "
            "parallel.zero_stage=2 with model.preconditioner",
        )
    if p.timeout_s <= 0:
        raise ConfigError("parallel.timeout_s", f"must be positive, got {p.timeout_s}")
