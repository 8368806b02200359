"""Weight preconditioners (registry `preconditioner`): how a projection's weight is parameterised.

Every projection in the model is made by the parallel context's ``linear``
(`arch.tensor_parallel_plan.TensorParallel.linear`), so a preconditioner plugin (e.g. the PC
layer) reaches all of them without the mixers knowing. A plugin is
``fn(linear, cfg: PreconditionerConfig, role: str, *, tp, split) -> nn.Module``: ``linear`` is
the bias-free projection in its local form (this rank's shard under tensor parallelism, split as
``split`` says), ``role`` the projection's name inside its sub-layer (wq, wk, wv, wo, w1, w2, w3,
...) so a plugin can target some, ``tp`` the parallel context. A plugin that can run at tp > 1
sets ``tensor_parallel_plan`` (its own state's splits; see `arch.pc_layer`).
"""

from __future__ import annotations

from torch import nn

from arch.config import PreconditionerConfig
from arch.layers_registry import PRECONDITIONERS
from arch.tensor_parallel_plan import REPLICATED, Split, TensorParallel


@PRECONDITIONERS.register("none")
def no_preconditioner(
    linear: nn.Module, cfg: PreconditionerConfig, role: str, *, tp: TensorParallel, split: Split
) -> nn.Module:
    """Plain weights: the projection is used as it is."""
    return linear


no_preconditioner.option_defaults = {}  # type: ignore[attr-defined]  (takes no options)
no_preconditioner.tensor_parallel_plan = lambda cfg: REPLICATED  # type: ignore[attr-defined]
