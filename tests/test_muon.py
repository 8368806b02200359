"""The Muon optimizer (`optim.name=muon`): parameter routing, the update against a hand
computation, the AdamW part against torch's AdamW, state round-trip, exact resume (with PC)."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from conftest import tiny_config
from test_residual_variants import _restore_threads, assert_resume_exact_for  # noqa: F401

from arch import ModelConfig, build_model
from arch.registry import ConfigError
from launch.config import load_config
from trainer import OPTIMIZERS, OptimConfig
from trainer.muon import Muon, newton_schulz5, update_scale
from trainer.optim import build_optimizer


def model(**kw):
    cfg = ModelConfig(pattern="*-*-", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=300, **kw)
    return build_model(cfg, seed=0)


def loss_of(m) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    return m(ids).logsumexp(-1).mean()


def test_registered_and_routes_hidden_matrices_only():
    assert "muon" in OPTIMIZERS
    m = model(tie_embeddings=False)
    opt = build_optimizer(m, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    names = {id(p): n for n, p in m.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon == {n for n in names.values() if re.search(r"\.w[qkvo123]\.weight$", n)}
    assert {"embed.weight", "head.weight", "norm.weight"} <= adamw
    assert not muon & adamw and len(muon | adamw) == len(names)
    assert all(g["lr_ratio"] == pytest.approx(20.0) for g in opt.param_groups if g["use_muon"])


def test_newton_schulz_orthogonalises():
    G = torch.randn(64, 24, generator=torch.Generator().manual_seed(0))
    for X in (G, G.T):
        sv = torch.linalg.svdvals(newton_schulz5(X))
        # The quintic's band; measured 0.6818 and 1.1210 on every thread/kernel setting (fp32
        # noise ~1e-6, 1000x below the 1.8e-3 and 1.9e-2 margins).
        assert sv.min() >= 0.68 and sv.max() <= 1.14, sv
    assert update_scale(torch.Size([96, 32]), "jordan") == pytest.approx(math.sqrt(3))
    assert update_scale(torch.Size([32, 96]), "jordan") == 1.0
    assert update_scale(torch.Size([32, 96]), "moonlight") == pytest.approx(0.2 * math.sqrt(96))


def test_muon_step_is_keller_jordans_update():
    # float64: the optimizer's lerp and this hand-written momentum round differently, and NS5
    # amplifies that (its 5-step map has slope up to ~15-30): in fp32 the weights differed by up
    # to 2.4e-7 against atol=1e-6. float64: measured <= 5e-16 over 1/2 threads and
    # default/avx2/avx512 kernels (MKL_CBWR=COMPATIBLE too); 1e-10 leaves > 10^5 x.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 16, dtype=torch.float64))
    opt = Muon([{"params": [w], "use_muon": True, "lr_ratio": 2.0}], lr=0.01, weight_decay=0.1)
    w0, buf = w.detach().clone(), torch.zeros(48, 16, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(48, 16, dtype=torch.float64)
        w.grad = grad.clone()
        opt.step()
        buf = 0.95 * buf + 0.05 * grad
        nesterov = 0.05 * grad + 0.95 * buf
        w0 = w0 * (1 - 0.02 * 0.1) - 0.02 * math.sqrt(3) * newton_schulz5(nesterov)
        torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-10)


def test_adamw_part_matches_torch_adamw():
    a, b = model(), model()
    ours = Muon([{"params": list(a.parameters()), "weight_decay": 0.1}], lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(
        b.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False
    )
    for _ in range(3):
        for m, opt in ((a, ours), (b, ref)):
            loss_of(m).backward()
            opt.step()
            opt.zero_grad()
    # Same model, same grads, the same arithmetic: measured bit-identical over 1/2 threads and
    # default/avx2/avx512 kernels; 1e-6 (3e-4 of one lr=3e-3 step) allows only rounding slack.
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_state_dict_round_trip_continues_exactly():
    a, b = model(), model()
    cfg = OptimConfig(name="muon")
    opt_a = build_optimizer(a, cfg)
    for _ in range(2):
        loss_of(a).backward()
        opt_a.step()
        opt_a.zero_grad()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg)
    saved = io.BytesIO()  # through bytes, as a checkpoint does (state_dict() holds live tensors)
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved, weights_only=False))
    for m, opt in ((a, opt_a), (b, opt_b)):
        loss_of(m).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_muon_keys_are_validated():
    cfg = load_config(None, ["optim.name=muon", "optim.muon_lr=0.01", "optim.muon_scale=moonlight"])
    assert cfg.optim.muon_lr == 0.01 and cfg.optim.muon_scale == "moonlight"
    for override, key in (
        ("optim.muon_lr=0", "optim.muon_lr"),
        ("optim.muon_momentum=1.0", "optim.muon_momentum"),
        ("optim.muon_scale=nope", "optim.muon_scale"),
        ("optim.muon_ns_steps=0", "optim.muon_ns_steps"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["optim.name=muon", override])


def test_muon_with_pc_and_tmm_resumes_exactly(tmp_path, tiny_data):
    """Muon's momentum buffers, the AdamW moments and the PC layers' (u, v) all resume."""
    weights = assert_resume_exact_for(
        tmp_path, tiny_data, "tmm", optim={"name": "muon"}, preconditioner="pc"
    )
    assert any(k.endswith(".u") for k in weights)


def test_muon_trains(tmp_path, tiny_data):
    from trainer import Trainer

    cfg = tiny_config(tmp_path, tiny_data, threads=1)
    cfg.optim.name = "muon"
    result = Trainer(cfg, log=lambda *a: None).fit()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.3
