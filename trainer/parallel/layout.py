"""Checks of a dp x pp x tp layout that can fail before any process starts."""

from __future__ import annotations

from arch.model_plan import check_tensor_parallel
from arch.registry import ConfigError
from trainer.config import RunConfig, grad_accumulation_steps

DISTRIBUTED_OPTIMIZERS = ("adamw", "sgd")


def validate_layout(cfg: RunConfig, world: int) -> None:
    """Raise ConfigError (one line naming the key and the fix) for a layout that cannot work."""
    p = cfg.parallel
    grad_accumulation_steps(cfg, world)  # tp x pp divides the world; the batch divides too
    unbuilt = {
        "parallel.recompute": p.recompute != "none",
        "parallel.expert": p.expert != 1,
        "parallel.virtual_stages": p.virtual_stages != 1,
    }
    for key, set_ in unbuilt.items():  # being built (issue 14); refused until then
        if set_:
            raise ConfigError(key, "is not available yet; leave it at its default")
    if p.sequence_parallel:
        check_sequence_parallel(cfg)
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


def check_sequence_parallel(cfg: RunConfig) -> None:
    """Sequence parallelism shards the sequence over the tensor-parallel ranks."""
    p, seq = cfg.parallel, cfg.trainer.seq_len
    if p.tensor == 1:
        raise ConfigError(
            "parallel.sequence_parallel",
            "shards the sequence over the tensor-parallel ranks, so it needs parallel.tensor > 1; "
            "set parallel.tensor or drop parallel.sequence_parallel",
        )
    if seq % p.tensor:
        raise ConfigError(
            "trainer.seq_len",
            f"{seq} does not split over the {p.tensor} tensor-parallel ranks of "
            f"parallel.sequence_parallel; use a multiple of {p.tensor}",
        )
