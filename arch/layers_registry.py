"""The model's plugin registries: what each kind of plugin is and what it must provide.

- ``mixer``: token mixer of a pattern sub-layer (``*`` attention, ``M`` mamba, ...). A class
  ``cls(cfg: ModelConfig, layer_index: int) -> nn.Module`` with ``forward(x) -> y``, x, y [B, T, D].
  One that declares ``tensor_parallel_plan(cfg)`` is built as ``cls(cfg, layer_index, tp)``
  in its local form (see ``arch.tensor_parallel_plan``); one without runs at tp = 1 only.
  Under ``parallel.recompute=selective`` the parts it wraps in ``arch.recompute.recompute_region``
  are recomputed in the backward (its ``selective_recompute`` attribute says which).
- ``ffn``: channel mixer of a pattern sub-layer (``-`` mlp, ``E`` moe, ...); same signature.
- ``attention``: an attention kernel ``fn(q, k, v, cfg: AttentionConfig) -> out`` on
  [B, heads, T, head_dim] tensors, k/v possibly with fewer (grouped) heads; causal.
- ``residual``: a ``ResidualUpdate`` subclass (see ``arch.residual``): how a sub-layer's output
  updates the residual-stream state.
- ``activation``: an ``arch.mlp.Activation(fn, gated)`` used by the MLP and the MoE experts
  (``model.ffn_activation``); gated ones multiply ``fn(w1 x)`` by ``w3 x``.
- ``preconditioner``: ``fn(linear, cfg: PreconditionerConfig, role, *, tp, split) -> nn.Module``,
  a weight re-parameterisation wrapped around a projection (see ``arch.preconditioner``).
"""

from __future__ import annotations

from arch.registry import Registry

MIXERS: Registry = Registry("mixer", "token mixers for pattern symbols (attention, mamba, ...)")
FFNS: Registry = Registry("ffn", "channel mixers for pattern symbols (mlp, moe, ...)")
ATTENTION: Registry = Registry("attention", "attention kernels used by the attention mixer")
RESIDUALS: Registry = Registry("residual", "residual-stream updates (plain, heavy_ball, tmm, ...)")
PRECONDITIONERS: Registry = Registry("preconditioner", "weight re-parameterisations (none, pc)")
ACTIVATIONS: Registry = Registry("activation", "FFN activations (swiglu, gelu, relu, relu2)")
