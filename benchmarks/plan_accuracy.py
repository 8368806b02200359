"""`hybridtron plan`'s memory model against measurement: predicted peak memory per rank
(`trainer.parallel.memory_model.rank_memory`, device 'cpu') vs each rank's measured peak, on
CPU over gloo, at several layouts of a small hybrid (M, S, *, -, E), recompute on and off.

    .venv/bin/python benchmarks/plan_accuracy.py [--out /tmp/plan-accuracy] [--only NAME ...]

Each layout is one `torch.distributed.run` launch of fresh processes running the real training
path (`ParallelTrainModule`: the census's shard, DeepSpeed / the plain engine, 1F1B or its
interleaved form) for two steps of random tokens. What is measured, and why:

- **Peak anonymous resident memory** over the second step, minus the floor. Each rank reads
  its resident set after the imports and the process-group set-up, before building anything
  (the floor: torch, Megatron, DeepSpeed, gloo), runs a first step (one-time allocations:
  optimizer state, gradients, thread pools), resets VmHWM through /proc/self/clear_refs, runs
  the second step and reads VmHWM. File-backed pages (RssFile: the code and data of the shared
  libraries, touched for the first time as new code paths run: 37 MiB over a build and a first
  step at tp 2) are taken out of both the floor and the peak: they are shared between the
  ranks, reclaimable, and no allocator holds them; the peak's is read right after the step
  (file pages are not dropped without memory pressure, so this is the RssFile at the peak or
  slightly more). glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_=65536), so every
  tensor over 64 KiB is its own mapping, returned to the system when freed: the resident set
  then follows the live tensors instead of a heap's high-water mark.
- Why not the allocator's counters: CPU tensors have no caching allocator with a peak counter;
  torch.profiler's memory events or a dispatch-mode tracker see tensors only (not DeepSpeed's
  or gloo's buffers, nor the allocator's own overhead), cost a large slowdown in a multi-process
  run, and would measure the model's own assumption (tensors) rather than what the machine
  must hold. The exact tensor-level check of the activation model is the unit test
  (`tests/test_memory_model.py`, `memory_probe.StorageTracker`).

The same model (every constant printed) is what `plan` uses with device 'cuda'. Step time: the
wall time of the second step (slowest rank); the predicted column comes from
`trainer.parallel.plan_time.step_time` on `hardware.cpu_hardware` (this machine's measured
single-thread matmul rate and copy bandwidth, shared when the ranks outnumber the cores; gloo
and the scan's cost per state element stated there).
Output: ``OUT/plan_accuracy.json`` and a markdown table on stdout (RESULTS.md has a run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parent.parent
MICRO, GLOBAL, SEQ, VOCAB = 2, 4, 512, 4096


@dataclass(frozen=True)
class Case:
    """One layout of the benchmark: tp x pp x dp (world), ep, virtual stages, ZeRO stage,
    recompute, sequence parallelism."""

    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    virtual: int = 1
    zero: int = 0
    recompute: str = "none"
    sp: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


CASES = [
    Case("1 process", recompute="none"),
    Case("1 process, full", recompute="full"),
    Case("dp2 ZeRO-1", dp=2, zero=1),
    Case("dp2 ZeRO-2, full", dp=2, zero=2, recompute="full"),
    Case("dp2 ep2, selective", dp=2, ep=2, recompute="selective"),
    Case("tp2 + SP, selective", tp=2, sp=True, recompute="selective"),
    Case("pp2 1F1B", pp=2),
    Case("pp2 x v2 interleaved", pp=2, virtual=2),
    Case("tp2 x pp2, full", tp=2, pp=2, recompute="full"),
]


def run_config(case: Case):
    """The benchmark's model: 8 sub-layers M-S*E-M- (Mamba-1, Mamba-2, attention, MoE with 4
    experts top-2, SwiGLU MLPs), d_model 256, Mamba-2 with 2 B/C groups (a group per TP rank),
    vocabulary 4096, untied, fp32, AdamW."""
    from arch.config import Mamba2Config, ModelConfig, MoEConfig
    from trainer.config import RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(
        pattern="M-S*E-M-",
        d_model=256,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=VOCAB,
        tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2),
        mamba2=Mamba2Config(n_groups=2),  # B/C groups split under tp 2
    )
    cfg.model.attention.rope = False
    cfg.trainer.seq_len, cfg.trainer.micro_batch_size = SEQ, MICRO
    cfg.trainer.global_batch_size, cfg.trainer.seed = GLOBAL, 0
    p = cfg.parallel
    p.tensor, p.pipeline, p.zero_stage, p.expert = case.tp, case.pp, case.zero, case.ep
    p.virtual_stages, p.recompute, p.sequence_parallel = case.virtual, case.recompute, case.sp
    return cfg


def layout_of(case: Case):
    from trainer.parallel.census import Layout

    return Layout(
        tp=case.tp, pp=case.pp, dp=case.dp, ep=case.ep, virtual=case.virtual, zero=case.zero
    )


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rank_main(case: Case, report: Path) -> None:
    """(In each rank.) Floor, build, a first step, then the measured second step."""
    import torch
    import torch.distributed as dist

    from trainer.parallel.grid import init_grid
    from trainer.parallel.train_module import ParallelTrainModule

    torch.set_num_threads(1)
    grid = init_grid(case.tp, case.pp, timeout_s=600, expert=case.ep)
    floor = _status_kib("VmRSS") - _status_kib("RssFile")  # anonymous memory (module doc)
    floor_file = _status_kib("RssFile")
    cfg = run_config(case)
    module = ParallelTrainModule(cfg, grid)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=gen) for _ in range(2)]

    def mine(batch: torch.Tensor) -> list[torch.Tensor]:
        return list(batch.chunk(grid.dp)[grid.dp_rank].split(MICRO))

    module.train_step(mine(batches[0]), 1e-4)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS") - _status_kib("RssFile")
    start = time.perf_counter()
    result = module.train_step(mine(batches[1]), 1e-4)
    seconds = time.perf_counter() - start
    file = _status_kib("RssFile")
    peak = _status_kib("VmHWM") - file
    record = {
        "rank": grid.rank,
        "pp_rank": grid.pp_rank,
        "tp_rank": grid.tp_rank,
        "ep_rank": grid.ep_rank,
        "floor_mib": floor / 1024,
        "before_step_mib": (before - floor) / 1024,
        "measured_mib": (peak - floor) / 1024,
        "file_growth_mib": (file - floor_file) / 1024,  # not counted (module doc)
        "step_s": seconds,
        "loss": result.loss,
    }
    with open(report, "a") as f:
        f.write(json.dumps(record) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def launch(case: Case, report: Path) -> None:
    from launch.spawn import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={case.world}"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += [str(Path(__file__).resolve()), "--rank-case", json.dumps(asdict(case))]
    cmd += ["--report", str(report)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=900)


def predicted_step_s(cfg, layout) -> float:
    """The time model's prediction for one step (`plan_time.step_time`) on this machine as
    `hardware.cpu_hardware` describes it, with the scan the ranks run here (chunked)."""
    from trainer.parallel.census import pipeline_census
    from trainer.parallel.hardware import cpu_hardware
    from trainer.parallel.plan_time import step_time

    hw = cpu_hardware(layout.world)
    return step_time(cfg, layout, hw, pipeline_census(cfg.model, layout), "chunked").total


def predict(case: Case) -> dict[tuple[int, int, int], dict]:
    """(pp, tp, ep) role -> the model's breakdown and total in MiB (device 'cpu')."""
    from trainer.parallel.memory_model import rank_memory

    out = {}
    for r in rank_memory(run_config(case), layout_of(case), device="cpu"):
        parts = {k: v / 2**20 for k, v in r.breakdown().items()}
        out[(r.pp_rank, r.tp_rank, r.ep_rank)] = {**parts, "total": r.total / 2**20}
    return out


def evaluate(case: Case, out: Path) -> dict:
    report = out / f"{case.name.replace(' ', '_').replace(',', '')}.jsonl"
    report.unlink(missing_ok=True)
    launch(case, report)
    ranks = [json.loads(line) for line in report.read_text().splitlines()]
    predicted = predict(case)
    rows = []
    for r in sorted(ranks, key=lambda r: r["rank"]):
        p = predicted[(r["pp_rank"], r["tp_rank"], r["ep_rank"])]
        rows.append({**r, "predicted_mib": p["total"], "breakdown_mib": p})
    worst = max(rows, key=lambda r: abs(r["predicted_mib"] / r["measured_mib"] - 1))
    largest = max(rows, key=lambda r: r["measured_mib"])
    cfg = run_config(case)
    step_pred = predicted_step_s(cfg, layout_of(case))
    return {
        "case": asdict(case),
        "ranks": rows,
        "largest_rank": largest["rank"],
        "largest_measured_mib": largest["measured_mib"],
        "largest_predicted_mib": largest["predicted_mib"],
        "largest_error": largest["predicted_mib"] / largest["measured_mib"] - 1,
        "worst_rank_error": worst["predicted_mib"] / worst["measured_mib"] - 1,
        "step_s": max(r["step_s"] for r in rows),
        "predicted_step_s": step_pred,
    }


def table(results: list[dict]) -> str:
    base = results[0]
    lines = [
        "| layout | procs | recompute | largest rank: predicted / measured MiB | error | "
        "worst rank error | step s | step ratio to first, measured | predicted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["case"]
        ratio = r["step_s"] / base["step_s"]
        pred = "-"
        if r["predicted_step_s"] is not None and base["predicted_step_s"]:
            pred = f"{r['predicted_step_s'] / base['predicted_step_s']:.2f}"
        world = c["tp"] * c["pp"] * c["dp"]
        lines.append(
            f"| {c['name']} | {world} | {c['recompute']} | {r['largest_predicted_mib']:.0f} / "
            f"{r['largest_measured_mib']:.0f} | {100 * r['largest_error']:+.1f}% | "
            f"{100 * r['worst_rank_error']:+.1f}% | {r['step_s']:.2f} | {ratio:.2f} | {pred} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/plan-accuracy")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument(
        "--reprice",
        metavar="JSON",
        help="no runs: re-predict the step times of a plan_accuracy.json and print its table",
    )
    parser.add_argument("--rank-case", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_case:
        fields = json.loads(args.rank_case)
        return rank_main(Case(**fields), Path(args.report))
    from trainer.parallel.memory_model import MEMORY_CONSTANTS

    if args.reprice:
        payload = json.loads(Path(args.reprice).read_text())
        for r in payload["results"]:
            case = Case(**r["case"])
            r["predicted_step_s"] = predicted_step_s(run_config(case), layout_of(case))
        Path(args.reprice).write_text(json.dumps(payload, indent=1))
        print(table(payload["results"]))
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    results = []
    started = time.perf_counter()
    for case in cases:
        results.append(evaluate(case, out))
        r = results[-1]
        print(
            f"# {case.name}: largest rank {r['largest_predicted_mib']:.0f} predicted / "
            f"{r['largest_measured_mib']:.0f} measured MiB ({100 * r['largest_error']:+.1f}%), "
            f"step {r['step_s']:.2f} s",
            flush=True,
        )
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "wall_s": round(time.perf_counter() - started),
    }
    payload = {"machine": machine, "constants": MEMORY_CONSTANTS, "results": results}
    (out / "plan_accuracy.json").write_text(json.dumps(payload, indent=1))
    print(table(results))
    for name, value in MEMORY_CONSTANTS.items():
        print(f"- {name}: {value}")
    print(json.dumps(machine))


if __name__ == "__main__":
    main()
