"""The attention mixer reaches SDPA's flash kernel (the one H100s run) whenever flash can serve it.

With `sdpa_kernel([FLASH_ATTENTION])` SDPA may use nothing else and raises if the call is not
flash-eligible (an explicit mask, an unsupported layout). PyTorch has a CPU flash kernel, so the
check runs here; on GPU the same call selects FlashAttention-2. (Packed-document masking passes
a block-diagonal mask, which GPU flash cannot take: SDPA then uses its memory-efficient kernel.)
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from arch import ModelConfig, build_model


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal_attention_runs_on_the_flash_kernel_alone(kv_heads):
    cfg = ModelConfig(pattern="*-", d_model=64, n_heads=4, n_kv_heads=kv_heads, vocab_size=100)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = model(ids)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        logits = model(ids)
        logits.float().pow(2).mean().backward()  # the backward is flash's too
    # On CPU the flash context measured bit-equal to the default path over threads/kernels.
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert model.layers[0].inner.wq.weight.grad is not None
