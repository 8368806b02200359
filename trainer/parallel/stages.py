"""Pipeline stages: where the pattern is cut, and the part of the model one stage runs.

A stage keeps the dense model's parameter names (``layers.7.inner.wq.weight`` stays that on
whichever stage holds sub-layer 7), so checkpoints and resharding never depend on the layout.
"""

from __future__ import annotations

import torch
from torch import nn

from arch.config import STAGE_SEPARATOR, ModelConfig
from arch.layers_registry import RESIDUALS
from arch.model import HybridLM
from arch.registry import ConfigError
from arch.residual import State


def stage_layer_ranges(cfg: ModelConfig, stages: int) -> list[tuple[int, int]]:
    """[start, end) sub-layer indices of each pipeline stage.

    Cut at ``|`` in the pattern when it has them (then their count must match), else balanced:
    equal numbers of sub-layers, the earlier stages taking the remainder (the last stage also
    runs the output head).
    """
    n = len(cfg.layers)
    if STAGE_SEPARATOR in cfg.pattern and stages > 1:
        parts = cfg.pattern.split(STAGE_SEPARATOR)
        if len(parts) != stages:
            raise ConfigError(
                "parallel.pipeline",
                f"{stages} stages, but model.pattern {cfg.pattern!r} has {len(parts)} stages cut "
                f"by '|'; set parallel.pipeline={len(parts)} or remove the '|' to balance "
                f"automatically",
            )
        ranges, start = [], 0
        for part in parts:
            ranges.append((start, start + len(part)))
            start += len(part)
        return ranges
    if stages > n:
        raise ConfigError(
            "parallel.pipeline", f"{stages} stages for {n} sub-layers; use at most {n}"
        )
    base, extra = divmod(n, stages)
    ranges, start = [], 0
    for s in range(stages):
        size = base + (1 if s < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def state_shapes(
    cfg: ModelConfig, batch: int, seq: int
) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every residual-state stream a stage sends (the initial state's)."""
    with torch.device("meta"):
        init = RESIDUALS.get(cfg.residual.name).build_state_init(cfg)
        x0 = torch.empty(batch, seq, cfg.d_model)
        ids = torch.zeros(batch, seq, dtype=torch.long)
        state = init(x0, ids)
    return {name: (t.shape, t.dtype) for name, t in sorted(state.items())}


class PipelineStage(nn.Module):
    """Sub-layers [start, end) of a (possibly tensor-parallel) HybridLM, plus the embedding on
    the first stage and the final norm + head on the last.

    ``forward`` maps token ids (first stage) or the residual state received from the previous
    stage to the state for the next stage, or to logits on the last stage. With tied embeddings
    and several stages the last stage holds a copy of the embedding as ``tied_head`` (a plain
    tensor, not a parameter); the schedule adds its gradient to the first stage's embedding and
    sends the updated weight back after every step.

    Cut from a meta-device model, a stage is materialised after the cut
    (`arch.model.materialize`), so a rank allocates only its own units; the caller then fills
    ``tied_head`` (`arch.model.unit_shards` of the embedding).
    """

    def __init__(self, model: HybridLM, start: int, end: int, first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.start, self.end, self.first, self.last = start, end, first, last
        for i in range(len(model.layers)):
            if not start <= i < end:
                model.layers[i] = nn.Identity()  # keeps the global index of the stage's layers
        self.tied_head: torch.Tensor | None = None
        if last and not first and model.head is None:
            self.tied_head = model.embed.weight.detach().clone().requires_grad_(True)
        if not first:
            model.embed = None
            model.state_init = None
        if not last:
            model.norm = None
            model.head = None
        self.model = model

    def forward(
        self, inputs: torch.Tensor | State, input_ids: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> State | torch.Tensor:
        m = self.model
        state = m.embed_tokens(input_ids) if self.first else inputs
        state = m.run_layers(state, doc_ids, self.start, self.end)
        if not self.last:
            return state
        return m.logits(m.norm(state["x"]), weight=self.tied_head)
