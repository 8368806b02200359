"""One reader for a checkpoint of any layout: dense weights, per-parameter optimizer moments,
the optimizer step, the trainer state (step, tokens, data position), RNG and config.

A one-process checkpoint holds the whole model (``model.safetensors``) and the torch optimizer's
state dict, whose parameters are matched to names through the optimizer's groups. A multi-process
one holds, per (pipeline stage, tensor rank), shards under their dense names: for each parameter
the reader reads the shards that cover it and merges them into the dense tensor
(`arch.model_plan.merge_shards`); a process of another layout then cuts its own shard
(`arch.model_plan.split_for_rank`). So a checkpoint of any layout resumes under any other (one
process included), with no conversion step, and eval and export read the dense model.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from arch.model_plan import merge_shards
from trainer.checkpoint.format import (
    MODEL_FILE,
    OPTIM_SHARD_GLOB,
    OPTIMIZER_FILE,
    SHARD_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    rng_file,
)

Moments = dict[str, torch.Tensor]  # one parameter's optimizer state tensors (exp_avg, ...)


class CheckpointReader:
    """Dense tensors and state of a verified checkpoint, whatever layout wrote it, read lazily."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.cfg = checkpoint.model_config()

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

    def tensor(self, name: str) -> torch.Tensor:
        """The dense tensor of parameter (or buffer) ``name``."""
        files = self._shards.get(name)
        if files is None:
            raise CheckpointError(
                f"checkpoint {self.path} has no parameter {name!r}; it was written for another "
                f"model"
            )
        shards = []
        for path in files:
            with safe_open(path, "pt") as f:
                shards.append(f.get_tensor(name))
        return shards[0] if len(shards) == 1 else self._merge(name, shards)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model as one process holds it."""
        if not self.checkpoint.sharded:
            return load_file(self.path / MODEL_FILE)
        return {name: self.tensor(name) for name in self.names()}

    # ---- optimizer -------------------------------------------------------------------------
    @cached_property
    def _optimizer(self) -> tuple[int, dict[str, list[Moments]]]:
        """(optimizer step, name -> its moments as each tensor rank saved them)."""
        if self.checkpoint.sharded:
            step, state = 0, {}
            for path in sorted(self.path.glob(OPTIM_SHARD_GLOB)):
                saved = torch.load(path, weights_only=False)
                step = saved["step"]
                for name, moments in saved["state"].items():
                    state.setdefault(name, []).append(moments)
            return step, state
        step, by_name = self._torch_moments_by_name()
        return step, {name: [moments] for name, moments in by_name.items()}

    def _torch_moments_by_name(self) -> tuple[int, dict[str, Moments]]:
        """A torch optimizer state dict's per-index state, named through the groups that
        `trainer.optim.param_groups` makes for this model (the order the optimizer saw)."""
        from arch import build_model
        from trainer.optim import param_groups

        saved = self.torch_optimizer_state()
        if saved is None or not saved.get("state"):
            return 0, {}
        with torch.device("meta"):
            model = build_model(self.cfg)
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

    def moments(self, name: str) -> Moments:
        """Dense optimizer state tensors of parameter ``name`` ({} when none was saved)."""
        per_rank = self._optimizer[1].get(name)
        if not per_rank:
            return {}
        if len(per_rank) == 1:
            return per_rank[0]
        return {key: self._merge(name, [m[key] for m in per_rank]) for key in per_rank[0]}

    def torch_optimizer_state(self) -> dict | None:
        """The torch optimizer's own state dict when one process wrote the checkpoint."""
        file = self.path / OPTIMIZER_FILE
        if self.checkpoint.sharded or not file.exists():
            return None
        return torch.load(file, weights_only=False)

    def optimizer_state_for(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """A state dict for ``optimizer`` over ``model`` (one process): the saved one as it is
        when one process wrote the checkpoint (any optimizer resumes exactly), else one built
        from the named moments (adamw, sgd)."""
        saved = self.torch_optimizer_state()
        if saved is not None:
            return saved
        step = self.optimizer_step()
        names = {id(p): n for n, p in model.named_parameters()}
        state = optimizer.state_dict()
        index = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                moments = self.moments(names[id(param)])
                if moments:
                    state["state"][index] = {"step": torch.tensor(float(step)), **moments}
                index += 1
        return state

    # ---- the rest --------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """Step, tokens, the RNG of one process and the data-loader position."""
        return torch.load(self.path / STATE_FILE, weights_only=False)

    def rank_rng(self, rank: int) -> dict | None:
        """The RNG that global rank ``rank`` of a multi-process run saved (None: not saved)."""
        file = self.path / rng_file(rank)
        return torch.load(file, weights_only=False) if file.exists() else None

    def _merge(self, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        return merge_shards(name, shards, self.cfg)
