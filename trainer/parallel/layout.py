"""Checks of a dp x pp x tp layout that can fail before any process starts."""

from __future__ import annotations

from arch.model_plan import check_tensor_parallel, expert_plugins
from arch.recompute import check_mode
from arch.registry import ConfigError
from trainer.config import RunConfig, grad_accumulation_steps

DISTRIBUTED_OPTIMIZERS = ("adamw", "sgd")


def validate_layout(cfg: RunConfig, world: int) -> None:
    """Raise ConfigError (one line naming the key and the fix) for a layout that cannot work."""
    p = cfg.parallel
    grad_accumulation_steps(cfg, world)  # tp x pp divides the world; the batch divides too
    check_mode(p.recompute)
    if p.sequence_parallel:
        check_sequence_parallel(cfg)
    if p.expert != 1:
        check_expert_parallel(cfg, world)
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


def check_expert_parallel(cfg: RunConfig, world: int) -> None:
    """Expert parallelism carves its groups out of the data-parallel ranks and splits the
    experts of every plugin that declares them evenly."""
    p = cfg.parallel
    if p.expert < 1:
        raise ConfigError("parallel.expert", f"must be >= 1, got {p.expert}")
    dp = world // (p.tensor * p.pipeline)
    if dp % p.expert:
        raise ConfigError(
            "parallel.expert",
            f"{p.expert} expert-parallel ranks are carved out of the {dp} data-parallel ones "
            f"(world {world} / (tensor {p.tensor} x pipeline {p.pipeline})), which it must "
            f"divide; launch dp = a multiple of {p.expert} or lower parallel.expert",
        )
    plugins = expert_plugins(cfg.model)
    if not plugins:
        raise ConfigError(
            "parallel.expert",
            f"no sub-layer of model.pattern {cfg.model.pattern!r} has experts to distribute "
            f"(e.g. `E`, moe); set parallel.expert=1",
        )
    for name, count in plugins:
        if count % p.expert:
            raise ConfigError(
                "parallel.expert",
                f"the {name} sub-layers have {count} experts, which {p.expert} expert-parallel "
                f"ranks cannot share evenly; use a parallel.expert that divides {count}",
            )
    if p.zero_stage == 3:
        raise ConfigError(
            "parallel.zero_stage",
            "ZeRO-3 does not combine with parallel.expert > 1; use parallel.zero_stage=1 or 2",
        )


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
