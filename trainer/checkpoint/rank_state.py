"""What one rank holds, as boxes of the dense tensors (`trainer.checkpoint.dcp_io.Chunk`).

A piece is a contiguous range of a tensor shard's flattened elements (all of them without ZeRO,
the rank's partition under it); `piece_chunks` turns it into boxes under the dense name, at the
dense offsets. `one_process_state` is the degenerate case: the whole model and the torch
optimizer's state dict, named.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from arch.tensor_parallel_plan import Split
from trainer.checkpoint.boxes import dense_boxes, dense_shape, flat_range_boxes, tp_pieces
from trainer.checkpoint.dcp_io import (
    PARAM_GROUPS_KEY,
    SCALARS_KEY,
    STEP_KEY,
    Chunk,
    model_key,
    moment_key,
)


def piece_chunks(
    key: str,
    local_shape: tuple[int, ...],
    start: int,
    values: torch.Tensor,
    split: Split | None = None,
    tp_rank: int = 0,
    tp: int = 1,
) -> list[Chunk]:
    """Boxes of dense tensor ``key`` holding ``values``: flat elements [start, start + numel)
    of tensor rank ``tp_rank`` of ``tp``'s shard (shape ``local_shape``) under ``split``."""
    local_shape = tuple(local_shape)
    flat = values.reshape(-1)
    shape = dense_shape(local_shape, split, tp)
    dim_len = local_shape[split.dim] if split is not None and len(local_shape) > split.dim else 0
    pieces = tp_pieces(split, dim_len, tp_rank, tp)
    chunks = []
    for first, box in flat_range_boxes(local_shape, start, start + flat.numel()):
        data = flat[first - start : first - start + math.prod(box.sizes)].view(box.sizes)
        for part, offsets in dense_boxes(box, split, pieces):
            view = data
            for dim, (a, b) in enumerate(zip(part.offsets, box.offsets, strict=True)):
                view = view.narrow(dim, a - b, part.sizes[dim])
            chunks.append(Chunk(key, shape, tuple(offsets), view))
    return chunks


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in the order its state dict numbers them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def one_process_state(
    model_state: dict[str, torch.Tensor], optimizer_state: dict, param_names: list[str]
) -> tuple[list[Chunk], dict[str, Any]]:
    """One process's checkpoint: every weight and moment tensor whole under its dense name, and
    the rest of the torch optimizer's state dict (groups, step counters) as objects by name,
    so the same optimizer resumes exactly and any layout reads the moments."""
    chunks = [
        piece_chunks(model_key(n), tuple(t.shape), 0, t.detach()) for n, t in model_state.items()
    ]
    scalars: dict[str, dict[str, Any]] = {}
    step = 0
    for index, state in optimizer_state.get("state", {}).items():
        name = param_names[index]
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                chunks.append(piece_chunks(moment_key(name, key), tuple(value.shape), 0, value))
            else:
                scalars.setdefault(name, {})[key] = value
                if key == "step":
                    step = int(float(value))
    groups = [
        {**group, "params": [param_names[i] for i in group["params"]]}
        for group in optimizer_state.get("param_groups", [])
    ]
    objects = {STEP_KEY: step, PARAM_GROUPS_KEY: groups, SCALARS_KEY: scalars}
    return [c for group in chunks for c in group], objects
