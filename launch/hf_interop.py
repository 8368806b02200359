"""`hybridtron import-hf HF_DIR OUT` and `hybridtron export-hf CKPT OUT` (mapping: arch.hf).

import-hf writes a run directory ``OUT`` (config.yaml + checkpoints/step_00000000) whose model
section expresses the HF architecture; the optimizer state is a fresh one (no moments) and the
trainer state holds step 0. A ``tokenizer.json`` next to the HF weights travels with the
checkpoint (``data.tokenizer=hf``), so ``hybridtron generate OUT`` works.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from arch import build_model
from arch.hf import export_hf_dir, import_hf_dir, read_hf_config
from arch.registry import UserError
from trainer import checkpoint as ckpt
from trainer.config import RunConfig
from trainer.loop import config_yaml
from trainer.optim import build_optimizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def import_hf(hf_dir: str, out: str) -> Path:
    """Write the hybridtron checkpoint of the HF model in ``hf_dir`` under run directory ``out``."""
    source, out_dir = Path(hf_dir), Path(out)
    if not source.is_dir():
        raise UserError(f"{hf_dir} is not a directory (give a local Hugging Face model directory)")
    if ckpt.list_checkpoints(out_dir / "checkpoints"):
        raise UserError(f"{out_dir} already holds checkpoints; give a new output directory")
    model_cfg, state = import_hf_dir(source)
    cfg = RunConfig(model=model_cfg)
    cfg.trainer.run_dir = str(out_dir)
    tokenizer = [source / name for name in TOKENIZER_FILES if (source / name).exists()]
    if tokenizer and tokenizer[0].name == "tokenizer.json":
        cfg.data.tokenizer = "hf"
        cfg.data.tokenizer_path = str(source)
    with torch.device("meta"):
        model = build_model(cfg.model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:  # never write a checkpoint that does not load
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise UserError(f"converted weights do not fit the model (first differences: {diff})")
    optimizer = build_optimizer(model, cfg.optim)
    names = ckpt.optimizer_param_names(model, optimizer)
    hf = read_hf_config(source)
    trainer_state = {"step": 0, "tokens": 0, "imported_from": str(source), "hf_config": hf}

    def write_extra(directory: Path) -> None:
        for file in tokenizer:
            shutil.copy(file, directory / file.name)

    out_dir.mkdir(parents=True, exist_ok=True)
    yaml = config_yaml(cfg)
    (out_dir / "config.yaml").write_text(yaml)
    return ckpt.save_checkpoint(
        out_dir / "checkpoints",
        0,
        state,
        optimizer.state_dict(),
        names,
        trainer_state,
        yaml,
        write_extra,
    )


def export_hf(checkpoint_path: str, out: str) -> Path:
    """Write config.json + model.safetensors of the checkpoint as its Hugging Face family."""
    model, cfg, checkpoint = ckpt.load_model(checkpoint_path)
    out_dir = export_hf_dir(cfg.model, model.state_dict(), out)
    for name in TOKENIZER_FILES:
        if (checkpoint.path / name).exists():
            shutil.copy(checkpoint.path / name, out_dir / name)
    return out_dir
