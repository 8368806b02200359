"""Auxiliary losses and diagnostics that sub-layers report during a forward pass.

A sub-layer (e.g. the MoE router) cannot return extra values through the residual stream, so it
reports them to the recorder of the enclosing `recording()` block: ``HybridLM.forward_with_aux``
opens one, and a plain ``model(ids)`` (evaluation, generation) records nothing and pays nothing.

A value reported under one name by several sub-layers is averaged over *the whole model's*
reports of it. One process sees them all. A pipeline stage sees only its own: it divides its sum
by the model's count (``loss_counts``, declared by the plugins: `arch.model.aux_loss_counts`), so
the stages' shares add up to the one-process mean wherever the model is cut; metrics keep their
(sum, count) so stages and data-parallel ranks merge them the same way (`merge_totals`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch

Totals = dict[str, tuple[torch.Tensor, int]]


class AuxRecorder:
    """Collects weighted losses (with grad, added to the LM loss) and detached metrics.

    ``loss_counts``: how many reports of each loss one forward of the whole model makes, and
    ``expected``: how many of them this recorder should see (a stage's share). Without them a
    loss is the mean of the reports seen here (right when they are all seen here).
    """

    def __init__(
        self,
        loss_counts: Mapping[str, int] | None = None,
        expected: Mapping[str, int] | None = None,
    ) -> None:
        self.loss_counts = loss_counts
        self.expected = expected
        self._losses: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self._losses[name].append(value)

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        self._metrics[name].append(value.detach())

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        if self.loss_counts is None:
            return {k: torch.stack(v).mean(0) for k, v in self._losses.items()}
        return {
            k: torch.stack(v).sum(0) / self._model_count(k, len(v)) for k, v in self._losses.items()
        }

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack(v).float().mean(0) for k, v in self._metrics.items()}

    def totals(self) -> Totals:
        """(detached sum, number of reports) of every metric and loss seen here."""
        out = {k: (torch.stack(v).float().sum(0), len(v)) for k, v in self._metrics.items()}
        for k, v in self._losses.items():
            out[k] = (torch.stack(v).detach().float().sum(0), len(v))
        return out

    def _model_count(self, name: str, seen: int) -> int:
        count = self.loss_counts.get(name) if self.loss_counts else None
        want = self.expected.get(name, 0) if self.expected is not None else seen
        if count is None or seen != want:
            raise RuntimeError(
                f"auxiliary loss {name!r} was reported {seen} times by this part of the model, "
                f"but its plugins declare {want}: a plugin that reports a loss must list it in "
                "its aux_loss_names(cfg), and a residual plugin that evaluates its sub-layer "
                "more than once must set oracle_calls (see arch.aux_losses)"
            )
        return count


def add_totals(into: Totals, more: Totals) -> None:
    """Accumulate ``more`` into ``into`` (sums and counts), e.g. over micro-batches."""
    for name, (total, count) in more.items():
        if name in into:
            old, n = into[name]
            into[name] = (old + total, n + count)
        else:
            into[name] = (total, count)


def merge_totals(parts: list[dict[str, tuple[float | list[float], int]]]) -> dict[str, float]:
    """Means over every report in ``parts`` (e.g. pipeline stages x data-parallel ranks, each
    ``{name: (sum.tolist(), count)}``) as floats; a vector metric v becomes key/0, key/1, ..."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for part in parts:
        for name, (values, count) in part.items():
            value = torch.tensor(values, dtype=torch.float64)
            sums[name] = sums[name] + value if name in sums else value
            counts[name] = counts.get(name, 0) + count
    out: dict[str, float] = {}
    for name, total in sums.items():
        mean = total / counts[name]
        if mean.ndim == 0:
            out[name] = mean.item()
        else:
            out.update({f"{name}/{i}": v for i, v in enumerate(mean.tolist())})
    return out


_ACTIVE: ContextVar[AuxRecorder | None] = ContextVar("hybridtron_aux_recorder", default=None)


def active_recorder() -> AuxRecorder | None:
    """The recorder sub-layers report to, or None when nobody is listening."""
    return _ACTIVE.get()


@contextmanager
def recording(
    loss_counts: Mapping[str, int] | None = None, expected: Mapping[str, int] | None = None
) -> Iterator[AuxRecorder]:
    recorder = AuxRecorder(loss_counts, expected)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


@contextmanager
def discarding(recorded: bool) -> Iterator[None]:
    """Reports made inside are thrown away (e.g. a recomputed forward, `arch.recompute`): they
    go to a throwaway recorder if ``recorded`` (the forward being replayed had one, so the same
    ops run again), else nowhere."""
    token = _ACTIVE.set(AuxRecorder() if recorded else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
