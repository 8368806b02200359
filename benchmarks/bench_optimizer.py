"""AdamW step: torch's fused implementation (hybridtron's) against foreach (the previous one), on
the parameter shapes of a ~100M-parameter hybrid, time per step and the memory the step adds.

    .venv/bin/python benchmarks/bench_optimizer.py [--params-m 100] [--steps 5]

Each implementation runs in its own process (peak resident memory is per process): parameters
and gradients are made, then the first step (which creates the two moments) is measured as the
peak above them, then ``--steps`` steps are timed. Both must give the same weights (checked).
Last lines: ``fused_speedup=X.XX`` (foreach time / fused time) and ``fused_step_extra_mib``
against ``foreach_step_extra_mib`` (what the step holds beyond weights, gradients and moments).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, params_m: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    # Hidden projections of d_model 1024 (4 x 1024 x 1024 each) plus norms, to params_m M.
    shapes = [(4096, 1024)] * max(1, params_m * 10**6 // (4096 * 1024)) + [(1024,)] * 32
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **{kind: True})
    before = peak_mib()
    opt.step()
    moments = sum(p.numel() for p in params) * 4 * 2 / 2**20
    extra = peak_mib() - before - moments
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    checksum = float(sum(p.double().sum() for p in params))
    return {"kind": kind, "s_per_step": seconds, "extra_mib": extra, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kind", choices=["fused", "foreach"])
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(measure(args.kind, args.params_m, args.steps)))
        return
    results = {}
    for kind in ("foreach", "fused"):
        cmd = [sys.executable, __file__, "--kind", kind, "--params-m", str(args.params_m)]
        out = subprocess.run(cmd + ["--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{kind} failed:\n{out.stderr}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    fused, foreach = results["fused"], results["foreach"]
    agree = abs(fused["checksum"] - foreach["checksum"]) <= 1e-6 * abs(foreach["checksum"])
    print(f"AdamW over ~{args.params_m}M fp32 parameters, {args.steps} timed steps")
    print("| implementation | s / step | step memory beyond weights, grads, moments (MiB) |")
    print("|---|---:|---:|")
    for kind in ("foreach", "fused"):
        r = results[kind]
        print(f"| {kind} | {r['s_per_step']:.3f} | {r['extra_mib']:.0f} |")
    print(f"weights agree: {agree}")
    print(f"fused_speedup={foreach['s_per_step'] / fused['s_per_step']:.2f}")
    print(f"fused_step_extra_mib={fused['extra_mib']:.0f}")
    print(f"foreach_step_extra_mib={foreach['extra_mib']:.0f}")
    if not agree:
        sys.exit("fused and foreach AdamW disagree")


if __name__ == "__main__":
    main()
