"""Optimizers (registry `optimizer`) and the parameter groups they see."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.registries import OPTIMIZERS


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norms, scalars) and embeddings do not (the usual LM recipe)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW (decoupled weight decay), foreach implementation."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum betas[0] (a baseline)."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(param_groups(model, cfg.weight_decay), cfg)
