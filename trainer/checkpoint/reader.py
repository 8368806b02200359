"""One reader for a checkpoint of any layout and either format: dense weights, per-parameter
optimizer moments, the optimizer step, the trainer state (step, tokens, data position), RNG and
config.

A process asks for its tensor-parallel slice of a parameter (``tensor(name, rank, size)``,
``moments(...)``; size 1: the dense tensor) and reads only the saved pieces that overlap it, so
a checkpoint of any layout resumes under any other (one process included) with no conversion
step, and eval and export read the dense model. ``CheckpointReader(checkpoint)`` is the reader of
its format:

- format 2 (`trainer.checkpoint.reader_dcp.DcpReader`): every rank's boxes of the dense tensors,
  written by `torch.distributed.checkpoint`;
- format 1 (`trainer.checkpoint.reader_v1.Format1Reader`): dense-named safetensors shards per
  (stage, tensor rank), kept for one release so that older checkpoints still resume (the next
  checkpoint of that run is written in format 2).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.checkpoint.format import STATE_FILE, Checkpoint, rng_file

Moments = dict[str, torch.Tensor]  # one parameter's optimizer state tensors (exp_avg, ...)


class CheckpointReader:
    """Dense tensors and state of a verified checkpoint, whatever layout wrote it, read lazily."""

    def __new__(cls, checkpoint: Checkpoint) -> CheckpointReader:
        if cls is CheckpointReader:  # the reader of the checkpoint's format
            if checkpoint.version >= 2:
                from trainer.checkpoint.reader_dcp import DcpReader as cls
            else:
                from trainer.checkpoint.reader_v1 import Format1Reader as cls
        return super().__new__(cls)

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.cfg = checkpoint.model_config()

    # ---- what each format answers ----------------------------------------------------------
    def names(self) -> list[str]:
        """The dense names of the saved parameters and buffers."""
        raise NotImplementedError

    def tensor(self, name: str, rank: int = 0, size: int = 1) -> torch.Tensor:
        """Tensor-parallel rank ``rank`` of ``size``'s slice of parameter (or buffer) ``name``
        (size 1: the dense tensor), read from the saved pieces that overlap it."""
        raise NotImplementedError

    def optimizer_step(self) -> int:
        """The optimizer's step count (0: no moments saved, e.g. imported weights)."""
        raise NotImplementedError

    def moments(self, name: str, rank: int = 0, size: int = 1) -> Moments:
        """Tensor-parallel rank ``rank`` of ``size``'s slice of the optimizer state tensors of
        parameter ``name`` (size 1: dense; {} when none was saved)."""
        raise NotImplementedError

    def torch_optimizer_state(self) -> dict | None:
        """The torch optimizer's own state dict when one process wrote the checkpoint."""
        raise NotImplementedError

    # ---- built on those --------------------------------------------------------------------
    def tensors(self, names: list[str], rank: int = 0, size: int = 1) -> dict[str, torch.Tensor]:
        """`tensor` of each of ``names`` (a format may read them in one pass)."""
        return {name: self.tensor(name, rank, size) for name in names}

    def read_into(self, targets: dict[str, torch.Tensor], rank: int = 0, size: int = 1) -> None:
        """Fill each tensor of ``targets`` (dense name -> a tensor of its slice's shape, e.g. a
        parameter) with tensor rank ``rank`` of ``size``'s slice, in place: no second copy of
        what a rank loads."""
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(self.tensor(name, rank, size))

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model as one process holds it."""
        return self.tensors(self.names())

    def optimizer_state_for(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """A state dict for ``optimizer`` over ``model`` (one process): the saved one as it is
        when one process wrote the checkpoint (any optimizer resumes exactly), else one built
        from the named moments (adamw, sgd)."""
        saved = self.torch_optimizer_state()
        if saved is not None:
            return saved
        return self.named_optimizer_state(model, optimizer)

    def named_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0, size: int = 1
    ) -> dict:
        """A state dict for ``optimizer`` built from the named moments (adamw, sgd), each
        parameter of ``model`` getting tensor rank ``rank`` of ``size``'s slice; the tensors read
        become the state as they are (no copy). Parameters outside ``model`` get none."""
        step = self.optimizer_step()
        names = {id(p): n for n, p in model.named_parameters()}
        state = optimizer.state_dict()
        index = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names.get(id(param))
                moments = self.moments(name, rank, size) if name is not None else {}
                if moments:
                    state["state"][index] = {"step": torch.tensor(float(step)), **moments}
                index += 1
        return state

    def trainer_state(self) -> dict:
        """Step, tokens, the RNG of one process and the data-loader position."""
        return torch.load(self.path / STATE_FILE, weights_only=False)

    def rank_rng(self, rank: int) -> dict | None:
        """The RNG that global rank ``rank`` of a multi-process run saved (None: not saved)."""
        file = self.path / rng_file(rank)
        return torch.load(file, weights_only=False) if file.exists() else None
