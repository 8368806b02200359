"""The activation model of `trainer.parallel.memory_model` against the exact bytes a forward
leaves alive for its backward (`memory_probe.StorageTracker`), on one CPU process.

Measured agreement (this file's cases and a dozen more shapes: d_model 128-256, batch 1-3,
seq 200-1000, Mamba-1 d_state 8/16 with the chunked and cpu scans, Mamba-2 chunk 32/64 and
d_state 16/64): within 0.5% in fp32 and under bf16 autocast, at none / selective / full.
Asserted: 2%.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from arch import build_model, lm_loss
from arch.aux_losses import recording
from arch.config import AttentionConfig, Mamba2Config, MambaConfig, ModelConfig, MoEConfig
from arch.model import aux_loss_counts
from arch.recompute import set_recompute
from trainer.config import RunConfig
from trainer.parallel.census import Layout, rank_census
from trainer.parallel.memory_model import (
    MEMORY_CONSTANTS,
    activation_bytes,
    in_flight,
    rank_memory,
)
from trainer.parallel.memory_probe import StorageTracker, module_tensors

TOLERANCE = 0.02


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a shared 2-core machine: thread hand-offs cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(pattern: str, d: int, scan: str = "chunked") -> ModelConfig:
    return ModelConfig(
        pattern=pattern,
        d_model=d,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=1000,
        tie_embeddings=False,
        attention=AttentionConfig(rope=False),
        mamba=MambaConfig(scan=scan, d_state=8),
        mamba2=Mamba2Config(chunk_size=32, d_state=32),
        moe=MoEConfig(num_experts=4, top_k=2),
    )


def _run(model: ModelConfig, batch: int, seq: int, mode: str, precision: str) -> RunConfig:
    cfg = RunConfig()
    cfg.model = model
    cfg.trainer.micro_batch_size = batch
    cfg.trainer.seq_len = seq
    cfg.trainer.global_batch_size = batch
    cfg.trainer.precision = precision
    cfg.parallel.recompute = mode
    return cfg


def _measured(cfg: RunConfig) -> int:
    """Bytes alive between one micro-batch's forward (loss + MoE losses, as a training step
    computes it) and its backward."""
    model_cfg, t = cfg.model, cfg.trainer
    torch.manual_seed(0)
    model = build_model(model_cfg, seed=0)
    set_recompute(model, cfg.parallel.recompute)
    tokens = torch.randint(0, model_cfg.vocab_size, (t.micro_batch_size, t.seq_len + 1))
    counts = aux_loss_counts(model_cfg)
    bf16 = t.precision == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with StorageTracker([*module_tensors(model), tokens]) as tracker:
        with autocast, recording(counts, counts) as recorder:
            logits = model(tokens[:, :-1])
            loss = lm_loss(logits, tokens[:, 1:]) + sum(recorder.losses.values())
            del logits  # the training step keeps only the loss
    held = tracker.alive_bytes()
    loss.backward()
    return held


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_hybrid_activations_match_the_tracker(mode: str, precision: str) -> None:
    cfg = _run(_model("M-S*E", 160), batch=2, seq=192, mode=mode, precision=precision)
    predicted = sum(activation_bytes(cfg, Layout(), 0, device="cpu").values())
    measured = _measured(cfg)
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_scan_keeps_every_state(precision: str) -> None:
    cfg = _run(_model("M*", 128, scan="cpu"), batch=2, seq=256, mode="none", precision=precision)
    predicted = sum(activation_bytes(cfg, Layout(), 0, device="cpu").values())
    measured = _measured(cfg)
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


def test_rank_memory_pipeline_and_tensor_parallel() -> None:
    """Structure, not measurement: 1F1B's first stage holds min(P, m) micro-batches, the last
    one; TP halves the mixers' activations; the breakdown sums to the total."""
    cfg = _run(_model("M-S*E-M-", 128), batch=2, seq=128, mode="none", precision="fp32")
    cfg.trainer.global_batch_size = 8  # m = 4 micro-batches
    pp2 = Layout(pp=2)
    assert in_flight(cfg, pp2, 0) == 2 and in_flight(cfg, pp2, 1) == 1
    ranks = rank_memory(cfg, pp2, device="cpu")
    assert [r.pp_rank for r in ranks] == [0, 1]
    for r in ranks:
        assert r.total == pytest.approx(sum(r.breakdown().values()))
        assert r.activations > 0 and r.overhead > 0
    one = sum(activation_bytes(cfg, Layout(), 0, "cpu").values())
    tp2 = sum(activation_bytes(cfg, Layout(tp=2), 0, "cpu").values())
    assert 0.5 * one < tp2 < one
    shards = rank_census(cfg.model, Layout(tp=2, dp=2, zero=1))
    zero = rank_memory(cfg, Layout(tp=2, dp=2, zero=1), shards, device="cpu")
    assert len(zero) == 2 and all(r.step_buffers > 0 for r in zero)  # ZeRO-1: after backward
    assert all(":" not in k and v for k, v in MEMORY_CONSTANTS.items())


def test_a_plugin_supplies_its_own_activation_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook: a mixer's ``activation_bytes_per_token`` classmethod replaces the family
    function (here: the attention plugin's, made to say 1000 bytes more per token)."""
    from arch.attention import Attention
    from trainer.parallel import memory_model

    cfg = _run(_model("*", 128), batch=2, seq=64, mode="none", precision="fp32")
    before = activation_bytes(cfg, Layout(), 0, "cpu")["attention"]
    hook = classmethod(lambda cls, model, ctx: memory_model.attention_bytes(model, ctx) + 1000)
    monkeypatch.setattr(Attention, "activation_bytes_per_token", hook, raising=False)
    after = activation_bytes(cfg, Layout(), 0, "cpu")["attention"]
    assert after - before == pytest.approx(1000 * 2 * 64)
