"""Mamba-2 (`S`): the chunked SSD equals its sequential recurrence (values and gradients, with and
without state resets), the mixer is causal, keeps packed documents apart, and a model trains."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_packed_equals_documents_alone, tiny_config

from arch import ModelConfig, build_model, validate_model_config
from arch.config import Mamba2Config
from arch.mamba2 import Mamba2, ssd_chunked, ssd_sequential
from arch.registry import ConfigError
from trainer import Trainer

EOS = 0


def ssd_inputs(
    length: int, seed: int = 0, b: int = 2, h: int = 4, p: int = 3, g: int = 2, n: int = 5
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen)
    dt = torch.rand(b, length, h, generator=gen) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen) - 0.5
    B = torch.randn(b, length, g, n, generator=gen)
    C = torch.randn(b, length, g, n, generator=gen)
    return x, dt, A, B, C


@pytest.mark.parametrize("length,chunk", [(37, 8), (16, 8), (5, 16), (1, 4)])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_ssd_equals_the_recurrence_with_gradients(length, chunk, with_resets):
    # float64: the chunked and sequential forms sum in different orders; in fp32 the gradients
    # differed by up to 4.4e-6 (a 3.7x margin under rtol=atol=1e-5). float64: measured <= 1.1e-14
    # over 1/2 threads and default/avx2/avx512 kernels (MKL_CBWR too); 1e-10 leaves > 10^4 x.
    inputs = [t.double() for t in ssd_inputs(length)]
    reset = None
    if with_resets:
        reset = torch.zeros(2, length, dtype=torch.bool)
        reset[0, length // 3] = reset[1, length // 2] = reset[1, length - 1] = True
    weight = torch.linspace(-1, 1, 2 * length * 4 * 3, dtype=torch.float64).view(2, length, 4, 3)
    outs, grads = [], []
    for fn in (
        lambda *a: ssd_chunked(*a, chunk, reset=reset),
        lambda *a: ssd_sequential(*a, reset=reset),
    ):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        (y * weight).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)
    for name, a, b in zip("x dt A B C".split(), *grads, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)


def test_reset_equals_running_the_segments_alone():
    # float64 (fp32 used 1/9 of atol=1e-6): measured <= 8.9e-16 on every setting; 1e-10 leaves
    # 10^5 x.
    x, dt, A, B, C = (t.double() for t in ssd_inputs(20, b=1))
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 7] = True
    together = ssd_chunked(x, dt, A, B, C, 4, reset=reset)
    first = ssd_chunked(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7], 4)
    second = ssd_chunked(x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], 4)
    torch.testing.assert_close(together, torch.cat([first, second], 1), atol=1e-10, rtol=0)


def mamba2_cfg(**mamba2) -> ModelConfig:
    m = dict(d_state=8, head_dim=8, chunk_size=4)
    m.update(mamba2)
    return ModelConfig(pattern="S-", d_model=32, n_heads=4, vocab_size=50, mamba2=Mamba2Config(**m))


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mixer_is_causal(n_groups):
    cfg = mamba2_cfg(n_groups=n_groups)
    torch.manual_seed(0)
    mixer = Mamba2(cfg, 0)
    assert mixer.n_heads == 8
    h = torch.randn(2, 11, 32, requires_grad=True)
    y = mixer(h)
    assert y.shape == h.shape
    y[:, 6].sum().backward()
    assert h.grad[:, 7:].abs().max() == 0
    assert h.grad[:, :7].abs().max() > 0
    h2 = h.detach().clone()
    h2[:, 8:] = torch.randn(2, 3, 32)
    torch.testing.assert_close(mixer(h2)[:, :8], y.detach()[:, :8])


def test_packed_sample_equals_documents_alone():
    cfg = mamba2_cfg()
    cfg.pattern = "S-S-"
    assert_packed_equals_documents_alone(build_model(cfg, seed=0).eval(), EOS)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(d_state=0), "model.mamba2.d_state"),
        (dict(chunk_size=0), "model.mamba2.chunk_size"),
        (dict(head_dim=7), "model.mamba2.head_dim"),
        (dict(n_groups=3), "model.mamba2.n_groups"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_model_config(mamba2_cfg(**overrides))
    assert err.value.key == key


def test_shape_rules_bind_only_models_with_mamba2():
    cfg = mamba2_cfg(head_dim=7)
    cfg.pattern = "*-"
    validate_model_config(cfg)


def test_model_with_mamba2_trains(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path / "run", tiny_data, max_steps=3)
    cfg.model.pattern = "S-*-"
    cfg.model.mamba2 = Mamba2Config(d_state=8, head_dim=16, chunk_size=16)
    result = Trainer(cfg).fit()
    losses = torch.tensor(list(result.losses.values()))
    assert result.step == 3 and torch.isfinite(losses).all()
