"""Hugging Face Jamba parity: a tiny `JambaForCausalLM` (reference/jamba.md section 4.1) converted
into a HybridLM gives the same fp32 logits and parameter gradients. This also pins down the
semantics of our Mamba (dt/B/C norms, conv, scan), attention (no RoPE, GQA) and MoE (router
without renormalisation, dropless) layers. Plus Jamba's (period, offset) layout shorthand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import JambaConfig, JambaForCausalLM
from transformers.utils import logging as hf_logging

from arch.hf import FAMILIES, HFInteropError, config_from_hf, from_hf
from arch.layouts import jamba_pattern

VOCAB = 256


@pytest.fixture(scope="module")
def hf_jamba() -> JambaForCausalLM:
    hf_logging.set_verbosity_error()  # the "no fast mamba kernels" notices
    torch.manual_seed(0)
    cfg = JambaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=8,
        attn_layer_offset=4,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        use_mamba_kernels=False,
        max_position_embeddings=1024,
    )
    model = JambaForCausalLM(cfg)
    # Constant-initialised parameters made random, so a converter bug in them shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "A_log", "dt_proj.bias", "conv1d.bias")) or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_jamba_pattern_matches_the_papers_block():
    assert jamba_pattern(8) == "M-MEM-ME*-MEM-ME"
    assert jamba_pattern(32) == "M-MEM-ME*-MEM-ME" * 4
    assert jamba_pattern(4, attn_period=2, attn_offset=1, expert_period=4, expert_offset=0) == (
        "ME*-M-*-"
    )
    with pytest.raises(ValueError, match="attn_offset"):
        jamba_pattern(8, attn_period=4, attn_offset=4)


def test_config_carries_jambas_semantics(hf_jamba):
    cfg = config_from_hf(hf_jamba.config)
    assert cfg.pattern == "M-MEM-ME*-MEM-ME"
    assert not cfg.attention.rope and not cfg.tie_embeddings
    assert cfg.mamba.dt_norms and cfg.mamba.dt_rank == 4 and not cfg.moe.renormalize
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden) == (4, 2, 128)


def test_logits_and_gradients_match_hugging_face(hf_jamba):
    ours = from_hf(hf_jamba, **{"mamba.scan": "cpu"}).eval()
    ids = torch.randint(1, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))  # no pad id

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    hf_jamba.zero_grad()
    ref = hf_jamba(input_ids=ids, use_cache=False).logits
    loss_of(ref).backward()
    out = ours(ids)
    loss_of(out).backward()
    assert (out - ref).abs().max() < 1e-4  # measured <= 2.4e-7 over threads/kernels (400x)

    # HF's gradients, renamed and re-laid-out exactly as its weights were.
    grads = {n: p.grad for n, p in hf_jamba.named_parameters()}
    hf_grads = FAMILIES["jamba"].from_hf(grads, ours.cfg)
    for name, p in ours.named_parameters():
        theirs = hf_grads[name]
        mine = p.grad[:VOCAB] if name in ("embed.weight", "head.weight") else p.grad
        theirs = theirs[:VOCAB] if name in ("embed.weight", "head.weight") else theirs
        # Measured <= 3.0e-8 over 1/2 threads and default/avx2/avx512 kernels (330x).
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=name)


def test_on_disk_checkpoint_converts_to_the_same_model(hf_jamba, tmp_path):
    """Safetensors on disk hold per-expert keys; transformers 5 fuses them in memory."""
    hf_jamba.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(".experts.0.gate_proj." in k for k in on_disk)
    from_disk = from_hf(on_disk, hf_jamba.config)
    from_memory = from_hf(hf_jamba)
    for (name, a), b in zip(
        from_disk.state_dict().items(), from_memory.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_unmapped_or_unsupported_weights_are_refused(hf_jamba):
    state = dict(hf_jamba.state_dict())
    state["model.layers.0.mamba.in_proj.bias"] = torch.zeros(256)
    with pytest.raises(HFInteropError, match="not mapped"):
        from_hf(state, hf_jamba.config)
    bad = JambaConfig(**{**hf_jamba.config.to_dict(), "mamba_proj_bias": True})
    with pytest.raises(HFInteropError, match="mamba_proj_bias"):
        config_from_hf(bad)
