"""The Ray Train side of `hybridtron submit`: what each TorchTrainer worker runs.

Ray Train starts one worker per process and has already joined them in a torch process group
(gloo on CPU, NCCL on GPU) with MASTER_ADDR / MASTER_PORT set. The worker exports the
torchrun-style variables (mosaicml-streaming partitions by them), loads the resolved job config
that travelled with the job, and runs the same rank entry point as `hybridtron train
--nproc-per-node`: the dp x pp x tp grid, then ``Trainer(cfg, grid=grid).fit()``, which resumes
from the newest complete checkpoint in trainer.run_dir. So when Ray restarts the worker group
after a failure, the run continues from there.
"""

from __future__ import annotations

import os
import tempfile


def export_rank_env() -> tuple[int, int]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / NODE_RANK from Ray Train's context."""
    import ray.train

    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        NODE_RANK=str(ctx.get_node_rank()),
    )
    return ctx.get_world_rank(), ctx.get_world_size()


def load_config_text(text: str, world_size: int | None):
    """The job config from its resolved YAML (validated again for this world)."""
    from launch.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name, [], world_size=world_size)
    finally:
        os.unlink(f.name)


def train_loop(loop_config: dict) -> None:
    """TorchTrainer's ``train_loop_per_worker``: one rank of the run."""
    from launch.cli import _train_rank

    rank, world = export_rank_env()
    cfg = load_config_text(loop_config["config_yaml"], world)
    if rank == 0:  # what the workers really got of cluster.env (NCCL / InfiniBand settings)
        seen = ", ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in sorted(cfg.cluster.env))
        print(f"[ray] worker environment: {seen}", flush=True)
    # Pre-empted (the driver wrote the PREEMPT notice; see launch.ray_job): every rank has
    # checkpointed and returns, so the job ends instead of being restarted.
    # The hints at the end repeat the submit command (None: a submit of the run's config.yaml).
    _train_rank(
        cfg, loop_config.get("config_name"), reraise=True, command=loop_config.get("command")
    )
