"""What `hybridtron plan` prints: the ranked table, one layout explained rank by rank, the
constants behind every figure, and the same as JSON for scripts.

Tables are rich tables: coloured on a terminal, plain ASCII when the output is a file or a pipe.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from trainer.parallel.hardware import Hardware
from trainer.parallel.memory_model import MEMORY_CONSTANTS
from trainer.parallel.plan_time import (
    EFFICIENCY,
    SCAN_BYTES_PER_TOKEN_CHANNEL,
    SCAN_PARALLEL_HBM_GBS,
    SCAN_PARALLEL_S_PER_STATE,
    SCAN_STEP_S,
    SUBLAYER_LAUNCH_S,
)
from trainer.parallel.planner import GIB, Prediction

MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "transient", "buffers", "overhead")


def _console(file: io.TextIOBase | None = None) -> Console:
    return Console(file=file, highlight=False, soft_wrap=False, width=200)


def _box(console: Console) -> box.Box:
    return box.SIMPLE_HEAD if console.is_terminal else box.ASCII


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _comm_cell(p: Prediction) -> str:
    return (
        ", ".join(
            f"{kind} {nbytes / 1e9:.1f} GB {link}"
            for kind, (nbytes, _, link) in p.time.comm.items()
        )
        or "-"
    )


def print_ranking(preds: list[Prediction], title: str, top: int) -> None:
    console = _console()
    table = Table(title=title, box=_box(console), title_justify="left")
    for name, justify in [
        ("#", "right"),
        ("layout", "left"),
        ("peak GiB", "right"),
        ("weights+grads+optim", "right"),
        ("activations", "right"),
        ("step s", "right"),
        ("tok/s/GPU", "right"),
        ("MFU", "right"),
        ("communication per step (busiest rank)", "left"),
    ]:
        table.add_column(name, justify=justify)
    for i, p in enumerate(preds[:top], 1):
        r = p.largest
        style = None if p.fits else "red"
        table.add_row(
            str(i),
            p.candidate.label(),
            f"{p.peak_gib:.1f}",
            _gib(r.weights + r.grads + r.optimizer),
            _gib(r.activations + r.transient),
            f"{p.time.total:.2f}",
            f"{p.tokens_per_s_per_gpu:,.0f}",
            f"{100 * p.mfu:.1f}%",
            _comm_cell(p),
            style=style,
        )
    console.print(table)


def print_explain(p: Prediction, hw: Hardware, rank: int) -> None:
    console = _console()
    c = p.candidate
    console.print(
        f"#{rank} {c.label()}: predicted peak {p.peak_gib:.1f} GiB of {hw.memory_gib:g} "
        f"({'fits' if p.fits else 'does NOT fit'} with {hw.runtime_reserved_gib:g} GiB for the "
        f"runtime), step {p.time.total:.3f} s, {p.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
        f"MFU {100 * p.mfu:.1f}%"
    )
    console.print("run it with: " + " ".join(c.overrides()))
    table = Table(title="memory per rank role (GiB)", box=_box(console), title_justify="left")
    for name in ("pp", "tp", "ep", "params", *MEMORY_PARTS, "total"):
        table.add_column(name, justify="right")
    for r in p.ranks:
        parts = [_gib(getattr(r, name)) for name in MEMORY_PARTS]
        table.add_row(
            str(r.pp_rank), str(r.tp_rank), str(r.ep_rank), f"{r.params:,}", *parts, _gib(r.total)
        )
    console.print(table)
    t = p.time
    timing = Table(title="time per step (s)", box=_box(console), title_justify="left")
    for name in ("part", "seconds", "bytes per rank", "link"):
        timing.add_column(name, justify="left" if name == "part" else "right")
    timing.add_row("compute (slowest stage)", f"{t.compute_s:.3f}", "", "")
    timing.add_row("Mamba-1 scan", f"{t.scan_s:.3f}", "", "")
    timing.add_row("pipeline bubble", f"{t.bubble_s:.3f}", "", "")
    timing.add_row("optimizer", f"{t.optimizer_s:.3f}", "", "")
    for kind, (nbytes, seconds, link) in t.comm.items():
        timing.add_row(kind, f"{seconds:.3f}", f"{nbytes / 1e9:.2f} GB", link)
    timing.add_row("total", f"{t.total:.3f}", "", "")
    console.print(timing)


def constants(hw: Hardware, mamba_scan: str) -> dict[str, Any]:
    """Every constant the figures rest on."""
    return {
        "hardware": dataclasses.asdict(hw),
        "efficiency": dict(EFFICIENCY),
        "mamba_scan": mamba_scan,
        "scan_step_s": dict(SCAN_STEP_S),
        "scan_parallel_s_per_state": SCAN_PARALLEL_S_PER_STATE,
        "sublayer_launch_s": SUBLAYER_LAUNCH_S,
        "scan_bytes_per_token_channel": SCAN_BYTES_PER_TOKEN_CHANNEL,
        "memory": dict(MEMORY_CONSTANTS),
    }


def print_constants(hw: Hardware, mamba_scan: str) -> None:
    values = constants(hw, mamba_scan)
    h = values["hardware"]
    lines = [
        f"constants: {h['name']} x {h['gpus']} ({h['gpus_per_node']} per node): "
        f"{h['memory_gib']:g} GiB, {h['bf16_tflops']:g} bf16 TFLOP/s, HBM {h['hbm_gbs']:g} GB/s, "
        f"NVLink {h['nvlink_gbs']:g} GB/s, IB {h['ib_gbs']:g} GB/s per GPU and direction, "
        f"{h['link_latency_s'] * 1e6:g} us per collective, {h['runtime_reserved_gib']:g} GiB "
        f"held by the runtime",
        "  efficiency (share of peak): "
        + ", ".join(f"{k} {v:g}" for k, v in values["efficiency"].items())
        + f"; {SUBLAYER_LAUNCH_S * 1e6:g} us of launches per sub-layer and micro-batch",
        f"  Mamba-1 scan: {mamba_scan}"
        + {
            "cuda": f" (mamba_ssm: {SCAN_BYTES_PER_TOKEN_CHANNEL} bytes per token and channel at "
            "HBM speed)",
            "chunked": f" (parallel in-chunk: {SCAN_PARALLEL_S_PER_STATE * 1e12:.3g} ps per state "
            f"element at {SCAN_PARALLEL_HBM_GBS:g} GB/s HBM, measured on an H200)",
            "cpu": f" ({SCAN_STEP_S['cpu'] * 1e6:g} us per time step and layer, measured on an "
            "H200)",
        }[mamba_scan],
    ]
    lines += [f"  memory: {k}: {v}" for k, v in values["memory"].items()]
    print("\n".join(lines))


def as_json(preds: list[Prediction], hw: Hardware, mamba_scan: str, top: int) -> dict[str, Any]:
    def one(p: Prediction) -> dict[str, Any]:
        return {
            "layout": p.candidate.label(),
            "overrides": p.candidate.overrides(),
            "fits": p.fits,
            "peak_gib": round(p.peak_gib, 3),
            "step_s": p.time.total,
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
            "mfu": p.mfu,
            "time": {
                "compute_s": p.time.compute_s,
                "scan_s": p.time.scan_s,
                "bubble_s": p.time.bubble_s,
                "optimizer_s": p.time.optimizer_s,
                "comm": {
                    k: {"bytes": b, "seconds": s, "link": link}
                    for k, (b, s, link) in p.time.comm.items()
                },
            },
            "ranks": [
                {
                    "pp": r.pp_rank,
                    "tp": r.tp_rank,
                    "ep": r.ep_rank,
                    "params": r.params,
                    **{name: getattr(r, name) for name in MEMORY_PARTS},
                    "total": r.total,
                }
                for r in p.ranks
            ],
        }

    return {
        "constants": constants(hw, mamba_scan),
        "valid_layouts": len(preds),
        "fitting_layouts": sum(p.fits for p in preds),
        "layouts": [one(p) for p in preds[:top]],
    }
