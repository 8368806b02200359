"""Format 1 (kept one release, so older checkpoints still resume): dense-named safetensors.

A one-process checkpoint holds the whole model (``model.safetensors``) and the torch optimizer's
state dict, whose parameters are matched to names through the optimizer's groups. A multi-process
one holds, per (pipeline stage, tensor rank), shards under their dense names; a rank reads only
the parts of the saved shards that overlap its slice (`arch.tensor_parallel_plan.shard_reads`),
each file mapped only while one tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from arch.model_plan import split_of
from arch.tensor_parallel_plan import shard_reads
from trainer.checkpoint.format import (
    MODEL_FILE,
    OPTIM_SHARD_FILE,
    OPTIM_STEP_KEY,
    OPTIMIZER_FILE,
    SHARD_FILE,
    CheckpointError,
)
from trainer.checkpoint.reader import CheckpointReader, Moments


class MomentRead(NamedTuple):
    """One saved optimizer state tensor: its shape, and ``read(index)`` (None: all of it) as a
    new tensor."""

    shape: list[int]
    read: Callable[[tuple[slice, ...] | None], torch.Tensor]


def _safetensors_read(path: Path, stored: str) -> MomentRead:
    with safe_open(path, "pt") as f:
        shape = f.get_slice(stored).get_shape()

    def read(index: tuple[slice, ...] | None) -> torch.Tensor:
        with safe_open(path, "pt") as f:
            return f.get_tensor(stored) if index is None else f.get_slice(stored)[index]

    return MomentRead(shape, read)


def _tensor_read(saved: torch.Tensor) -> MomentRead:
    return MomentRead(list(saved.shape), lambda i: saved.clone() if i is None else saved[i].clone())


class Format1Reader(CheckpointReader):
    """A format-1 checkpoint (`trainer.checkpoint.reader.CheckpointReader`'s methods)."""

    # ---- weights ---------------------------------------------------------------------------
    @cached_property
    def _shards(self) -> dict[str, list[Path]]:
        """Dense name -> the files holding its shards, in tensor-rank order (one file: a
        one-process checkpoint)."""
        if not self.checkpoint.sharded:
            with safe_open(self.path / MODEL_FILE, "pt") as f:
                return {name: [self.path / MODEL_FILE] for name in f.keys()}
        index: dict[str, dict[int, Path]] = {}
        for path in sorted(self.path.iterdir()):
            match = SHARD_FILE.match(path.name)
            if match:
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        index.setdefault(name, {})[int(match.group(2))] = path
        return {name: [by_rank[r] for r in sorted(by_rank)] for name, by_rank in index.items()}

    def names(self) -> list[str]:
        return list(self._shards)

    def tensor(self, name: str, rank: int = 0, size: int = 1) -> torch.Tensor:
        """Tensor-parallel rank ``rank`` of ``size``'s slice of parameter (or buffer) ``name``
        (size 1: the dense tensor), read from the saved shards that overlap it."""
        files = self._shards.get(name)
        if files is None:
            raise CheckpointError(
                f"checkpoint {self.path} has no parameter {name!r}; it was written for another "
                f"model"
            )

        def read(k: int, index: tuple[slice, ...] | None) -> torch.Tensor:
            with safe_open(files[k], "pt") as f:
                return f.get_tensor(name) if index is None else f.get_slice(name)[index]

        with safe_open(files[0], "pt") as f:
            shape = f.get_slice(name).get_shape()
        return self._slice(name, len(files), shape, read, rank, size)

    def model_state(self) -> dict[str, torch.Tensor]:
        if not self.checkpoint.sharded:
            return load_file(self.path / MODEL_FILE)
        return super().model_state()

    def _slice(
        self,
        name: str,
        saved: int,
        shape: list[int] | torch.Size,
        read: Callable[[int, tuple[slice, ...] | None], torch.Tensor],
        rank: int,
        size: int,
    ) -> torch.Tensor:
        """Rank ``rank`` of ``size``'s slice of ``name`` from its ``saved`` shards of ``shape``;
        ``read(k, index)``: saved shard k, indexed (None: whole)."""
        split = split_of(name, self.cfg)
        if split is None or len(shape) <= split.dim:  # replicated (or a per-parameter scalar)
            return read(rank if saved == size else 0, None)
        if saved == size:  # the layout that saved it: this rank's own shard
            return read(rank, None)
        lead = (slice(None),) * split.dim
        pieces = [
            read(k, (*lead, slice(start, start + length)))
            for k, start, length in shard_reads(split, shape[split.dim], saved, rank, size)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, split.dim)

    # ---- optimizer -------------------------------------------------------------------------
    @cached_property
    def _optimizer(self) -> tuple[int, dict[str, list[dict[str, MomentRead]]]]:
        """(optimizer step, name -> per saved tensor rank: state key -> how to read it). A
        sharded checkpoint's moments are safetensors read slice by slice (each file mapped only
        while one tensor is read); a one-process checkpoint's torch state dict is mapped."""
        if self.checkpoint.sharded:
            step, state = 0, {}
            files = [(OPTIM_SHARD_FILE.match(p.name), p) for p in self.path.iterdir()]
            ordered = sorted((int(m.group(1)), int(m.group(2)), p) for m, p in files if m)
            for _, _, path in ordered:  # stage by stage, tensor ranks in order
                per_name: dict[str, dict[str, MomentRead]] = {}
                with safe_open(path, "pt") as f:
                    step = int((f.metadata() or {}).get(OPTIM_STEP_KEY, 0))
                    for stored in f.keys():
                        name, key = stored.rsplit(":", 1)
                        per_name.setdefault(name, {})[key] = _safetensors_read(path, stored)
                for name, reads in per_name.items():
                    state.setdefault(name, []).append(reads)
            return step, state
        step, by_name = self._torch_moments_by_name()
        reads = {n: {k: _tensor_read(t) for k, t in m.items()} for n, m in by_name.items()}
        return step, {name: [moments] for name, moments in reads.items()}

    def _torch_moments_by_name(self) -> tuple[int, dict[str, Moments]]:
        """A torch optimizer state dict's per-index state, named through the groups that
        `trainer.optim.param_groups` makes for this model (the order the optimizer saw)."""
        from arch import HybridLM
        from trainer.optim import param_groups

        file = self.path / OPTIMIZER_FILE
        # Mapped, not read: a rank of another layout touches only its slices.
        saved = torch.load(file, weights_only=False, mmap=True) if file.exists() else None
        if saved is None or not saved.get("state"):
            return 0, {}
        with torch.device("meta"):
            model = HybridLM(self.cfg, init=False)
        name_of = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups(model, weight_decay=0.0)  # the grouping, not the values, matters
        if len(groups) != len(saved["param_groups"]):
            raise CheckpointError(
                f"checkpoint {self.path}: its optimizer ({len(saved['param_groups'])} parameter "
                f"groups) cannot be mapped to parameter names; only adamw and sgd states move "
                f"between layouts"
            )
        by_name, step = {}, 0
        for live, stored in zip(groups, saved["param_groups"], strict=True):
            for param, index in zip(live["params"], stored["params"], strict=True):
                state = saved["state"].get(index, {})
                if "step" in state:
                    step = int(float(state["step"]))
                by_name[name_of[id(param)]] = {
                    k: v for k, v in state.items() if torch.is_tensor(v) and v.ndim > 0
                }
        return step, by_name

    def optimizer_step(self) -> int:
        """The optimizer's step count (0: no moments saved, e.g. imported weights)."""
        return self._optimizer[0]

    def moments(self, name: str, rank: int = 0, size: int = 1) -> Moments:
        """Tensor-parallel rank ``rank`` of ``size``'s slice of the optimizer state tensors of
        parameter ``name`` (size 1: dense; {} when none was saved)."""
        per_rank = self._optimizer[1].get(name)
        if not per_rank:
            return {}
        out = {}
        for key, first in per_rank[0].items():

            def read(k: int, index: tuple[slice, ...] | None, key: str = key) -> torch.Tensor:
                return per_rank[k][key].read(index)

            out[key] = self._slice(name, len(per_rank), first.shape, read, rank, size)
        return out

    def torch_optimizer_state(self) -> dict | None:
        """The torch optimizer's own state dict when one process wrote the checkpoint."""
        file = self.path / OPTIMIZER_FILE
        if self.checkpoint.sharded or not file.exists():
            return None
        return torch.load(file, weights_only=False)
