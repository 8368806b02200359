"""Run directory or checkpoint -> model: the one way eval, generate, export, merge-pc and
`load_pretrained` get a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from arch import HybridLM
from arch.config import ModelConfig
from arch.hf import import_hf_dir, is_hf_dir
from arch.model import allocate
from arch.registry import UserError
from trainer.checkpoint.discovery import is_checkpoint_source, resolve_checkpoint
from trainer.checkpoint.format import Checkpoint
from trainer.checkpoint.reader import CheckpointReader
from trainer.config import RunConfig


class LoadedModel(NamedTuple):
    model: HybridLM  # in eval mode
    cfg: RunConfig  # the run config the checkpoint was written with
    checkpoint: Checkpoint  # where it came from (tokenizer files, step, trainer state)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint directory, a run's checkpoints/ or a run directory (its newest
    checkpoint), whatever layout wrote it; a one-line CheckpointError when there is none."""
    checkpoint = resolve_checkpoint(path)
    cfg = checkpoint.run_config()
    model = _built(cfg.model, CheckpointReader(checkpoint).model_state(), device)
    return LoadedModel(model, cfg, checkpoint)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> HybridLM:
    """An eval-mode model from a hybridtron checkpoint / run directory or a Hugging Face
    directory (a family of `arch.hf`), or an ``s3://`` URL of a stored checkpoint;
    ``model(input_ids)`` returns logits [B, T, vocab]."""
    if str(path).startswith("s3://"):
        return load_model(str(path), device).model
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if is_checkpoint_source(path):
        return load_model(path, device).model
    if is_hf_dir(path):
        return _built(*import_hf_dir(path), device)
    raise UserError(
        f"{path} is neither a hybridtron checkpoint / run directory nor a Hugging Face model "
        f"directory (config.json + *.safetensors)"
    )


def _built(
    cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device
) -> HybridLM:
    with torch.device("meta"):
        model = HybridLM(cfg, init=False)
    allocate(model, device)  # keeps what plugins mark on their parameters (_no_weight_decay)
    model.load_state_dict(state, strict=True)
    return model.eval()
