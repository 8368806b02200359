"""`hybridtron checkpoint convert CKPT --to safetensors|torch|hf OUT`: a checkpoint of any layout
(one process or tp x pp x dp x ep shards) as one model, read without its optimizer state.

- ``safetensors``: OUT is one file of the dense weights (and persistent buffers) under their
  hybridtron names, with the model config (JSON) and the step in its metadata;
- ``torch``: OUT is one ``torch.save`` file, ``{"model": state_dict, "model_config": dict,
  "step": int}``;
- ``hf``: OUT is a Hugging Face directory (`launch.hf_interop.export_hf`: Llama, Mixtral, Jamba).

Only the weights are read (`CheckpointReader.model_state`: the weight boxes of format 2, the
weight files of format 1), so no GPU, no process group and no memory for the moments are
needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from arch.registry import UserError
from trainer import checkpoint as ckpt

FORMATS = ("safetensors", "torch", "hf")


def convert_checkpoint(checkpoint: str | Path, to: str, out: str | Path) -> Path:
    """Write checkpoint ``checkpoint`` (a checkpoint or run directory) as format ``to`` at
    ``out``; returns ``out``."""
    if to not in FORMATS:
        raise UserError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if to == "hf":
        from launch.hf_interop import export_hf

        return export_hf(checkpoint, out)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; give a new output file")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a directory; create it or give another OUT")
    found = ckpt.resolve_checkpoint(checkpoint)
    weights = {k: v.contiguous() for k, v in ckpt.CheckpointReader(found).model_state().items()}
    config = OmegaConf.to_container(OmegaConf.structured(found.model_config()))
    if to == "safetensors":
        metadata = {"hybridtron_model_config": json.dumps(config), "step": str(found.step)}
        save_file(weights, out, metadata=metadata)
    else:
        torch.save({"model": weights, "model_config": config, "step": found.step}, out)
    return out
