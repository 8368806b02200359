"""`hybridtron merge-pc CKPT OUT`: fold PC-layer weights into plain ones (zero inference overhead).

Each PCLinear becomes a Linear whose weight is ``W_eff = gamma * sigma * g(W / sigma)``, computed
in fp32 from the checkpoint's raw weights and stored power-iteration vectors (u, v): exactly what
the trained model multiplies by. The result is a run directory ``OUT`` holding one checkpoint of
the same model with ``model.preconditioner.name=none``; ``hybridtron eval OUT`` and ``generate``
load it like any other. Its optimizer state is a fresh one (no moments: training on from it
restarts the optimizer); step, token counters, RNG, data position and tokenizer are kept
(`launch.export.write_run_dir`, shared with `hybridtron export`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from arch import build_model
from arch.config import PreconditionerConfig
from arch.pc_layer import PCLinear, merge_pc
from arch.registry import UserError
from launch.export import check_new_out, write_run_dir
from trainer import checkpoint as ckpt
from trainer.optim import build_optimizer


def merge_pc_checkpoint(source: str, out: str) -> Path:
    """Write the merged checkpoint of ``source`` under run directory ``out``; returns its path."""
    check_new_out(out)
    model, cfg, checkpoint = ckpt.load_model(source)
    if not any(isinstance(m, PCLinear) for m in model.modules()):
        raise UserError(
            f"checkpoint {checkpoint.path} has no PC layers (model.preconditioner.name="
            f"{cfg.model.preconditioner.name!r}); there is nothing to merge"
        )
    model.float()
    merge_pc(model)
    state = model.state_dict()

    cfg.model.preconditioner = PreconditionerConfig(name="none", options={})
    with torch.device("meta"):
        plain = build_model(cfg.model)
    expected = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:  # a PC target the plain model builds differently: never write half a model
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise UserError(f"merged weights do not fit the plain model (first differences: {diff})")
    optimizer = build_optimizer(plain, cfg.optim)
    names = ckpt.optimizer_param_names(plain, optimizer)
    return write_run_dir(out, cfg, checkpoint, state, optimizer.state_dict(), names)
