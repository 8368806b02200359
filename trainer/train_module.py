"""The TrainModule: model + optimizer + precision, and what one optimizer step does.

The Trainer (`trainer.loop`) owns the *when* (data, schedule, logging, checkpoints); this owns
the *how* of a step, which is the part the parallel recipes (DP/TP/PP/ZeRO) replace.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from arch import build_model, count_parameters, lm_loss
from trainer.config import RunConfig
from trainer.optim import build_optimizer


@dataclass
class StepResult:
    loss: float  # mean loss over the step's micro-batches
    grad_norm: float  # global gradient norm before clipping


class TrainModule:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.model = build_model(cfg.model, seed=cfg.trainer.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.num_params = count_parameters(self.model)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return batch_loss(self.model, batch, self.cfg.trainer.precision)

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> StepResult:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros(())
        for batch in micro_batches:
            loss = self.loss(batch) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=total.item(), grad_norm=grad_norm.item())

    def eval_loss(self, samples: torch.Tensor, micro_batch_size: int) -> float:
        return evaluate_loss(self.model, samples, micro_batch_size, self.cfg.trainer.precision)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (master weights stay fp32) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model: torch.nn.Module, batch: torch.Tensor, precision: str) -> torch.Tensor:
    """Next-token loss of a [B, T + 1] batch of token ids."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with autocast(precision):
        logits = model(inputs)
    return lm_loss(logits, targets)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, samples: torch.Tensor, micro_batch_size: int, precision: str
) -> float:
    """Mean loss over held-out samples [N, T + 1], in micro-batches."""
    was_training = model.training
    model.eval()
    total = sum(
        batch_loss(model, chunk, precision).item() * len(chunk)
        for chunk in samples.split(micro_batch_size)
    )
    model.train(was_training)
    return total / len(samples)
