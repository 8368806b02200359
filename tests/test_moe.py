"""The MoE FFN (`E`): dropless dispatch and capacity mode against per-token references, the
router conventions (Jamba vs Mixtral), the aux and z losses (HF's convention, checked against
HF's own function), and how aux losses leave the model."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

from arch import ModelConfig, build_model, validate_model_config
from arch.aux_losses import active_recorder, recording
from arch.expert_parallel import _expert_major_order
from arch.moe import MoE, load_balancing_loss, router_z_loss
from arch.registry import ConfigError
from arch.tensor_parallel_plan import TensorParallel


def tiny(**moe) -> ModelConfig:
    cfg = ModelConfig(pattern="*E", d_model=16, n_heads=2, vocab_size=100, ffn_hidden=24)
    cfg.moe.num_experts, cfg.moe.top_k = 4, 2
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


# Dispatch against the per-token loop in float64: in fp32 the router's gradient differed by up to
# 2.5e-7 (a 4x margin under the old atol=1e-6), and a near-tie in the top-k could pick another
# expert on other kernels. float64: measured <= 8e-16 over 1/2 threads and default/avx2/avx512
# kernels (MKL_CBWR=COMPATIBLE too); 1e-10 leaves > 10^5 x.
F64_TOL = dict(rtol=0, atol=1e-10)


def naive_moe(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Token by token: softmax, top-k, (renormalise), sum of weighted experts; with a capacity,
    an expert serves only the first `capacity` tokens (in order) that chose it."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # the router's fp32-or-wider
    probs = torch.softmax(x.to(dtype) @ moe.router.weight.to(dtype).T, dim=-1)
    served: dict[int, int] = defaultdict(int)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, experts = probs[t].topk(moe.cfg.top_k)
        if moe.cfg.renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts.tolist(), strict=True):
            if capacity is not None and served[e] >= capacity:
                continue
            served[e] += 1
            out[t] += w * moe.experts[str(e)](x[t : t + 1])[0]
    return out


class _ExpertRank(TensorParallel):
    """One expert-parallel rank of two (only the expert fields matter here)."""

    expert_size, expert_rank = 2, 1


def test_an_expert_parallel_rank_holds_its_block_of_experts_under_dense_names():
    cfg = tiny(num_experts=4, top_k=1)
    moe = MoE(cfg, 1, _ExpertRank())
    assert list(moe.experts) == ["2", "3"]  # names as in the dense model: experts.2, experts.3
    dense = {n for n in MoE(cfg, 1).state_dict() if n.startswith("experts.")}
    assert set(moe.state_dict()) - {"router.weight"} < dense


def test_received_rows_regroup_from_source_major_to_expert_major():
    # From source 0: 1 row for local expert 0, 2 for expert 1; from source 1: 3 for expert 0.
    order = _expert_major_order(torch.tensor([[1, 2], [3, 0]]))
    assert order.tolist() == [0, 3, 4, 5, 1, 2]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_dispatch_equals_the_per_token_loop(renormalize, top_k):
    torch.manual_seed(0)
    moe = MoE(tiny(renormalize=renormalize, top_k=top_k), 1).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = naive_moe(moe, x_ref.view(-1, 16)).view_as(x)
    torch.testing.assert_close(out, ref, **F64_TOL)
    # Gradients too (inputs, router, experts): compare the router's, then the inputs'.
    out.square().sum().backward()
    router_grad = moe.router.weight.grad.clone()
    moe.zero_grad()
    ref.square().sum().backward()
    torch.testing.assert_close(router_grad, moe.router.weight.grad, **F64_TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **F64_TOL)
    if renormalize:  # Mixtral: each token's weights sum to 1
        _, weights, _ = moe.route(x.detach().view(-1, 16))
        torch.testing.assert_close(weights.sum(-1), torch.ones(22, dtype=torch.float64))


@pytest.mark.parametrize("factor", [0.25, 0.6, 1.0, 4.0])
def test_capacity_mode_drops_the_latest_tokens_of_each_full_expert(factor):
    torch.manual_seed(1)
    moe = MoE(tiny(capacity_factor=factor), 1).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    capacity = math.ceil(2 * 20 / 4 * factor)
    assert moe.capacity(20) == capacity
    torch.testing.assert_close(moe(x), naive_moe(moe, x, capacity), **F64_TOL)


def test_capacity_overflow_passes_through_as_zeros_and_is_reported():
    moe = MoE(tiny(top_k=1, capacity_factor=1.0), 1)
    with torch.no_grad():  # every token prefers expert 0
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(8, 16)
    x[:, 0] = 1.0
    with recording() as recorder:
        out = moe(x)
    capacity = 2  # ceil(1 * 8 / 4 * 1.0)
    p0 = torch.softmax(torch.tensor([10.0, 0, 0, 0]), 0)[0]
    torch.testing.assert_close(out[:capacity], p0 * moe.experts["0"](x[:capacity]))
    assert torch.equal(out[capacity:], torch.zeros(6, 16))
    assert recorder.metrics["moe/dropped"].item() == pytest.approx(6 / 8)


def test_aux_loss_is_top_k_when_the_router_is_uniform_and_z_loss_is_log_e_squared():
    cfg = tiny(top_k=2)
    model = build_model(replace(cfg, pattern="*E-E"), seed=0)
    for layer in (model.layers[1], model.layers[3]):
        layer.inner.router.weight.data.zero_()
    metrics: dict[str, torch.Tensor] = {}
    logits, losses = model.forward_with_aux(torch.randint(0, 100, (2, 7)), metrics)
    assert logits.shape == (2, 7, 100)
    assert set(losses) == {"moe/aux_loss", "moe/z_loss"}
    torch.testing.assert_close(metrics["moe/balance"], torch.tensor(2.0))
    torch.testing.assert_close(losses["moe/aux_loss"], torch.tensor(0.01 * 2.0))
    torch.testing.assert_close(losses["moe/z_loss"], torch.tensor(0.001 * math.log(4) ** 2))
    for index in (1, 3):
        assert metrics[f"moe/load/L{index}"].shape == (4,)
        torch.testing.assert_close(metrics[f"moe/load/L{index}"].sum(), torch.tensor(1.0))


def test_aux_loss_matches_hugging_face_and_z_loss_its_formula():
    torch.manual_seed(2)
    logits = torch.randn(50, 6) * 2
    _, experts = torch.softmax(logits, -1).topk(2)
    counts = torch.bincount(experts.flatten(), minlength=6).float()
    ours = load_balancing_loss(logits, counts)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    torch.testing.assert_close(ours, theirs)
    manual = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    torch.testing.assert_close(router_z_loss(logits), manual)


def test_aux_losses_carry_gradient_to_the_router_and_plain_forward_records_nothing():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 100, (2, 9))
    _, losses = model.forward_with_aux(ids)
    sum(losses.values()).backward()
    assert model.layers[1].inner.router.weight.grad.abs().max() > 0
    assert active_recorder() is None
    torch.testing.assert_close(model(ids), model.forward_with_aux(ids)[0])


def test_expert_width_and_router_follow_the_config():
    moe = MoE(tiny(expert_hidden=40, num_experts=3, top_k=1), 1)
    assert len(moe.experts) == 3
    assert moe.experts["0"].w1.weight.shape == (40, 16)
    assert moe.router.weight.shape == (3, 16)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_experts", 0),
        ("top_k", 5),
        ("top_k", 0),
        ("expert_hidden", 0),
        ("capacity_factor", 0.0),
        ("aux_loss_weight", -1.0),
        ("z_loss_weight", -0.1),
    ],
)
def test_bad_moe_settings_name_the_key(key, value):
    cfg = tiny()
    setattr(cfg.moe, key, value)
    with pytest.raises(ConfigError, match=f"model.moe.{key}"):
        validate_model_config(cfg)
