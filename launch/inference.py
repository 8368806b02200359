"""Loading a trained checkpoint for evaluation and generation."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from arch import HybridLM, build_model
from arch.registry import UserError
from trainer import checkpoint as ckpt
from trainer.config import RunConfig


def resolve_checkpoint(path: str) -> ckpt.Checkpoint:
    """A checkpoint directory, a run's checkpoints/ directory, or a run directory (-> newest)."""
    p = Path(path)
    if (p / ckpt.MANIFEST).exists() or not p.exists():
        return ckpt.verify_checkpoint(p)
    for checkpoints_dir in (p, p / "checkpoints"):
        if ckpt.list_checkpoints(checkpoints_dir):
            found = ckpt.find_latest_checkpoint(checkpoints_dir)
            assert found is not None
            return found
    raise UserError(
        f"{path} holds no hybridtron checkpoint; pass a run directory or checkpoints/step_N"
    )


def run_config_of(checkpoint: ckpt.Checkpoint) -> RunConfig:
    schema = OmegaConf.structured(RunConfig)
    stored = {k: v for k, v in checkpoint.config.items() if k in schema}
    return OmegaConf.to_object(OmegaConf.merge(schema, stored))


def load_model(checkpoint: ckpt.Checkpoint) -> tuple[HybridLM, RunConfig]:
    cfg = run_config_of(checkpoint)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model = model.to_empty(device="cpu")
    model.load_state_dict(checkpoint.model_state(), strict=True)
    return model.eval(), cfg
