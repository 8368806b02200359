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
        "parallel.sequence_parallel": p.sequence_parallel,
        "parallel.expert": p.expert != 1,
    }
    for key, set_ in unbuilt.items():  # being built (issue 14); refused until then
        if set_:
            raise ConfigError(key, "is not available yet; leave it at its default")
    check_virtual_stages(cfg, world)
    if world == 1:
        return
    from trainer.parallel.stages import stage_layer_ranges

    check_tensor_parallel(cfg.model, p.tensor)
    stage_layer_ranges(cfg.model, p.pipeline, p.virtual_stages)
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


def check_virtual_stages(cfg: RunConfig, world: int) -> None:
    """Interleaved 1F1B needs several stages and runs micro-batches in groups of
    ``parallel.pipeline`` (Megatron's rule); the chunk count is checked with the cut."""
    p = cfg.parallel
    v = p.virtual_stages
    if v < 1:
        raise ConfigError("parallel.virtual_stages", f"must be at least 1, got {v}")
    if v == 1:
        return
    if p.pipeline == 1:
        raise ConfigError(
            "parallel.virtual_stages",
            f"{v} virtual stages need pipeline parallelism; set parallel.pipeline > 1 or "
            "parallel.virtual_stages=1",
        )
    m = grad_accumulation_steps(cfg, world)
    if m % p.pipeline:
        t = cfg.trainer
        raise ConfigError(
            "trainer.global_batch_size",
            f"interleaved 1F1B (parallel.virtual_stages={v}) runs micro-batches in groups of "
            f"parallel.pipeline={p.pipeline}, but trainer.global_batch_size={t.global_batch_size} "
            f"/ (trainer.micro_batch_size={t.micro_batch_size} x dp) gives {m} a step; make it "
            f"a multiple of {p.pipeline}",
        )
