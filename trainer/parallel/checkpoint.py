"""Sharded checkpoints that load under any layout.

Every (pipeline stage, tensor rank) writes its parameters, DP-gathered from ZeRO, under their
dense names with their optimizer moments; every rank writes its RNG; rank 0 the step counters,
the data-loader position and the config. Files in ``step_N/``::

    shard-pp{p}-tp{t}.safetensors   fp32 weights of stage p, tensor rank t
    optim-pp{p}-tp{t}.pt            {"step": n, "state": {name: {"exp_avg": ..., ...}}}
    rng-rank{r}.pt                  python / numpy / torch RNG of global rank r
    state.pt, config.yaml, manifest.json (with "layout": {"tp", "pp", "dp"}), the tokenizer

Loading reads, for each parameter a process holds, the shards that cover it, merges them into the
dense tensor (`arch.model_plan.merge_shards`) and cuts this process's shard
(`arch.model_plan.split_for_rank`). So a checkpoint of any layout resumes under any other (one
process included), with no conversion step; `Checkpoint.model_state()` gives the dense model for
eval and export.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from arch.config import ModelConfig
from arch.model_plan import merge_shards
from trainer.checkpoint import OPTIMIZER_FILE, Checkpoint, CheckpointError

_SHARD = re.compile(r"^shard-pp(\d+)-tp(\d+)\.safetensors$")


def shard_file(pp_rank: int, tp_rank: int) -> str:
    return f"shard-pp{pp_rank}-tp{tp_rank}.safetensors"


def optim_file(pp_rank: int, tp_rank: int) -> str:
    return f"optim-pp{pp_rank}-tp{tp_rank}.pt"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def write_shard(
    directory: Path,
    pp_rank: int,
    tp_rank: int,
    weights: dict[str, torch.Tensor],
    optimizer_step: int,
    moments: dict[str, dict[str, torch.Tensor]],
) -> None:
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in weights.items()},
        directory / shard_file(pp_rank, tp_rank),
    )
    torch.save({"step": optimizer_step, "state": moments}, directory / optim_file(pp_rank, tp_rank))


def model_config_of(checkpoint: Checkpoint) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), checkpoint.config.get("model", {}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    return cfg


class ShardedCheckpoint:
    """Dense tensors (weights, optimizer moments) of a checkpoint of any layout, read lazily."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.cfg = model_config_of(checkpoint)
        self.tp = checkpoint.layout["tp"] if checkpoint.layout else 1

    @cached_property
    def _index(self) -> dict[str, list[Path]]:
        """Dense name -> the files holding its shards, in tensor-rank order."""
        index: dict[str, dict[int, Path]] = {}
        for path in sorted(self.checkpoint.path.iterdir()):
            match = _SHARD.match(path.name)
            if match:
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        index.setdefault(name, {})[int(match.group(2))] = path
        return {name: [by_rank[r] for r in sorted(by_rank)] for name, by_rank in index.items()}

    def names(self) -> list[str]:
        return list(self._index)

    def tensor(self, name: str) -> torch.Tensor:

        files = self._index.get(name)
        if files is None:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} has no parameter {name!r}; it was written for "
                f"another model"
            )
        shards = []
        for path in files:
            with safe_open(path, "pt") as f:
                shards.append(f.get_tensor(name))
        return shards[0] if len(shards) == 1 else merge_shards(name, shards, self.cfg)

    def dense_model_state(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.names()}

    @cached_property
    def _optim(self) -> tuple[int, dict[str, list[dict[str, torch.Tensor]]]]:
        step, state = 0, {}
        for path in sorted(self.checkpoint.path.glob("optim-pp*-tp*.pt")):
            saved = torch.load(path, weights_only=False)
            step = saved["step"]
            for name, moments in saved["state"].items():
                state.setdefault(name, []).append(moments)
        return step, state

    def optimizer_step(self) -> int:
        return self._optim[0]

    def moments(self, name: str) -> dict[str, torch.Tensor]:
        """Dense optimizer state tensors of parameter ``name`` ({} when none was saved)."""

        per_rank = self._optim[1].get(name)
        if not per_rank:
            return {}
        if len(per_rank) == 1:
            return per_rank[0]
        return {
            key: merge_shards(name, [m[key] for m in per_rank], self.cfg) for key in per_rank[0]
        }


class DenseCheckpoint:
    """The same reading interface over a one-process checkpoint (model.safetensors and a torch
    optimizer state dict whose parameters are matched to names by the optimizer's groups)."""

    def __init__(self, checkpoint: Checkpoint, weight_decay: float) -> None:
        self.checkpoint = checkpoint
        self.cfg = model_config_of(checkpoint)
        self.weights = checkpoint.model_state()
        self._state, self._step = self._moments_by_name(weight_decay)

    def _moments_by_name(self, weight_decay: float):
        from arch import build_model
        from trainer.optim import param_groups

        if not (self.checkpoint.path / OPTIMIZER_FILE).exists():
            return {}, 0
        saved = self.checkpoint.optimizer_state()
        if not saved.get("state"):
            return {}, 0
        with torch.device("meta"):
            model = build_model(self.cfg)
        name_of = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups(model, weight_decay)
        if len(groups) != len(saved["param_groups"]):
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path}: its optimizer ({len(saved['param_groups'])} "
                f"parameter groups) cannot be mapped to parameter names; only adamw and sgd "
                f"states move between layouts"
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
        return by_name, step

    def names(self) -> list[str]:
        return list(self.weights)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} has no parameter {name!r}; it was written for "
                f"another model"
            )
        return self.weights[name]

    def optimizer_step(self) -> int:
        return self._step

    def moments(self, name: str) -> dict[str, torch.Tensor]:
        return self._state.get(name, {})


def dense_reader(
    checkpoint: Checkpoint, weight_decay: float
) -> ShardedCheckpoint | DenseCheckpoint:
    """Reader of dense tensors for a checkpoint of any layout."""
    if checkpoint.sharded:
        return ShardedCheckpoint(checkpoint)
    return DenseCheckpoint(checkpoint, weight_decay)
