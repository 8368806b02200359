"""Dtype helpers for the parts of the model that must not run in reduced precision.

Routing, scans, softmaxes and the loss compute in fp32 under bf16 autocast; a float64 model
(the reference for numerically chaotic comparisons, e.g. the `ortho` residual in the layout
tests) must keep float64 there, so these upcast to *at least* fp32 and never down.
"""

from __future__ import annotations

import torch


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
