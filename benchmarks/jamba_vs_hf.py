"""Jamba forward + backward: hybridtron vs Hugging Face transformers on the same weights.

    .venv/bin/python benchmarks/jamba_vs_hf.py [--batch 4] [--seq-len 256] [--repeats 5]

A tiny random JambaForCausalLM (hidden 64, 8 layers: Mamba-1 with dt/B/C norms, attention at
layer 4, MoE 4 experts top-2 on odd layers; transformers' pure-PyTorch path, as on any machine
without mamba_ssm) is converted with `arch.hf.from_hf`; both models run the same
batch in the same process, with the same threads, in interleaved repeats (best kept). The
logits are checked to agree first. The last line is `speedup_vs_hf=X.XX` (fwd+bwd time of
transformers / hybridtron).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import JambaConfig, JambaForCausalLM
from transformers.utils import logging as hf_logging

from arch.hf import from_hf


def fwd_bwd_seconds(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logits = model(ids).logits if hf else model(ids)
    logits.float().logsumexp(-1).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = JambaForCausalLM(JambaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False,
        max_position_embeddings=4096,
    )).train()  # fmt: skip
    ours = from_hf(hf).train()
    ids = torch.randint(1, 256, (args.batch, args.seq_len))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, f"the two models disagree (max |dlogits| = {diff})"
    times = {"hf": [], "hybridtron": []}
    for _ in range(args.repeats):
        times["hf"].append(fwd_bwd_seconds(hf, ids, hf=True))
        times["hybridtron"].append(fwd_bwd_seconds(ours, ids, hf=False))
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({
        "batch": args.batch, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
        "max_abs_logit_diff": diff, "hf_fwd_bwd_s": round(best["hf"], 4),
        "hybridtron_fwd_bwd_s": round(best["hybridtron"], 4),
    }))  # fmt: skip
    print(f"speedup_vs_hf={best['hf'] / best['hybridtron']:.2f}")


if __name__ == "__main__":
    main()
