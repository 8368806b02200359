"""The mixture-of-experts FFN (`E`): softmax router, top-k, SwiGLU experts (`model.moe`).

Routing (in fp32, as Jamba and Mixtral do): p = softmax(router(x)); the k largest p pick the
experts and weight their outputs. Jamba keeps those weights as they are (they sum to < 1);
Mixtral divides them by their sum (`renormalize=true`).

Dispatch is *dropless* by default: the (token, expert) assignments are sorted by expert and each
expert runs once on its contiguous slice (a grouped matmul written as a loop), so no token is
padded or dropped. With `capacity_factor` set, expert e takes at most
C = ceil(top_k * tokens / num_experts * capacity_factor) assignments; the policy is *earliest
first*: an expert keeps the assignments of the first C tokens, in micro-batch order (batch-major),
that chose it, and drops the rest. A dropped assignment contributes zero, so a token whose every
choice was dropped gets a zero FFN output and is carried by the residual stream alone.

Auxiliary losses (reported to `arch.aux_losses`, so only `HybridLM.forward_with_aux` pays for
them), averaged over the MoE sub-layers, then weighted:
- `moe/aux_loss`: load balancing in Hugging Face's convention, E * sum_e f_e * P_e, with f_e the
  fraction of tokens whose top-k includes e (the f_e sum to top_k, counted before any capacity
  drop) and P_e the mean router probability of e. Perfectly balanced routing gives **top_k**
  (Megatron divides f by top_k, so its balanced value is 1). HF pools f and P over all layers
  before the product; with one MoE layer the two agree exactly. Weight `aux_loss_weight`.
- `moe/z_loss`: the router z-loss (ST-MoE), mean over tokens of logsumexp(logits)^2. Weight
  `z_loss_weight`.
Diagnostics: `moe/balance` (the unweighted aux loss), `moe/load/L{i}` (each expert's share of
the top-k assignments of sub-layer i, summing to 1; balanced = 1/E) and, with a capacity,
`moe/dropped` (share of assignments dropped). Each expert is an `arch.mlp.MLP` with
`model.ffn_activation`, so experts also report `ffn/zero_fraction/L{i}` (averaged over experts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arch.aux_losses import AuxRecorder, active_recorder
from arch.config import ModelConfig
from arch.expert_parallel import run_experts
from arch.layers_registry import FFNS
from arch.mlp import MLP, MLP_SPLITS
from arch.numerics import fp32_or_wider
from arch.recompute import recompute_region
from arch.tensor_parallel_plan import DENSE, TensorParallel, TensorParallelPlan


def expert_hidden(cfg: ModelConfig) -> int:
    """Each expert's hidden width (model.moe.expert_hidden, default model.ffn_hidden_size)."""
    return cfg.ffn_hidden_size if cfg.moe.expert_hidden is None else cfg.moe.expert_hidden


@FFNS.register("moe")
class MoE(nn.Module):
    """Top-k mixture of MLP experts, softmax router, dropless or capacity (model.moe)."""

    selective_recompute = "expert activations"
    # Each expert initialises from its own RNG stream (`arch.seeded_init`): an expert's values
    # depend on its name alone, so a rank can initialise only the experts it holds.
    seed_scopes = ("experts.*",)

    def __init__(self, cfg: ModelConfig, layer_index: int, tp: TensorParallel = DENSE) -> None:
        super().__init__()
        m = cfg.moe
        self.cfg = m
        self.layer_index = layer_index
        hidden = expert_hidden(cfg)
        # A plain Linear: routing is computed in fp32 from the raw weight, never preconditioned.
        self.router = nn.Linear(cfg.d_model, m.num_experts, bias=False)
        # Under their global indices: an expert-parallel rank holds a block of them.
        self.tp = tp
        self.experts = nn.ModuleDict(
            {str(e): MLP(cfg, layer_index, tp, hidden) for e in tp.local_experts(m.num_experts)}
        )

    @classmethod
    def tensor_parallel_plan(cls, cfg: ModelConfig) -> TensorParallelPlan:
        """Every expert an MLP split the same way; the router replicated (each expert's output
        is reduced before the router weight multiplies it, so the router's gradient is exact)."""
        return TensorParallelPlan(
            splits={f"experts.*.{name}": split for name, split in MLP_SPLITS.items()},
            divisible={"model.moe.expert_hidden": expert_hidden(cfg)},
            collectives="all-reduce of each expert's w2 output (and of its input's gradient); "
            "expert parallel: all-to-all of the routed tokens and of the outputs",
            experts="experts",
            num_experts=cfg.moe.num_experts,
        )

    @classmethod
    def aux_loss_names(cls, cfg: ModelConfig) -> tuple[str, ...]:
        """The losses one forward reports: the model averages each over all its MoE sub-layers
        wherever they sit (pipeline stages included; see `arch.aux_losses`)."""
        m = cfg.moe
        weighted = (("moe/aux_loss", m.aux_loss_weight), ("moe/z_loss", m.z_loss_weight))
        return tuple(name for name, weight in weighted if weight)

    @property
    def supports_cache(self) -> bool:
        """Dropless routing is per token, so cached decoding reuses ``forward``; with a capacity
        a token's output depends on the other tokens of the batch (not cacheable)."""
        return self.cfg.capacity_factor is None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E], top-k weights [T, k], top-k expert ids [T, k]), all fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(fp32_or_wider(x), fp32_or_wider(self.router.weight))
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, experts

    def capacity(self, num_tokens: int) -> int | None:
        if self.cfg.capacity_factor is None:
            return None
        m = self.cfg
        return math.ceil(m.top_k * num_tokens / m.num_experts * m.capacity_factor)

    def dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_k w_k expert_k(x) for x [T, d]; also returns the kept assignments per expert."""
        k = experts.shape[1]
        flat = experts.flatten()  # assignment a = token * k + slot
        order = torch.argsort(flat, stable=True)  # by expert; token order kept within one
        counts = torch.bincount(flat, minlength=self.cfg.num_experts)
        cap = self.capacity(x.shape[0])
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(len(order), device=x.device) - starts[flat[order]]
            order = order[rank < cap]  # earliest tokens first (see the module docstring)
            counts = counts.clamp(max=cap)
        token = order // k

        def experts_out(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
            return run_experts(x[token], counts, self.experts, self.tp)

        # Under recompute=selective the experts' activations are recomputed in the backward.
        y = recompute_region(experts_out, x, token) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype)), counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, experts = self.route(flat)
        out, kept = self.dispatch(flat, weights, experts)
        recorder = active_recorder()
        if recorder is not None:
            self.record(recorder, logits, experts, kept)
        return out.view_as(x)

    def record(
        self,
        recorder: AuxRecorder,
        logits: torch.Tensor,
        experts: torch.Tensor,
        kept: torch.Tensor,
    ) -> None:
        """Report the balance and z losses and the expert loads (see the module docstring)."""
        m, tokens = self.cfg, logits.shape[0]
        counts = torch.bincount(experts.flatten(), minlength=m.num_experts).float()
        balance = load_balancing_loss(logits, counts)
        z = router_z_loss(logits)
        if m.aux_loss_weight:
            recorder.add_loss("moe/aux_loss", m.aux_loss_weight * balance)
        if m.z_loss_weight:
            recorder.add_loss("moe/z_loss", m.z_loss_weight * z)
        recorder.add_metric("moe/balance", balance)
        recorder.add_metric(f"moe/load/L{self.layer_index}", counts / (tokens * m.top_k))
        if m.capacity_factor is not None:
            recorder.add_metric("moe/dropped", 1 - kept.sum() / (tokens * m.top_k))


def load_balancing_loss(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e with f_e = counts_e / T (top-k assignments) and P_e = mean softmax.

    Hugging Face's convention: the balanced value is top_k. Gradient flows through P only.
    """
    num_tokens, num_experts = logits.shape
    mean_prob = torch.softmax(fp32_or_wider(logits), dim=-1).mean(0)
    return num_experts * (counts / num_tokens * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(fp32_or_wider(logits), dim=-1).square().mean()
