"""Tensor parallelism: the plans plugins declare (arch.model_plan), config checks, and a real
2-rank gloo run (tests/tp_worker.py) comparing the TP model with the dense one exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from arch import ModelConfig
from arch.config import Mamba2Config, MambaConfig, MoEConfig, PreconditionerConfig
from arch.layers_registry import MIXERS
from arch.model import HybridLM, build_model, lm_loss
from arch.model_plan import (
    check_tensor_parallel,
    is_tensor_parallel_param,
    merge_shards,
    split_for_rank,
)
from arch.registry import ConfigError
from arch.tensor_parallel_plan import DENSE, Split, merge_tensors, split_tensor


def hybrid(**kw) -> ModelConfig:
    base = dict(
        pattern="*-M-S-*E",
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=100,
        vocab_pad_multiple=64,
        ffn_hidden=64,
        mamba=MambaConfig(d_state=4),
        mamba2=Mamba2Config(d_state=8, head_dim=8, n_groups=4, chunk_size=8),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32),
    )
    base.update(kw)
    return ModelConfig(**base)


PC = PreconditionerConfig(name="pc", options={"targets": ["w1", "w2", "wo", "in_proj", "x_proj"]})


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pc", [False, True])
def test_split_merge_round_trip(tie, pc):
    cfg = hybrid(tie_embeddings=tie, preconditioner=PC if pc else PreconditionerConfig())
    model = build_model(cfg, seed=0)
    sharded = set()
    for size in (2, 4):
        check_tensor_parallel(cfg, size)
        for name, full in model.state_dict().items():
            shards = [split_for_rank(name, full, r, size, cfg) for r in range(size)]
            if not is_tensor_parallel_param(name, cfg):
                assert all(s is full for s in shards), name
                continue
            sharded.add(name)
            assert all(s.numel() * size == full.numel() for s in shards), name
            assert torch.equal(merge_shards(name, shards, cfg), full), name
    # what is split, and how the fused layouts are cut
    for expected in (
        "embed.weight",
        "layers.0.inner.wk.weight",
        "layers.2.inner.in_proj.weight",
        "layers.2.inner.A_log",
        "layers.2.inner.dt_proj.bias",
        "layers.4.inner.conv1d.weight",
        "layers.4.inner.norm.weight",
        "layers.7.inner.experts.3.w2.weight",
    ):
        assert expected in {n.replace(".lin.", ".") for n in sharded}, expected
    for replicated in ("norm.weight", "layers.7.inner.router.weight", "layers.2.norm.weight"):
        assert replicated not in sharded and not is_tensor_parallel_param(replicated, cfg)
    assert ("head.weight" in sharded) == (not tie)
    step = torch.tensor(3.0)  # an optimizer's step count stays whole
    assert split_for_rank("embed.weight", step, 1, 2, cfg) is step
    assert merge_shards("embed.weight", [step, step], cfg) is step
    if pc:
        assert "layers.2.inner.in_proj.lin.weight" in sharded
        assert not is_tensor_parallel_param("layers.1.inner.w1.gamma", cfg)
        assert not is_tensor_parallel_param("layers.1.inner.w1.u", cfg)


def test_fused_layouts_take_a_piece_of_every_part():
    cfg = hybrid()
    d, m2 = 64, cfg.mamba2
    gn, heads = m2.n_groups * m2.d_state, d // m2.head_dim
    rows = torch.arange(d + d).float()[:, None].expand(-1, 3)  # Mamba-1 in_proj: [x; z]
    shard = split_for_rank("layers.2.inner.in_proj.weight", rows, 1, 2, cfg)
    assert shard[:, 0].tolist() == list(range(32, 64)) + list(range(96, 128))
    total = 2 * d + 2 * gn + heads  # Mamba-2 in_proj: [z, x, B, C, dt]
    rows = torch.arange(total).float()[:, None]
    shard = split_for_rank("layers.4.inner.in_proj.weight", rows, 0, 2, cfg)[:, 0].tolist()
    starts = [0, d, 2 * d, 2 * d + gn, 2 * d + 2 * gn]
    pieces = [d // 2, d // 2, gn // 2, gn // 2, heads // 2]
    assert shard == [s + i for s, n in zip(starts, pieces, strict=True) for i in range(n)]
    conv = torch.arange(d + 2 * gn).float()[:, None, None]  # Mamba-2 conv1d: [x, B, C]
    shard = split_for_rank("layers.4.inner.conv1d.weight", conv, 1, 2, cfg).flatten().tolist()
    assert shard == [
        *range(32, 64),
        *range(64 + gn // 2, 64 + gn),
        *range(64 + 3 * gn // 2, 64 + 2 * gn),
    ]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(n_heads=2, n_kv_heads=2, d_model=32), "model.n_heads"),
        (dict(n_heads=4, n_kv_heads=1), "model.n_kv_heads"),
        (dict(vocab_size=99, vocab_pad_multiple=3), "model.vocab_pad_multiple"),
        (dict(mamba2=Mamba2Config(d_state=8, head_dim=8, n_groups=2)), "model.mamba2.n_groups"),
        (dict(ffn_hidden=66), "model.ffn_hidden"),
        (dict(moe=MoEConfig(num_experts=4, expert_hidden=30)), "model.moe.expert_hidden"),
        (dict(symbols={"X": "attention"}, pattern="X-"), None),  # fine: a re-pointed symbol
    ],
)
def test_check_tensor_parallel_names_the_field(overrides, key):
    cfg = hybrid(**overrides)
    if key is None:
        check_tensor_parallel(cfg, 4)
        return
    check_tensor_parallel(cfg, 1)  # tp 1 never objects
    with pytest.raises(ConfigError) as err:
        check_tensor_parallel(cfg, 4)
    assert err.value.key == key
    assert "tensor-parallel size 4" in str(err.value) and "\n" not in str(err.value)


def test_check_tensor_parallel_only_checks_what_the_pattern_uses():
    # 1 head would not split over 2 ranks, but this model has no attention.
    check_tensor_parallel(hybrid(pattern="M-", n_heads=1, n_kv_heads=1, d_model=32), 2)
    with pytest.raises(ConfigError, match="model.mamba.expand"):
        check_tensor_parallel(hybrid(pattern="M-", d_model=30, mamba=MambaConfig(expand=1)), 4)


def test_single_process_is_the_dense_model():
    """The single-process context builds the dense model; the model's pieces (embed_tokens,
    run_layers, logits) compose to forward, and the context's loss is lm_loss."""
    cfg = hybrid(tie_embeddings=False)
    model = build_model(cfg, seed=1, tp=DENSE)
    dense = HybridLM(cfg, seed=1).state_dict()  # the one-process model itself, not a shard
    assert all(torch.equal(t, dense[k]) for k, t in model.state_dict().items())
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    logits = model(ids[:, :-1])
    assert logits.shape[-1] == cfg.vocab_size
    state = model.run_layers(model.embed_tokens(ids[:, :-1]), None, 0, 3)
    state = model.run_layers(state, None, 3)
    assert torch.equal(model.logits(model.norm(state["x"])), logits)
    h = torch.randn(2, 3, cfg.d_model)
    assert torch.equal(model.logits(h), h @ model.head.weight[: cfg.vocab_size].T)
    assert torch.equal(DENSE.cross_entropy(logits, ids[:, 1:]), lm_loss(logits, ids[:, 1:]))


def test_split_tensor_and_merge_tensors_are_inverse():
    full = torch.arange(24.0).view(6, 4)
    fused = Split(0, (2, 4))
    shards = [split_tensor(full, fused, r, 2) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0.0, 8.0, 12.0]  # a piece of every part
    assert torch.equal(merge_tensors(shards, fused), full)
    with pytest.raises(ValueError, match="does not split"):
        split_tensor(full, Split(1), 0, 3)


class NoPlanMixer(torch.nn.Module):
    """A mixer that declares no tensor-parallel plan (identity)."""

    def __init__(self, cfg, layer_index):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x):
        return x * self.scale


def test_a_plugin_without_a_plan_trains_at_tp1_and_is_refused_at_tp2():
    MIXERS.add("test_no_plan", NoPlanMixer, override=True)
    cfg = hybrid(pattern="X-", symbols={"X": "test_no_plan"})
    model = build_model(cfg, seed=0)
    model(torch.randint(0, cfg.vocab_size, (1, 4))).sum().backward()
    check_tensor_parallel(cfg, 1)
    with pytest.raises(ConfigError) as err:
        check_tensor_parallel(cfg, 2)
    message = str(err.value)
    assert "'test_no_plan'" in message and "tensor_parallel_plan" in message
    assert "\n" not in message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_the_dense_model(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(REPO / "tests" / "tp_worker.py"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    plain = {"hybrid_tied_heavy_ball_docs", "hybrid_untied_plain_window", "hybrid_pc_docs"}
    assert set(ranks[0]) == plain | {f"{name}_sp" for name in plain}
    for name in plain:  # 8 sub-layer norms and the final one at least see a sequence part
        assert ranks[0][f"{name}_sp"]["sp_params"] >= 9, name
    for name, res in ranks[0].items():
        assert res["keys_equal"] and res["names_equal"], name
        assert res["attrs_ok"], name  # Megatron's TP attributes exactly on the sharded params
        assert res["logits_shape"] == [2, 16, 128 // 2], name
        # The worker runs both models in float64 (in fp32 these bounds had 2-5x margins and the
        # buffers' 1e-4 failed under MKL_CBWR=COMPATIBLE). float64, worst over OMP 1/2 threads,
        # default/avx2/avx512 kernels and MKL_CBWR=COMPATIBLE: loss 9.3e-8 relative, grads 4.6e-8
        # (fp32-sized: the context's cross_entropy returns fp32 for float64 logits, whose gathered
        # values match the dense ones to 3e-16), params after AdamW's sign-like first step 1.0e-5,
        # PC buffers 1.4e-6; each bound below leaves >= 19x.
        for dense_loss, tp_loss, rel in res["losses"]:  # before and after one AdamW step
            assert rel < 2e-6, (name, dense_loss, tp_loss)
        assert res["grad_max_rel"] < 5e-6, (name, res["grad_worst"])
        assert res["replicated_grad_max_abs_diff"] == 0.0, name
        assert res["param_after_step_max_rel"] < 2e-4, name
        assert res["buffers_rank_max_diff"] == 0.0, name  # PC's u, v identical on every rank
        assert res["buffers_max_abs_diff"] < 1e-4, name
        assert ranks[1][name]["losses"] == res["losses"], name  # every rank sees the same loss
    assert ranks[0]["hybrid_pc_docs"]["n_buffers"] > 0
