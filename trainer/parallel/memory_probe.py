"""Exact activation bytes held between a forward and its backward, on one CPU process.

`StorageTracker` (a TorchDispatchMode) keeps a weak reference to the storage of every tensor an
op creates inside it; the bytes of those still alive when the forward ends are everything the
backward will read (tensors autograd saved, the inputs a checkpoint keeps by reference, the
logits), never the parameters, each storage once. `saved_tensors_hooks` alone would miss the
inputs a non-reentrant checkpoint keeps by reference, which are most of what ``full`` keeps.

Used by `benchmarks/bench_recompute.py` and `tests/test_memory_model.py` (the reference the
activation model of `trainer.parallel.memory_model` is checked against).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StorageTracker(TorchDispatchMode):
    """Weak references to the storage of every CPU tensor the ops inside create."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        # Views of tensors made before (a parameter's .T) share their storage: not activations.
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.existing:
                    self.storages.setdefault(ref.cdata, (ref, storage.nbytes()))
        return out

    def alive_bytes(self) -> int:
        """Bytes of the tracked storages still alive now."""
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A module's parameters, buffers and gradients: what a tracker must not count."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return [*module.parameters(), *module.buffers(), *grads]
