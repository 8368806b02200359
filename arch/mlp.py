"""The dense feed-forward sub-layer (`-`) and the FFN activations (registry `activation`).

``model.ffn_activation`` picks the activation of the MLP and of the MoE experts:

- gated (``swiglu``, the default): ``w2(silu(w1 x) * w3 x)``, three matrices;
- plain (``gelu``, ``relu``, ``relu2`` = squared ReLU): ``w2(act(w1 x))``, two matrices.

Activation sparsity: while a training step records (`arch.aux_losses`), every FFN reports the
fraction of exactly-zero entries of its hidden activation (the input of ``w2``) as
``ffn/zero_fraction/L{i}`` for sub-layer i (MoE: averaged over the experts that got tokens).
ReLU-family activations give a substantial fraction; SwiGLU and GELU give ~0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arch.aux_losses import active_recorder
from arch.config import ModelConfig
from arch.layers_registry import ACTIVATIONS, FFNS
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    DENSE,
    ROW_PARALLEL,
    TensorParallel,
    TensorParallelPlan,
)

MLP_SPLITS = {"w1.weight": COLUMN_PARALLEL, "w3.weight": COLUMN_PARALLEL, "w2.weight": ROW_PARALLEL}


@dataclass(frozen=True)
class Activation:
    """An FFN activation: ``fn`` on the hidden pre-activation; ``gated`` adds the w3 branch."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    doc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "__doc__", self.doc)  # the line `registry list` prints


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS.add("swiglu", Activation(F.silu, True, "SwiGLU: silu(w1 x) * w3 x (gated)"))
ACTIVATIONS.add("gelu", Activation(F.gelu, False, "GELU (erf), plain 2-matrix MLP"))
ACTIVATIONS.add("relu", Activation(F.relu, False, "ReLU, plain 2-matrix MLP (sparse)"))
ACTIVATIONS.add("relu2", Activation(_relu2, False, "squared ReLU (Primer), plain 2-matrix MLP"))


@FFNS.register("mlp")
class MLP(nn.Module):
    """Gated (SwiGLU) or plain MLP per model.ffn_activation; hidden width model.ffn_hidden."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_index: int,
        tp: TensorParallel = DENSE,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_size if hidden is None else hidden  # MoE experts pass theirs
        self.layer_index = layer_index
        self.activation: Activation = ACTIVATIONS.get(cfg.ffn_activation)
        d = cfg.d_model
        self.w1 = tp.linear(cfg, d, hidden, "w1", COLUMN_PARALLEL)
        self.w3 = (
            tp.linear(cfg, d, hidden, "w3", COLUMN_PARALLEL) if self.activation.gated else None
        )
        self.w2 = tp.linear(cfg, hidden, d, "w2", ROW_PARALLEL)

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Hidden units split: w1, w3 column-parallel, w2 row-parallel."""
        return TensorParallelPlan(
            splits=MLP_SPLITS,
            divisible={"model.ffn_hidden": cfg.ffn_hidden_size},
            collectives="all-reduce of w2's output (and of the input's gradient)",
            boundary=("w1", "w3", "w2"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.activation.fn(self.w1(x))
        if self.w3 is not None:
            a = a * self.w3(x)
        recorder = active_recorder()
        if recorder is not None and a.numel():
            zero = (a.detach() == 0).float().mean()
            recorder.add_metric(f"ffn/zero_fraction/L{self.layer_index}", zero)
        return self.w2(a)


SwiGLU = MLP  # the name the MLP had when it was SwiGLU only
