"""Activation recomputation (`parallel.recompute`): activation memory and fwd+bwd time of
`configs/jamba_tiny.yaml`'s model under none / selective / full, on CPU.

    .venv/bin/python benchmarks/bench_recompute.py [--seq-len 2048] [--batch 1] [--repeats 3]
        [--modes none selective full]

The model is jamba_tiny's (`M-MEM-ME*-MEM-ME`, d_model 128, Mamba-1 d_state 16 with the `auto`
scan, i.e. `chunked` on CPU, 4 MoE sub-layers, one attention), fp32, seeded; one micro-batch of
``--batch`` x ``--seq-len`` tokens; the loss is the LM loss plus the MoE auxiliary losses (what a
training step back-propagates). Each memory figure comes from a fresh subprocess per mode:

- ``held_mib``: the activation memory between the forward and the backward, counted exactly:
  a TorchDispatchMode keeps a weak reference to the storage of every tensor an op creates during
  the forward; the bytes of those still alive when the loss is computed are everything the
  backward will use (tensors autograd saved, checkpoints' inputs, the logits), never the
  parameters, each storage once. saved_tensors_hooks alone would miss the inputs a checkpoint
  keeps by reference, which are most of what ``full`` keeps.
- ``peak_mib``: how far the peak resident set (VmHWM, reset through /proc/self/clear_refs) rose
  above the resident set before the forward, over forward + backward: ``held`` plus the
  backward's transient (the recomputed sub-layer, activation gradients), after a warm-up fwd+bwd
  (one-time allocations; the parameter gradients it leaves are not counted); glibc's mmap threshold is pinned
  (MALLOC_MMAP_THRESHOLD_) so that a freed large tensor leaves the resident set at once, rather
  than a recycled heap making the peak a high-water mark of earlier allocations.

Time: best of ``--repeats`` fwd+bwd wall times, the modes interleaved in one process (so the
ratio to ``none`` is meaningful on a shared machine; the absolute times are not). The gradients
of every mode are checked bit-identical to ``none``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from arch import build_model, lm_loss
from arch.aux_losses import recording
from arch.model import aux_loss_counts
from arch.recompute import MODES, set_recompute
from trainer.parallel.memory_probe import StorageTracker

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "jamba_tiny.yaml"


def setup(args: argparse.Namespace, mode: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    from launch.config import load_config

    cfg = load_config(str(CONFIG), []).model
    model = build_model(cfg, seed=0)
    set_recompute(model, mode)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    return model, tokens, aux_loss_counts(cfg)


def forward_loss(model: torch.nn.Module, tokens: torch.Tensor, counts: dict) -> torch.Tensor:
    with recording(counts, counts) as recorder:
        logits = model(tokens[:, :-1])
    return lm_loss(logits, tokens[:, 1:]) + sum(recorder.losses.values())


def _status_kib(key: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_case(args: argparse.Namespace) -> None:
    """(In the fresh subprocess.) Prints held_mib and peak_mib of one fwd+bwd (module doc)."""
    torch.manual_seed(0)
    model, tokens, counts = setup(args, args.memory_case)
    forward_loss(model, tokens, counts).backward()  # one-time allocations (thread pools, ...)
    # Peak first (the tracker's weak references and per-op Python cost would blur it); the
    # parameter gradients stay allocated from the warm-up.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    forward_loss(model, tokens, counts).backward()
    peak = (_status_kib("VmHWM") - before) / 1024
    existing = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())]
    with StorageTracker([*existing, tokens]) as tracker:
        loss = forward_loss(model, tokens, counts)
    held = tracker.alive_bytes() / 2**20
    loss.backward()
    print(json.dumps({"held_mib": round(held, 1), "peak_mib": round(peak, 1)}))


def memory(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, __file__, "--memory-case", mode]
    command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timings(args: argparse.Namespace) -> dict[str, float]:
    """Best fwd+bwd seconds per mode, interleaved; gradients checked against the first mode."""
    torch.manual_seed(0)
    built = {mode: setup(args, mode) for mode in args.modes}
    tokens = built[args.modes[0]][1]
    best = dict.fromkeys(args.modes, float("inf"))
    for _ in range(args.repeats):
        grads = {}
        for mode in args.modes:
            model, _, counts = built[mode]
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            forward_loss(model, tokens, counts).backward()
            best[mode] = min(best[mode], time.perf_counter() - start)
            grads[mode] = [p.grad for p in model.parameters()]
        for mode in args.modes[1:]:
            same = all(
                torch.equal(a, b) for a, b in zip(grads[mode], grads[args.modes[0]], strict=True)
            )
            assert same, f"{mode}: gradients differ from {args.modes[0]}"
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args()
    if args.memory_case:
        memory_case(args)
        return
    machine = {"threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    shape = {"batch": args.batch, "seq_len": args.seq_len}
    rows = {mode: memory(args, mode) for mode in args.modes}
    best = timings(args)
    base = args.modes[0]
    for mode in args.modes:
        row = {"mode": mode, **rows[mode], "fwd_bwd_s": round(best[mode], 3)}
        row["held_smaller_x"] = round(rows[base]["held_mib"] / rows[mode]["held_mib"], 2)
        row["peak_smaller_x"] = round(rows[base]["peak_mib"] / rows[mode]["peak_mib"], 2)
        row["time_x"] = round(best[mode] / best[base], 2)
        print(json.dumps(row | shape | machine), flush=True)


if __name__ == "__main__":
    main()
