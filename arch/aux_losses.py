"""Auxiliary losses and diagnostics that sub-layers report during a forward pass.

A sub-layer (e.g. the MoE router) cannot return extra values through the residual stream, so it
reports them to the recorder of the enclosing `recording()` block: ``HybridLM.forward_with_aux``
opens one, and a plain ``model(ids)`` (evaluation, generation) records nothing and pays nothing.
Values reported under the same name by several sub-layers are averaged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch


class AuxRecorder:
    """Collects weighted losses (with grad, added to the LM loss) and detached metrics."""

    def __init__(self) -> None:
        self._losses: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self._losses[name].append(value)

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        self._metrics[name].append(value.detach())

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack(v).mean(0) for k, v in self._losses.items()}

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack(v).float().mean(0) for k, v in self._metrics.items()}


_ACTIVE: ContextVar[AuxRecorder | None] = ContextVar("hybridtron_aux_recorder", default=None)


def active_recorder() -> AuxRecorder | None:
    """The recorder sub-layers report to, or None when nobody is listening."""
    return _ACTIVE.get()


@contextmanager
def recording() -> Iterator[AuxRecorder]:
    recorder = AuxRecorder()
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
