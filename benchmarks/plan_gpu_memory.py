"""`hybridtron plan`'s memory model (device 'cuda') next to the peak memory `gpu_check.py`
recorded on one GPU: no GPU needed, the predictions come from the meta-device census.

    .venv/bin/python benchmarks/plan_gpu_memory.py

The measured figures are those of `benchmarks/gpu_check.py` on an NVIDIA H200 (2026-11-26):
`SingleProcessTrainModule`, fp32 weights + AdamW, bf16 autocast on CUDA, seq 2048, random
tokens, no document masking; peak `torch.cuda.max_memory_allocated` / `max_memory_reserved`.
*counted* (the model without its allocator overhead) is compared with allocated, *total*
(counted + the stated overhead) with reserved. The overhead constant (10%) was set from the
reserved/allocated ratios of these same runs (2-15%, mean 9%), so the reserved column is not an
independent check; the allocated column is.
"""

from __future__ import annotations

import warnings

warnings.simplefilter("ignore")

RECIPE = "configs/jamba_125m.yaml"
DENSE = [
    "model.pattern=" + "*-" * 12,
    "model.d_model=768",
    "model.n_heads=12",
    "model.n_kv_heads=12",
    "model.attention.rope=true",
]
# The H200 run of 2026-11-26 ran `chunked` with its sequential in-chunk strategy (the parallel
# one, CUDA's default since, did not exist yet).
SEQUENTIAL = ["model.mamba.scan=chunked", "model.mamba.chunked_strategy=sequential"]
# (name, overrides, micro-batch, recompute, measured allocated GiB, measured reserved GiB)
MEASURED = [
    ("jamba_125m, chunked scan, micro 8, none", SEQUENTIAL, 8, "none", 16.83, 17.23),
    ("jamba_125m, cpu scan, micro 8, none", ["model.mamba.scan=cpu"], 8, "none", 22.48, 24.71),
    ("jamba_125m, chunked scan, micro 4, none", SEQUENTIAL, 4, "none", 9.27, 9.98),
    ("jamba_125m, chunked, micro 8, selective", SEQUENTIAL, 8, "selective", 10.26, 10.92),
    ("jamba_125m, chunked, micro 8, full", SEQUENTIAL, 8, "full", 8.09, 9.12),
    ("dense 12 x (*-) d768, micro 8, none", DENSE, 8, "none", 14.4, 16.51),
]  # fmt: skip


def main() -> None:
    from launch.config import load_config
    from trainer.parallel.census import Layout
    from trainer.parallel.memory_model import rank_memory

    gib = 2**30
    print(
        "| run | params | weights+grads+Adam | activations | transient | counted / allocated "
        "GiB | total / reserved GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, overrides, micro, recompute, allocated, reserved in MEASURED:
        run = [
            f"trainer.micro_batch_size={micro}",
            f"trainer.global_batch_size={micro}",
            "trainer.seq_len=2048",
            f"parallel.recompute={recompute}",
            "trainer.precision=bf16",
        ]
        cfg = load_config(RECIPE, [*overrides, *run])
        [r] = rank_memory(cfg, Layout(), device="cuda")
        state = (r.weights + r.grads + r.optimizer) / gib
        counted = (r.total - r.overhead) / gib
        total = r.total / gib
        print(
            f"| {name} | {r.params / 1e6:.1f}M | {state:.2f} | {r.activations / gib:.2f} | "
            f"{r.transient / gib:.2f} | {counted:.2f} / {allocated} "
            f"({100 * (counted / allocated - 1):+.0f}%) | {total:.2f} / {reserved} "
            f"({100 * (total / reserved - 1):+.0f}%) |"
        )


if __name__ == "__main__":
    main()
