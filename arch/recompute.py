"""Activation recomputation (`parallel.recompute`): a second forward in the backward instead of
keeping activations from the forward to the backward.

- ``none``: autograd keeps whatever each op's backward needs.
- ``full``: every sub-layer (pre-norm, mixer or FFN, residual update; any plugin) runs under a
  non-reentrant `torch.utils.checkpoint`: only its input state is kept, and the whole sub-layer
  runs again when the backward reaches it: one more forward per step.
- ``selective``: only the parts plugins declare memory-heavy run again: the built-ins' attention
  kernel, Mamba-1 conv, x_proj and scan (the `cpu` scan's [L, B, D, N] states), Mamba-2 SSD and
  MoE experts; everything else is kept.

jamba_tiny at seq 2048 on CPU: ``full`` 6.8x less peak activation memory for 1.37x the fwd+bwd
time, ``selective`` 2x for 1.29x (benchmarks/RESULTS.md).

Plugin protocol (`selective`): a mixer or FFN wraps each memory-heavy part of its forward as
``recompute_region(fn, *args)``, a pure function of its arguments that returns tensors, and may
set the class attribute ``selective_recompute = "what"`` (`hybridtron registry list` prints it).
Outside a ``selective`` sub-layer, or without grad, the region is just ``fn(*args)``; a plugin
with no region keeps all its activations under ``selective`` and is still recomputed by ``full``.

Why the results do not change (tested bit for bit in fp32, every built-in and layout):
- the backward runs on the original graph; only the saved tensors are recomputed, by the same
  ops on the same inputs (non-reentrant checkpoint), with the RNG state and autocast of the
  first forward replayed;
- auxiliary losses and metrics (`arch.aux_losses`) are reported by the first forward only: the
  recomputation computes them again (same ops, same saved tensors) but throws them away;
- tensor-parallel collectives inside a sub-layer run again in the backward, in the same order
  on every rank of the group (each rank recomputes the same sub-layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from arch.aux_losses import active_recorder, discarding
from arch.registry import ConfigError

MODES = ("none", "selective", "full")

T = TypeVar("T")

# True while a sub-layer runs under `selective`: its plugins' regions are then checkpointed.
_SELECTIVE: ContextVar[bool] = ContextVar("hybridtron_selective_recompute", default=False)


def check_mode(mode: str) -> None:
    """ConfigError unless ``mode`` is one of `MODES`."""
    if mode not in MODES:
        raise ConfigError("parallel.recompute", f"must be one of {', '.join(MODES)}; got {mode!r}")


def set_recompute(model: nn.Module, mode: str) -> None:
    """Run every sub-layer of ``model`` (a HybridLM or any module holding its sub-layers, e.g. a
    pipeline stage) under recomputation ``mode``; the TrainModules call it after the build."""
    from arch.model import SubLayer  # arch.model imports this module

    check_mode(mode)
    for module in model.modules():
        if isinstance(module, SubLayer):
            module.recompute = mode


@contextlib.contextmanager
def _selective(on: bool) -> Iterator[None]:
    token = _SELECTIVE.set(on)
    try:
        yield
    finally:
        _SELECTIVE.reset(token)


class _Replaying(contextlib.AbstractContextManager):
    """Around each recomputation of one checkpointed forward (every backward through it
    recomputes, so this is entered once per backward): auxiliary-loss reports are thrown away
    (the first forward made them; ``recorded``: it had a recorder, so the same ops run again
    and save the same tensors, which checkpoint checks), and no region nests."""

    def __init__(self, recorded: bool) -> None:
        self.recorded = recorded
        self._open: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(discarding(self.recorded))
        stack.enter_context(_selective(False))
        self._open.append(stack)

    def __exit__(self, *exc: object) -> bool | None:
        return self._open.pop().__exit__(*exc)


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # Called as the checkpointed forward starts: whether it records decides how to replay it.
    return contextlib.nullcontext(), _Replaying(active_recorder() is not None)


def _checkpointed(fn: Callable[..., T], *args: Any) -> T:
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def run_sublayer(mode: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, one sub-layer's forward, under recomputation ``mode``."""
    if mode == "full" and torch.is_grad_enabled():
        with _selective(False):  # the whole sub-layer is recomputed: no region inside
            return _checkpointed(fn, *args)
    with _selective(mode == "selective"):
        return fn(*args)


def recompute_region(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; inside a sub-layer under ``selective`` (with grad), its activations are
    not kept for the backward but recomputed there. ``fn`` must depend only on ``args`` and the
    module's parameters (no state it changes), so that running it again gives the same values."""
    if not (_SELECTIVE.get() and torch.is_grad_enabled()):
        return fn(*args)
    return _checkpointed(fn, *args)


def recompute_note(kind: str, plugin: object) -> str:
    """What `registry list` adds to a mixer's or FFN's line: what ``selective`` recomputes
    (nothing added for a plugin that declares no region)."""
    what = getattr(plugin, "selective_recompute", None)
    if kind not in ("mixer", "ffn") or not what:
        return ""
    return f"  [selective recompute: {what}]"
