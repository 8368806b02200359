"""Pipeline stages: where the pattern is cut, and the chunks of the model one stage runs.

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


def stage_layer_ranges(
    cfg: ModelConfig, stages: int, virtual_stages: int = 1
) -> list[tuple[int, int]]:
    """[start, end) sub-layer indices of each of the ``stages x virtual_stages`` model chunks,
    in model order; pipeline rank p runs chunks p, p + stages, p + 2 stages, ... (Megatron's
    assignment, `rank_chunks`). Without virtual stages a chunk is a stage.

    Cut at ``|`` in the pattern when it has them (then the pattern must have one part per
    chunk), else balanced: equal numbers of sub-layers, the earlier chunks taking the remainder
    (the last one also runs the output head).
    """
    n, chunks = len(cfg.layers), stages * virtual_stages
    # The key a user changes to fix a bad count: the virtual stages when they are in play.
    key = "parallel.virtual_stages" if virtual_stages > 1 else "parallel.pipeline"
    what = (
        f"{stages} stages x {virtual_stages} virtual stages = {chunks} chunks"
        if virtual_stages > 1
        else f"{stages} stages"
    )
    if STAGE_SEPARATOR in cfg.pattern and chunks > 1:
        parts = cfg.pattern.split(STAGE_SEPARATOR)
        if len(parts) != chunks:
            fix = (
                f"cut model.pattern into {chunks} parts"
                if virtual_stages > 1
                else f"set parallel.pipeline={len(parts)}"
            )
            raise ConfigError(
                key,
                f"{what}, but model.pattern {cfg.pattern!r} has {len(parts)} parts cut by "
                f"'|'; {fix} or remove the '|' to balance automatically",
            )
        ranges, start = [], 0
        for part in parts:
            ranges.append((start, start + len(part)))
            start += len(part)
        return ranges
    if chunks > n:
        raise ConfigError(key, f"{what} for {n} sub-layers; use at most {n}")
    base, extra = divmod(n, chunks)
    ranges, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def rank_chunks(ranges: list[tuple[int, int]], stage: int, stages: int) -> list[tuple[int, int]]:
    """The chunks pipeline rank ``stage`` runs, in model order: every ``stages``-th one from
    its own, so a micro-batch visits the ranks in a ring, ``len(ranges) / stages`` times."""
    return ranges[stage::stages]


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
    """The chunks (sub-layer ranges) one pipeline rank runs of a (possibly tensor-parallel)
    HybridLM, plus the embedding on the first rank and the final norm + head on the last.

    ``forward(..., chunk)`` maps token ids (the model's first chunk) or the residual state
    received from the previous chunk to the state for the next chunk, or to logits for the
    model's last chunk. With tied embeddings and several stages the last stage holds a copy of
    the embedding as ``tied_head`` (a plain tensor, not a parameter); the schedule adds its
    gradient to the first stage's embedding and sends the updated weight back after every step.

    Cut from a meta-device model, a stage is materialised after the cut
    (`arch.model.materialize`), so a rank allocates only its own units; the caller then fills
    ``tied_head`` (`arch.model.unit_shards` of the embedding).
    """

    def __init__(
        self, model: HybridLM, chunks: list[tuple[int, int]], first: bool, last: bool
    ) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.chunks, self.first, self.last = list(chunks), first, last
        for i in range(len(model.layers)):
            if not any(start <= i < end for start, end in chunks):
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

    def starts_model(self, chunk: int) -> bool:
        """Whether ``chunk`` is the model's first (it embeds the tokens)."""
        return self.first and chunk == 0

    def ends_model(self, chunk: int) -> bool:
        """Whether ``chunk`` is the model's last (it returns logits)."""
        return self.last and chunk == len(self.chunks) - 1

    def forward(
        self,
        inputs: torch.Tensor | State | None,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None,
        chunk: int = 0,
    ) -> State | torch.Tensor:
        m = self.model
        start, end = self.chunks[chunk]
        state = m.embed_tokens(input_ids) if self.starts_model(chunk) else inputs
        state = m.run_layers(state, doc_ids, start, end)
        if not self.ends_model(chunk):
            return state
        return m.logits(m.norm(state["x"]), weight=self.tied_head)
