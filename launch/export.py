"""`hybridtron export CKPT OUT`: any checkpoint -> a one-process run directory of the same model.

The checkpoint (a run directory or a checkpoint directory, written by one process or as
tp x pp x dp shards) is read with the checkpoint reader, so any plugin's model exports, including
out-of-tree mixers that have no Hugging Face family (export-hf refuses those). ``OUT`` gets
config.yaml (trainer.run_dir=OUT) and ``checkpoints/step_N`` holding the dense weights (with the
persistent buffers), the optimizer moments as the one-process torch optimizer's state, the
trainer state (step, tokens, RNG, data position) and the tokenizer: ``hybridtron eval OUT``,
``generate OUT``, ``trainer.resume_from=OUT`` and ``load_pretrained(OUT)`` take it.

`write_run_dir` is the one way to write such a run directory; merge-pc uses it too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arch.registry import UserError
from data_pipeline.tokenizers import load_tokenizer
from trainer import checkpoint as ckpt
from trainer.config import RunConfig
from trainer.loop import config_yaml
from trainer.optim import build_optimizer


def check_new_out(out: str | Path) -> Path:
    """``out`` as a Path; a one-line UserError when it already holds checkpoints or files."""
    out_dir = Path(out)
    if ckpt.list_checkpoints(out_dir / "checkpoints"):
        raise UserError(f"{out_dir} already holds checkpoints; give a new output directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} is not an empty directory; give a new output directory")
    return out_dir


def write_run_dir(
    out: str | Path,
    cfg: RunConfig,
    checkpoint: ckpt.Checkpoint,
    state: dict[str, torch.Tensor],
    optimizer_state: dict,
    param_names: list[str],
    trainer_state: dict | None = None,
) -> Path:
    """Write run directory ``out``: config.yaml (``cfg`` with trainer.run_dir=out) and one
        one-process checkpoint at ``checkpoint``'s step holding ``state``, ``optimizer_state`` (its
    parameters named by ``param_names``, `trainer.checkpoint.optimizer_param_names`), the
        trainer state (``checkpoint``'s unless given) and ``checkpoint``'s tokenizer, saved the way
        the trainer saves it into every checkpoint. Returns the checkpoint's directory."""
    out_dir = check_new_out(out)
    if trainer_state is None:
        trainer_state = ckpt.CheckpointReader(checkpoint).trainer_state()
    tokenizer = load_tokenizer(cfg.data.tokenizer, str(checkpoint.path))  # saved with the weights
    cfg.trainer.run_dir = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml = config_yaml(cfg)
    (out_dir / ckpt.CONFIG_FILE).write_text(yaml)
    return ckpt.save_checkpoint(
        out_dir / "checkpoints",
        checkpoint.step,
        state,
        optimizer_state,
        param_names,
        trainer_state,
        yaml,
        tokenizer.save,
    )


def export_checkpoint(source: str, out: str) -> Path:
    """Write the one-process checkpoint of ``source`` under run directory ``out``; returns it."""
    check_new_out(out)  # before reading anything
    model, cfg, checkpoint = ckpt.load_model(source)  # strict: the weights fit the model
    # load_model keeps the parameter marks (_no_weight_decay) that decide the optimizer's
    # groups, by which the reader names the saved moments.
    optimizer = build_optimizer(model, cfg.optim)
    optimizer_state = ckpt.CheckpointReader(checkpoint).optimizer_state_for(model, optimizer)
    names = ckpt.optimizer_param_names(model, optimizer)
    return write_run_dir(out, cfg, checkpoint, model.state_dict(), optimizer_state, names)
