"""FLOPs per token by layer family, and the throughput metrics the trainer logs from them."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config

from arch import ModelConfig, build_model
from arch.flops import flops_per_token, peak_tflops, training_flops_per_token
from trainer import Trainer

T = 64


def model(**kw):
    return build_model(ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, vocab_size=300, **kw), 0)


def test_dense_model_is_6n_plus_attention():
    m = model(pattern="*-*-")
    projections = sum(
        p.numel() for n, p in m.named_parameters() if p.ndim == 2 and "embed" not in n
    )
    attention_scores = 2 * 4 * 4 * 16 * (T + 1) / 2  # 2 layers x 4 x heads x head_dim x keys
    head = 2 * 64 * 300
    f = flops_per_token(m, T)
    assert sum(f.values()) == 2 * projections + attention_scores + head
    assert training_flops_per_token(m, T) == 3 * sum(f.values())


def test_grouped_query_heads_cost_fewer_projection_flops():
    full = model(pattern="*-")
    grouped_cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=1, vocab_size=300, pattern="*-")
    grouped = build_model(grouped_cfg, 0)
    assert flops_per_token(grouped, T)["attention"] < flops_per_token(full, T)["attention"]


def test_sliding_window_and_block_sparse_see_fewer_keys():
    full = flops_per_token(model(pattern="*"), 1024)["attention"]
    windowed = model(pattern="*")
    windowed.layers[0].inner.cfg.name, windowed.layers[0].inner.cfg.window = "sliding_window", 64
    assert flops_per_token(windowed, 1024)["attention"] < full
    cfg = ModelConfig(d_model=64, n_heads=4, vocab_size=300, pattern="*")
    cfg.attention.name, cfg.attention.block_size, cfg.attention.stride = "block_sparse", 64, 4
    assert flops_per_token(build_model(cfg, 0), 1024)["attention"] < full


def test_moe_counts_active_experts_and_mamba_its_scan():
    dense, moe = model(pattern="*-"), model(pattern="*E")
    moe.cfg.moe.top_k = 2
    router = 2 * moe.layers[1].inner.router.weight.numel()
    assert flops_per_token(moe, T)["moe"] == router + 2 * flops_per_token(dense, T)["mlp"]
    mamba = model(pattern="M-")
    inner = mamba.layers[0].inner
    projections = sum(
        2 * p.numel() for n, p in inner.named_parameters() if n.endswith("proj.weight")
    )
    conv = 2 * inner.d_inner * 4
    assert (
        flops_per_token(mamba, T)["mamba"] == projections + conv + 6 * inner.d_inner * inner.d_state
    )


def test_trainer_logs_flops_tflops_and_mfu_with_a_peak(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path / "run", tiny_data, max_steps=2)
    cfg.trainer.peak_tflops = 1.0
    Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    per_token = training_flops_per_token(build_model(cfg.model, 0), cfg.trainer.seq_len)
    assert last["flops"] == last["tokens"] * per_token
    assert last["perf/mfu"] == last["perf/tflops_per_s"] / 1.0 > 0
    assert peak_tflops(None) is None or torch.cuda.is_available()
