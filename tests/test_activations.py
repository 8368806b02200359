"""FFN activations (`model.ffn_activation`): the MLP against hand-written formulas, the
exactly-zero fraction each FFN reports while recording, MoE experts, config errors, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from arch import ModelConfig, build_model, validate_model_config
from arch.mlp import MLP
from arch.registry import ConfigError
from trainer import Trainer

FORMULAS = {
    "gelu": lambda m, x: F.gelu(x @ m.w1.weight.T) @ m.w2.weight.T,
    "relu": lambda m, x: torch.relu(x @ m.w1.weight.T) @ m.w2.weight.T,
    "relu2": lambda m, x: torch.relu(x @ m.w1.weight.T).square() @ m.w2.weight.T,
    "swiglu": lambda m, x: (F.silu(x @ m.w1.weight.T) * (x @ m.w3.weight.T)) @ m.w2.weight.T,
}


def tiny(**overrides) -> ModelConfig:
    base = dict(pattern="*-*-", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=60)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("activation", sorted(FORMULAS))
def test_mlp_matches_its_formula(activation):
    torch.manual_seed(0)
    mlp = MLP(tiny(ffn_activation=activation), 0)
    assert (mlp.w3 is not None) == (activation == "swiglu")  # plain MLPs have two matrices
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(mlp(x), FORMULAS[activation](mlp, x))


def zero_fractions(cfg: ModelConfig) -> dict[str, float]:
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    metrics: dict[str, torch.Tensor] = {}
    model.forward_with_aux(ids, metrics)
    return {k: v.item() for k, v in metrics.items() if k.startswith("ffn/zero_fraction/")}


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_relu_family_reports_a_zero_fraction_per_layer(activation):
    fractions = zero_fractions(tiny(ffn_activation=activation))
    assert sorted(fractions) == ["ffn/zero_fraction/L1", "ffn/zero_fraction/L3"]
    assert all(0.2 < f < 0.8 for f in fractions.values()), fractions  # ~half at init


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_smooth_activations_report_about_no_zeros(activation):
    fractions = zero_fractions(tiny(ffn_activation=activation))
    assert len(fractions) == 2 and all(f < 1e-3 for f in fractions.values()), fractions


def test_moe_experts_use_the_activation_and_report():
    cfg = tiny(pattern="*E", ffn_activation="relu2")
    cfg.moe.num_experts, cfg.moe.top_k = 4, 2
    model = build_model(cfg, seed=0)
    assert all(e.w3 is None for e in model.layers[1].inner.experts.values())
    fractions = zero_fractions(cfg)
    assert list(fractions) == ["ffn/zero_fraction/L1"] and 0 < fractions["ffn/zero_fraction/L1"] < 1


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        validate_model_config(tiny(ffn_activation="tanh"))
    assert err.value.key == "model.ffn_activation"


def test_relu2_model_trains_and_logs_the_zero_fraction(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path / "run", tiny_data, max_steps=3)
    cfg.model.ffn_activation = "relu2"
    result = Trainer(cfg).fit()
    assert result.step == 3 and torch.isfinite(torch.tensor(list(result.losses.values()))).all()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [line for line in lines if "ffn/zero_fraction/L1" in line]
    assert logged, "the zero fraction is not in metrics.jsonl"
