"""Format 2: the boxes every rank wrote with `torch.distributed.checkpoint` (`dcp_io`).

A request for tensor rank r of s's slice of a parameter becomes the boxes of the dense tensor
that slice covers (one per fused part, `trainer.checkpoint.boxes.tp_pieces`); DCP reads, in this
process alone, the parts of the saved boxes that overlap them, whatever layout (tensor, pipeline,
data parallel with ZeRO partitions, experts) wrote them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from arch.model_plan import split_of
from trainer.checkpoint.boxes import tp_pieces
from trainer.checkpoint.dcp_io import (
    PARAM_GROUPS_KEY,
    SCALARS_KEY,
    STEP_KEY,
    load_boxes,
    model_key,
    moment_key,
    read_metadata,
    tensor_metadata,
)
from trainer.checkpoint.format import CheckpointError
from trainer.checkpoint.reader import CheckpointReader, Moments

MODEL_PREFIX, MOMENT_PREFIX = model_key(""), moment_key("", "")[:-1]

Wants = dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]


class DcpReader(CheckpointReader):
    """A format-2 checkpoint (`trainer.checkpoint.reader.CheckpointReader`'s methods)."""

    @cached_property
    def _metadata(self):
        try:
            return read_metadata(self.path)
        except Exception as exc:  # verified before: only a bug or a race gets here
            raise CheckpointError(
                f"checkpoint {self.path}: cannot read its metadata ({exc}); resume from another "
                f"checkpoint"
            ) from None

    def _objects(self, *keys: str) -> dict[str, Any]:
        present = [k for k in keys if k in self._metadata.state_dict_metadata]
        return load_boxes(self.path, self._metadata, {}, present) if present else {}

    def _slice_of(
        self,
        key: str,
        name: str,
        rank: int,
        size: int,
        wants: Wants,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rank ``rank`` of ``size``'s slice of saved tensor ``key`` (of parameter ``name``),
        its boxes added to ``wants``: to be read into ``into`` (None: a new tensor)."""
        md = tensor_metadata(self._metadata, key)
        if md is None:
            raise CheckpointError(
                f"checkpoint {self.path} has no {key!r}; it was written for another model"
            )
        shape, split = tuple(md.size), split_of(name, self.cfg)
        whole = split is None or size == 1 or len(shape) <= split.dim
        local_shape = shape
        if not whole:
            dim = split.dim
            local_shape = (*shape[:dim], shape[dim] // size, *shape[dim + 1 :])
        if into is None:
            into = torch.empty(local_shape, dtype=md.properties.dtype)
        elif tuple(into.shape) != local_shape:
            raise CheckpointError(
                f"checkpoint {self.path}: {key!r} is {list(shape)}, which does not fit "
                f"{list(into.shape)} at tensor rank {rank} of {size}; it was written for another "
                f"model"
            )
        if whole:
            wants[key] = [((0,) * len(shape), into)]
        else:
            wants[key] = [
                ((0,) * dim + (dense,) + (0,) * (len(shape) - dim - 1), into.narrow(dim, start, n))
                for start, dense, n in tp_pieces(split, local_shape[dim], rank, size)
            ]
        return into

    # ---- weights ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        keys = self._metadata.state_dict_metadata
        return [k[len(MODEL_PREFIX) :] for k in keys if k.startswith(MODEL_PREFIX)]

    def tensor(self, name: str, rank: int = 0, size: int = 1) -> torch.Tensor:
        return self.tensors([name], rank, size)[name]

    def tensors(self, names: list[str], rank: int = 0, size: int = 1) -> dict[str, torch.Tensor]:
        wants: Wants = {}
        out = {name: self._slice_of(model_key(name), name, rank, size, wants) for name in names}
        load_boxes(self.path, self._metadata, wants)
        return out

    def read_into(self, targets: dict[str, torch.Tensor], rank: int = 0, size: int = 1) -> None:
        wants: Wants = {}
        with torch.no_grad():
            for name, target in targets.items():
                self._slice_of(model_key(name), name, rank, size, wants, target.detach())
            load_boxes(self.path, self._metadata, wants)

    # ---- optimizer -------------------------------------------------------------------------
    @cached_property
    def _moment_keys(self) -> dict[str, list[str]]:
        """Parameter name -> its saved state keys (exp_avg, ...)."""
        found: dict[str, list[str]] = {}
        for key in self._metadata.state_dict_metadata:
            if key.startswith(MOMENT_PREFIX):
                name, state = key[len(MOMENT_PREFIX) :].rsplit(".", 1)
                found.setdefault(name, []).append(state)
        return found

    def optimizer_step(self) -> int:
        return int(self._objects(STEP_KEY).get(STEP_KEY, 0))

    def moments(self, name: str, rank: int = 0, size: int = 1) -> Moments:
        wants: Wants = {}
        out = {
            state: self._slice_of(moment_key(name, state), name, rank, size, wants)
            for state in self._moment_keys.get(name, [])
        }
        if wants:
            load_boxes(self.path, self._metadata, wants)
        return out

    def torch_optimizer_state(self) -> dict | None:
        """Rebuilt from the named moments and objects when one process wrote the checkpoint
        (its optimizer's groups were saved by name); None otherwise."""
        objects = self._objects(PARAM_GROUPS_KEY, SCALARS_KEY)
        if PARAM_GROUPS_KEY not in objects:
            return None
        scalars = objects.get(SCALARS_KEY, {})
        state, groups, index = {}, [], 0
        for group in objects[PARAM_GROUPS_KEY]:
            indices = []
            for name in group["params"]:
                entry = {**scalars.get(name, {}), **self.moments(name)}
                if entry:
                    state[index] = entry
                indices.append(index)
                index += 1
            groups.append({**group, "params": indices})
        return {"state": state, "param_groups": groups}
