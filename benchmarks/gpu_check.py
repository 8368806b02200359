"""One prepared GPU check: numerics of every mixer/FFN on CUDA against CPU, their speed, and the
throughput / MFU / memory of single-GPU training runs (issue #17 item 2).

    python benchmarks/gpu_check.py --out gpu_check.json        # one CUDA GPU, < 8 min
    python benchmarks/gpu_check.py --cpu --out /tmp/check.json # same code path on CPU, seconds

What it measures, all written to one JSON (``--out``) and one markdown file (``--md``, default:
the JSON's path with ``.md``), rewritten after every section so a run cut short keeps its results:

1. the device (name, memory, torch / CUDA / Python versions, the bf16 peak from `arch.flops`);
2. fp32 forward + backward of every mixer/FFN built from the recipe's model config, on CUDA
   against the same seeded module on CPU: the output and the input gradient must agree to a
   relative 1e-4 (max |cuda - cpu| / max |cpu|). Rows: ``*`` attention with SDPA as is and with
   SDPA restricted to flash (flash has no fp32 kernel, so that row runs bf16 autocast and is held
   to 3e-2 in the L2 norm instead), ``M`` (Mamba-1) with the ``cpu`` scan, the ``chunked`` scan
   when `arch.config.MAMBA_SCANS` has it (on CUDA its ``parallel`` in-chunk strategy, plus a row
   ``strategy=sequential`` for the per-step loop), and the ``cuda`` scan (mamba_ssm) when it
   imports, each against the ``cpu``-scan module on CPU; ``S`` (Mamba-2), ``E`` (MoE), ``-``
   (MLP). TF32 is off for these comparisons;
3. fwd + bwd time of the same modules in bf16 autocast at the recipe's micro-batch x seq_len;
4. training: `trainer.train_module.SingleProcessTrainModule` (the step `hybridtron train` runs in one process)
   for ``configs/jamba_125m.yaml`` (once per available Mamba scan: cuda, chunked, cpu) and a
   dense ~125M attention model (the same recipe with ``model.pattern`` overridden), bf16, on
   synthetic token batches: tokens/s, TFLOP/s and MFU from `arch.flops` (FLOPs per token and the
   peak table), peak ``torch.cuda.max_memory_allocated``. The recipe is loaded by
   `launch.config.load_config` with overrides for a short run (see ``--steps``).

Exit code 0 only if every comparison passed (a comparison that cannot run here, e.g. mamba_ssm
not installed, is "skipped" and does not count) and no section failed; 1 otherwise; 2 for a
usage problem. A failing section records its error and the others still run.

Glue that is not the project's code, and why:
- ``trainer`` and ``data_pipeline`` are imported without running their package ``__init__``
  (which imports the Trainer's data loader, i.e. mosaicml-streaming): only the modules named
  here are imported, and the output lists every third-party module that was. DeepSpeed, Ray,
  Megatron-core and streaming are never imported (multi-GPU layouts need them; this check is
  single-GPU).
- `SingleProcessTrainModule` builds its model on the CPU and its bf16 autocast is ``device_type="cpu"``
  (`trainer.train_module.autocast`); the check moves the model to CUDA after the optimizer is
  built (parameters keep their identity) and wraps each ``train_step`` in CUDA bf16 autocast.

On the air-gapped GPU machine (its own Python 3.12 with a CUDA torch; nothing to download there)
the pure-Python / cp312 dependencies come along as wheels:

1. here, in the repository root: ``bash benchmarks/gpu_wheels.sh`` (downloads omegaconf, PyYAML
   and xxhash as cp312 manylinux / pure-Python wheels into ``benchmarks/wheels/``, ~1.5 MB;
   ignored by git, so the device tool needs ``carry=["benchmarks/wheels"]``);
2. copy the repository with ``benchmarks/wheels/`` to the GPU machine;
3. either install them: ``python -m pip install --no-index --find-links benchmarks/wheels
   omegaconf PyYAML xxhash`` (add ``--target DIR`` and ``PYTHONPATH=DIR`` where the system
   Python is externally managed), or do nothing: when one of them is missing the script unpacks
   the wheels of ``--wheels`` (default ``benchmarks/wheels``) into a temporary directory and
   puts it on ``sys.path`` (no pip needed);
4. ``python benchmarks/gpu_check.py --out gpu_check.json`` from the repository root.

Through the device tool (repository root, files under $OUT come back), after step 1:
    run(command='for PY in python python3; do $PY -c "import torch" 2>/dev/null && break; done;
                 $PY benchmarks/gpu_check.py --out $OUT/gpu_check.json',
        carry=["benchmarks/wheels"], timeout_s=540)
The script stops starting new work after ``--deadline-s`` (420 s) and then writes its files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RECIPE = ROOT / "configs" / "jamba_125m.yaml"
WHEELS = ROOT / "benchmarks" / "wheels"
# Modules (not packages of the project) the check needs besides torch; `gpu_wheels.sh` fetches
# their wheels: distribution name -> import name.
DEPENDENCIES = {"omegaconf": "omegaconf", "PyYAML": "yaml", "xxhash": "xxhash"}
HEAVY = ("deepspeed", "ray", "megatron", "streaming", "transformers")
SEED = 1234
FP32_TOL = 1e-4  # max |a - b| / max |b|, fp32 on both sides
# ||a - b|| / ||b||, bf16 autocast on the device against fp32 on CPU: bf16 rounding alone gives
# 4.4e-3 (output) and 7.3e-3 (input gradient) for attention at the GPU sizes (measured on CPU);
# a wrong mask or kernel gives O(1).
BF16_TOL = 3e-2
DENSE_BLOCKS = 12  # the dense model: pattern "*-" x 12 at d_model 768 (~134M with its head)


# ---- dependencies and imports ------------------------------------------------------------------
def wheel_fits(name: str) -> bool:
    """A wheel this interpreter can use: pure Python, or this CPython's tag."""
    parts = name[: -len(".whl")].split("-")
    if len(parts) < 5:
        return False
    py, platform_tag = parts[-3], parts[-1]
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    python_ok = ours in py.split(".") or any(t in ("py3", "py2.py3") for t in py.split("."))
    platform_ok = platform_tag == "any" or platform.machine() in platform_tag
    return python_ok and platform_ok


def ensure_dependencies(wheels: Path) -> dict[str, Any]:
    """Import the dependencies, unpacking ``wheels`` onto sys.path for any that is missing."""
    missing = [dist for dist, mod in DEPENDENCIES.items() if importlib.util.find_spec(mod) is None]
    report: dict[str, Any] = {"missing_before": missing, "unpacked": [], "wheelhouse": None}
    if missing and wheels.is_dir():
        tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        target = Path(tempfile.gettempdir()) / f"hybridtron_gpu_deps_{tag}"
        target.mkdir(parents=True, exist_ok=True)
        for whl in sorted(wheels.glob("*.whl")):
            if wheel_fits(whl.name):
                with zipfile.ZipFile(whl) as archive:
                    archive.extractall(target)
                report["unpacked"].append(whl.name)
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
        report["wheelhouse"] = str(wheels)
    report["still_missing"] = [
        dist for dist, mod in DEPENDENCIES.items() if importlib.util.find_spec(mod) is None
    ]
    return report


def bare_package(name: str) -> None:
    """Make ``name`` importable as a package without running its ``__init__`` (see the module
    docstring: `trainer`'s and `data_pipeline`'s import the data loader and its streaming)."""
    if name in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(ROOT / name)]
    sys.modules[name] = module


def import_project() -> types.SimpleNamespace:
    """The project modules the check drives (arch fully; trainer/data_pipeline/launch partly)."""
    bare_package("trainer")
    bare_package("data_pipeline")
    import arch
    import arch.config
    import arch.flops
    import arch.selective_scan
    import data_pipeline.corpora  # noqa: F401  (registers the datasets the recipe names)
    import data_pipeline.tokenizers  # noqa: F401  (and the tokenizers)
    import trainer.optim  # noqa: F401  (registers the optimizers, as trainer/__init__ does)
    import trainer.parallel.grid
    import trainer.schedules
    import trainer.train_module
    from launch.config import load_config

    return types.SimpleNamespace(
        build_model=arch.build_model,
        count_parameters=arch.count_parameters,
        config=arch.config,
        flops=arch.flops,
        scan=arch.selective_scan,
        lr_at=trainer.schedules.lr_at,
        TrainModule=trainer.train_module.SingleProcessTrainModule,
        Grid=trainer.parallel.grid.Grid,
        load_config=load_config,
    )


def third_party_modules() -> list[str]:
    """Top-level modules imported so far that are neither the standard library nor the project."""
    own = {"arch", "trainer", "data_pipeline", "launch", "benchmarks", "__main__"}
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return sorted(t for t in tops if t not in stdlib and t not in own and not t.startswith("_"))


# ---- sizes --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What to run: the GPU sizes, or tiny ones for ``--cpu``."""

    device: torch.device
    model_overrides: list[str]  # on top of the recipe, for every model here
    compare_batch: int
    compare_seq: int
    time_batch: int
    time_seq: int
    time_warmup: int
    time_iters: int
    train_seq: int
    train_micro: int
    train_warmup: int
    train_steps: int
    dense_overrides: list[str]
    deadline_s: float
    notes: list[str] = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.cpu:
        tiny = [
            "model.d_model=64",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.vocab_size=512",
            "model.moe.num_experts=4",
            "model.mamba2.head_dim=16",
        ]
        return Plan(
            device=torch.device("cpu"),
            model_overrides=tiny,
            compare_batch=2,
            compare_seq=16,
            time_batch=2,
            time_seq=32,
            time_warmup=1,
            time_iters=2,
            train_seq=32,
            train_micro=2,
            train_warmup=args.warmup if args.warmup is not None else 1,
            train_steps=args.steps if args.steps is not None else 2,
            dense_overrides=["model.pattern=" + "*-" * 2, "model.attention.rope=true"],
            deadline_s=args.deadline_s,
            notes=["--cpu: both sides of every comparison run on the CPU (checks the code path)"],
        )
    return Plan(
        device=torch.device("cuda"),
        model_overrides=[],
        compare_batch=2,
        compare_seq=256,
        time_batch=8,
        time_seq=2048,
        time_warmup=3,
        time_iters=10,
        train_seq=2048,
        train_micro=8,
        train_warmup=args.warmup if args.warmup is not None else 5,
        train_steps=args.steps if args.steps is not None else 30,
        dense_overrides=[
            "model.pattern=" + "*-" * DENSE_BLOCKS,
            "model.d_model=768",
            "model.n_heads=12",
            "model.n_kv_heads=12",
            "model.attention.rope=true",
        ],
        deadline_s=args.deadline_s,
    )


# ---- the report ---------------------------------------------------------------------------------
class Report:
    """The JSON document, rewritten (with its markdown) after every section."""

    def __init__(self, out: Path, md: Path, argv: list[str]) -> None:
        self.out, self.md = out, md
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": 1,
            "command": " ".join(["python", *argv]),
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": {},
            "environment": {},
            "comparisons": [],
            "timings": [],
            "training": [],
            "not_measured": [],
            "section_errors": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> tuple[bool | None, int]:
        """(every comparison passed or was skipped; None where none ran, the exit code)."""
        comparisons = self.data["comparisons"]
        passed = (
            all(c["status"] in ("pass", "skipped") for c in comparisons) if comparisons else None
        )
        failed_elsewhere = any(
            r["status"] == "error" for r in self.data["timings"] + self.data["training"]
        )
        ok = passed is not False and not failed_elsewhere and not self.data["section_errors"]
        return passed, 0 if ok else 1

    def write(self) -> None:
        passed, code = self.summary()
        self.data["all_comparisons_passed"] = passed
        self.data["exit_code"] = code
        self.data["wall_s"] = round(self.elapsed(), 1)
        self.data["environment"]["heavy_modules_imported"] = [m for m in HEAVY if m in sys.modules]
        self.data["environment"]["third_party_modules"] = third_party_modules()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out)
        self.md.write_text(markdown(self.data))


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
    where = " | ".join(line.strip().replace("\n", " ") for line in tail[:-1])
    return f"{type(exc).__name__}: {exc}"[:600] + (f" (at {where[-400:]})" if where else "")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- section 1: the device ----------------------------------------------------------------------
def device_info(plan: Plan, p: types.SimpleNamespace | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kind": plan.device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            total_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["name"] = f"CPU ({platform.processor() or platform.machine()})"
    if p is not None:
        info["peak_bf16_tflops"] = p.flops.peak_tflops(None)
    return info


def environment(p: types.SimpleNamespace) -> dict[str, Any]:
    scans = list(p.config.MAMBA_SCANS)
    kernels, problem = None, None
    try:  # arch.selective_scan catches ImportError / OSError; a broken build may raise more
        kernels = p.scan.cuda_kernels() if torch.cuda.is_available() else None
    except Exception as exc:
        problem = error_text(exc)
    return {
        "mamba_scans": scans,
        "chunked_scan": "chunked" in scans,
        # model.mamba.chunked_strategy (sequential | parallel) exists in this checkout
        "chunked_strategies": hasattr(p.config, "CHUNKED_STRATEGIES"),
        "mamba_ssm_kernels": kernels is not None,
        "mamba_ssm_import_error": problem,
        "flash_sdp_enabled": bool(torch.backends.cuda.flash_sdp_enabled()),
        "installed": {
            m: importlib.util.find_spec(m) is not None
            for m in ("deepspeed", "megatron", "ray", "streaming", "mamba_ssm", "causal_conv1d")
        },
    }


# ---- section 2 and 3: mixers and FFNs -----------------------------------------------------------
@dataclass
class Variant:
    name: str  # row label
    symbol: str
    settings: dict[str, str]  # the device-side module's model config (dotted keys under model.)
    ref_settings: dict[str, str]  # the CPU reference's
    reference: str  # in words
    flash_only: bool = False  # SDPA restricted to flash, bf16 autocast (no fp32 flash kernel)
    skip: str | None = None  # why this variant cannot run here


def variants(plan: Plan, env: dict[str, Any]) -> list[Variant]:
    same = "same module on CPU, fp32"
    out = [
        Variant("* attention, sdpa", "*", {}, {}, same),
        Variant("* attention, SDPA flash only", "*", {}, {}, "sdpa on CPU, fp32", flash_only=True),
    ]
    cuda = plan.device.type == "cuda"
    strategies = env["chunked_strategies"]
    for scan in ("cpu", "chunked", "cuda"):
        skip = None
        settings = {"mamba.scan": scan}
        if scan == "chunked" and cuda and strategies:
            settings["mamba.chunked_strategy"] = "parallel"  # what auto picks on CUDA, named
        if scan == "chunked" and not env["chunked_scan"]:
            skip = "arch.config.MAMBA_SCANS has no 'chunked' scan in this checkout"
        if scan == "cuda" and plan.device.type != "cuda":
            skip = "the cuda scan needs a CUDA device"
        elif scan == "cuda" and not env["mamba_ssm_kernels"]:
            skip = "mamba_ssm / causal_conv1d are not importable (no cuda scan kernels)"
        out.append(
            Variant(
                f"M mamba, scan={scan}",
                "M",
                settings,
                {"mamba.scan": "cpu"},
                "scan=cpu on CPU, fp32",
                skip=skip,
            )
        )
        if scan == "chunked" and cuda and strategies:
            # The CPU strategy on the GPU: one table then compares cpu / sequential / parallel.
            out.append(
                Variant(
                    "M mamba, scan=chunked, strategy=sequential",
                    "M",
                    {"mamba.scan": "chunked", "mamba.chunked_strategy": "sequential"},
                    {"mamba.scan": "cpu"},
                    "scan=cpu on CPU, fp32",
                    skip=skip,
                )
            )
    out += [
        Variant("S mamba2", "S", {}, {}, same),
        Variant("E moe", "E", {}, {}, same),
        Variant("- mlp", "-", {}, {}, same),
    ]
    return out


def mixer_base(p: types.SimpleNamespace, plan: Plan):
    """The recipe's model config (loaded and validated once), with RoPE on as in the dense model
    (Jamba's attention has none)."""
    if not hasattr(p, "mixer_base"):
        overrides = [*plan.model_overrides, "model.attention.rope=true"]
        p.mixer_base = p.load_config(str(RECIPE), overrides, world_size=1, note=None).model
    return p.mixer_base


def mixer_module(p: types.SimpleNamespace, plan: Plan, symbol: str, settings: dict[str, str]):
    """The mixer/FFN of a one-symbol model built (and validated) from the recipe and ``SEED``."""
    cfg = copy.deepcopy(mixer_base(p, plan))
    cfg.pattern = symbol
    for key, value in settings.items():
        *path, last = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return p.build_model(cfg, seed=SEED).layers[0].inner, cfg


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 means fp32: no TF32 in matmuls or cuDNN convolutions (restored afterwards)."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def run_context(device: torch.device, bf16: bool, flash: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
    if bf16:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    return stack


def fwd_bwd(
    module: torch.nn.Module,
    x: torch.Tensor,
    gy: torch.Tensor,
    context: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(output, input gradient, parameter gradients) of sum(module(x) * gy), as fp32 on CPU."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with context():
        y = module(x)
    (y.float() * gy).sum().backward()
    grads = {
        n: q.grad.detach().float().cpu() for n, q in module.named_parameters() if q.grad is not None
    }
    return y.detach().float().cpu(), x.grad.detach().float().cpu(), grads


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(p, plan: Plan, v: Variant) -> tuple[dict[str, Any], torch.nn.Module | None]:
    row: dict[str, Any] = {
        "name": v.name,
        "symbol": v.symbol,
        "device_config": {f"model.{k}": val for k, val in v.settings.items()},
        "reference": v.reference,
        "shape": [plan.compare_batch, plan.compare_seq],
    }
    if v.skip:
        return {**row, "status": "skipped", "why": v.skip}, None
    ref, cfg = mixer_module(p, plan, v.symbol, v.ref_settings)
    dev, _ = mixer_module(p, plan, v.symbol, v.settings)
    ref_state, dev_state = ref.state_dict(), dev.state_dict()
    same = ref_state.keys() == dev_state.keys() and all(
        torch.equal(ref_state[k], dev_state[k]) for k in ref_state
    )
    if not same:
        raise RuntimeError("the seeded device and reference modules differ before the check")
    dev = dev.to(plan.device)
    row["shape"].append(cfg.d_model)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(plan.compare_batch, plan.compare_seq, cfg.d_model, generator=gen)
    gy = torch.randn(plan.compare_batch, plan.compare_seq, cfg.d_model, generator=gen)
    with no_tf32():
        y_ref, gx_ref, gp_ref = fwd_bwd(ref, x, gy, contextlib.nullcontext)
        y_dev, gx_dev, gp_dev = fwd_bwd(
            dev,
            x.to(plan.device),
            gy.to(plan.device),
            lambda: run_context(plan.device, bf16=v.flash_only, flash=v.flash_only),
        )
    param_rel = {n: rel_max(gp_dev[n], g) for n, g in gp_ref.items() if n in gp_dev}
    worst = max(param_rel, key=param_rel.get) if param_rel else None
    if v.flash_only:
        metric, tol, measure = "||a-b||/||b|| (bf16 autocast)", BF16_TOL, rel_l2
    else:
        metric, tol, measure = "max|a-b|/max|b| (fp32)", FP32_TOL, rel_max
    out_err, gx_err = measure(y_dev, y_ref), measure(gx_dev, gx_ref)
    row.update(
        metric=metric,
        tolerance=tol,
        output_rel=out_err,
        input_grad_rel=gx_err,
        output_rel_max=rel_max(y_dev, y_ref),
        input_grad_rel_max=rel_max(gx_dev, gx_ref),
        param_grad_rel_max=param_rel.get(worst) if worst else None,
        param_grad_worst=worst,
        status="pass" if out_err <= tol and gx_err <= tol and math.isfinite(out_err) else "fail",
    )
    if set(gp_ref) != set(gp_dev):
        row["status"] = "fail"
        row["why"] = f"parameters with gradients differ: {sorted(set(gp_ref) ^ set(gp_dev))}"
    del ref
    return row, dev


def time_module(plan: Plan, v: Variant, module: torch.nn.Module) -> dict[str, Any]:
    d_model = module._gpu_check_d_model  # set from the comparison's config
    row: dict[str, Any] = {
        "name": v.name,
        "symbol": v.symbol,
        "dtype": "bf16 autocast (weights fp32)",
        "shape": [plan.time_batch, plan.time_seq, d_model],
    }
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(plan.time_batch, plan.time_seq, d_model, generator=gen).to(plan.device)
    gy = torch.randn(plan.time_batch, plan.time_seq, d_model, generator=gen).to(plan.device)
    x.requires_grad_(True)
    times = []
    for i in range(plan.time_warmup + plan.time_iters):
        module.zero_grad(set_to_none=True)
        x.grad = None
        synchronize(plan.device)
        start = time.perf_counter()
        with run_context(plan.device, bf16=True, flash=v.flash_only):  # no copies timed
            y = module(x)
        (y.float() * gy).sum().backward()
        synchronize(plan.device)
        if i >= plan.time_warmup:
            times.append((time.perf_counter() - start) * 1e3)
    module.zero_grad(set_to_none=True)
    row.update(
        status="ok",
        ms_median=round(statistics.median(times), 3),
        ms_min=round(min(times), 3),
        iters=len(times),
        warmup=plan.time_warmup,
    )
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- section 4: training ------------------------------------------------------------------------
@dataclass
class TrainSpec:
    name: str
    overrides: list[str]
    micro_batch: int | None = None  # None: the plan's train_micro
    recompute: str = "none"
    short: bool = False  # memory rows: 1 warm-up + 2 timed steps (peak memory is what they are for)


def train_specs(plan: Plan, env: dict[str, Any]) -> list[TrainSpec]:
    """Jamba with the preferred scan (cuda, else chunked, else cpu), the dense model, Jamba's peak
    memory at other micro-batches / recomputation, then Jamba with the other scans (the time
    budget cuts from the end)."""
    scans = []
    if plan.device.type == "cuda" and env["mamba_ssm_kernels"]:
        scans.append("cuda")
    if env["chunked_scan"]:
        scans.append("chunked")
    scans.append("cpu")
    specs = [TrainSpec(f"jamba_125m, scan={scans[0]}", [f"model.mamba.scan={scans[0]}"])]
    blocks = plan.dense_overrides[0].split("=", 1)[1].count("*")
    specs.append(TrainSpec(f"dense {blocks}x(*-)", plan.dense_overrides))
    # Peak memory at other micro-batches and recomputation settings: the data points that
    # `hybridtron plan`'s activation model is checked against on a GPU (issue #16 item 6).
    scan = [f"model.mamba.scan={scans[0]}"]
    half = max(1, plan.train_micro // 2)
    for micro, recompute in (
        (half, "none"),
        (plan.train_micro, "selective"),
        (plan.train_micro, "full"),
    ):
        name = f"jamba_125m, scan={scans[0]}, micro {micro}, recompute {recompute}"
        specs.append(TrainSpec(name, scan, micro, recompute, short=True))
    specs += [TrainSpec(f"jamba_125m, scan={s}", [f"model.mamba.scan={s}"]) for s in scans[1:]]
    return specs


def train(p, plan: Plan, spec: TrainSpec, report: Report) -> dict[str, Any]:
    warmup, timed = (1, 2) if spec.short else (plan.train_warmup, plan.train_steps)
    steps = warmup + timed
    micro = spec.micro_batch or plan.train_micro
    run_overrides = [
        f"trainer.max_steps={steps}",
        f"trainer.seq_len={plan.train_seq}",
        f"trainer.micro_batch_size={micro}",
        f"trainer.global_batch_size={micro}",
        f"parallel.recompute={spec.recompute}",
        "trainer.precision=bf16",
        "trainer.progress=false",
        f"optim.warmup_steps={max(1, plan.train_warmup)}",
    ]
    overrides = [*plan.model_overrides, *spec.overrides, *run_overrides]
    row: dict[str, Any] = {
        "name": spec.name,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "overrides": overrides,
        "data": "synthetic: uniform random token ids, no document masking (eos_id None)",
        "warmup_steps": warmup,
        "timed_steps": timed,
        "recompute": spec.recompute,
    }
    device = plan.device
    cfg = p.load_config(str(RECIPE), overrides, world_size=1, note=None)
    t = cfg.trainer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    module = p.TrainModule(
        cfg, p.Grid.one_process()
    )  # model on the CPU, optimizer over its parameters
    module.model.to(device)  # in place: the optimizer's parameters are the same objects
    outer = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and t.precision == "bf16"
        else contextlib.nullcontext()
    )
    gen = torch.Generator().manual_seed(SEED)
    vocab = cfg.model.vocab_size
    batches = [
        torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1), generator=gen).to(device)
        for _ in range(4)
    ]
    tokens_per_step = t.micro_batch_size * t.seq_len
    row.update(
        parameters=module.num_params,
        train_flops_per_token=module.train_flops_per_token,
        tokens_per_step=tokens_per_step,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
    )
    losses: list[float] = []
    start = None
    done = 0
    for step in range(steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        lr = p.lr_at(step, t.max_steps, cfg.optim)
        with outer:
            out = module.train_step([batches[step % len(batches)]], lr)
        losses.append(out.loss)
        if step >= warmup:
            done += 1
        if report.elapsed() > plan.deadline_s and step + 1 < steps:
            row["cut_short"] = (
                f"time budget ({plan.deadline_s:.0f} s) reached after step {step + 1}"
            )
            break
    synchronize(device)
    if start is None or done == 0:
        raise RuntimeError("no timed step ran (time budget)")
    elapsed = time.perf_counter() - start
    tokens_per_s = done * tokens_per_step / elapsed
    tflops = tokens_per_s * module.train_flops_per_token / 1e12
    peak = p.flops.peak_tflops(None)
    row.update(
        status="ok" if all(math.isfinite(v) for v in losses) else "error",
        timed_steps=done,
        step_s=round(elapsed / done, 4),
        tokens_per_s=round(tokens_per_s, 1),
        tflops_per_s=round(tflops, 3),
        peak_tflops=peak,
        mfu=round(tflops / peak, 4) if peak else None,
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    if row["status"] == "error":
        row["why"] = "non-finite loss"
    if device.type == "cuda":
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    del module, batches
    return row


# ---- markdown -----------------------------------------------------------------------------------
def fmt(value: Any, spec: str = ".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def row_md(*cells: Any) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(data: dict[str, Any]) -> str:
    dev = data["device"]
    lines = [
        f"# GPU check: {dev.get('name', '?')}",
        "",
        f"torch {dev.get('torch')}, CUDA {dev.get('cuda')}, Python {dev.get('python')}; "
        f"started {data['started_utc']}, {data.get('wall_s')} s; "
        f"all comparisons passed: {'yes' if data.get('all_comparisons_passed') else 'NO'}; "
        f"exit code {data.get('exit_code')}.",
        "",
        "| section | item | status | figures |",
        "|---|---|---|---|",
    ]
    for c in data["comparisons"]:
        if c["status"] == "skipped":
            figures = c.get("why", "")
        elif "output_rel" in c:
            figures = (
                f"out {fmt(c['output_rel'])}, dx {fmt(c['input_grad_rel'])} "
                f"(tol {fmt(c['tolerance'], '.0e')}, {c['metric']}; vs {c['reference']}); "
                f"worst param grad {fmt(c.get('param_grad_rel_max'))}"
            )
        else:
            figures = c.get("error", "")
        shape = "x".join(str(s) for s in c.get("shape", []))
        lines.append(row_md(f"compare {shape}", c["name"], c["status"], figures))
    for r in data["timings"]:
        shape = "x".join(str(s) for s in r.get("shape", []))
        figures = (
            f"{r['ms_median']:.2f} ms fwd+bwd (median of {r['iters']}), bf16 autocast"
            if r["status"] == "ok"
            else r.get("error", r.get("why", ""))
        )
        lines.append(row_md(f"time {shape}", r["name"], r["status"], figures))
    for r in data["training"]:
        if r.get("status") == "ok":
            mfu = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") is not None else "MFU -"
            mem = (
                f", {r['max_memory_allocated_gib']} GiB peak"
                if "max_memory_allocated_gib" in r
                else ""
            )
            figures = (
                f"{r['parameters'] / 1e6:.1f}M params, {r['tokens_per_s']:,.0f} tok/s, "
                f"{r['tflops_per_s']:.1f} TFLOP/s, {mfu}{mem}; "
                f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                f"({r['timed_steps']} steps after {r['warmup_steps']})"
            )
        else:
            figures = r.get("error", r.get("why", ""))
        seq = f"{r.get('micro_batch_size', '?')}x{r.get('seq_len', '?')}"
        lines.append(row_md(f"train bf16 {seq}", r["name"], r.get("status"), figures))
    for n in data["not_measured"]:
        lines.append(row_md("not measured", n["what"], "skipped", n["why"]))
    for e in data["section_errors"]:
        lines.append(row_md("section error", e["section"], "error", e["error"]))
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write")
    ap.add_argument("--md", type=Path, default=None, help="markdown (default: --out with .md)")
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (a test)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (GPU: 30)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (GPU: 5)")
    ap.add_argument(
        "--sections",
        default="compare,timing,train",
        help="comma-separated subset of compare,timing,train",
    )
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=420.0,
        help="no new section (or training step) starts after this many seconds",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (--cpu: 1)")
    ap.add_argument("--wheels", type=Path, default=WHEELS, help="wheelhouse for missing deps")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    command = ["benchmarks/gpu_check.py", *argv]
    report = Report(args.out, args.md or args.out.with_suffix(".md"), command)
    plan = make_plan(args)
    data = report.data
    data["mode"] = "cpu" if args.cpu else "gpu"
    data["notes"] = plan.notes
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        data["device"] = device_info(types.SimpleNamespace(device=torch.device("cpu")), None)
        data["section_errors"].append(
            {"section": "device", "error": "no CUDA device visible to torch; use --cpu"}
        )
        report.write()
        log("no CUDA device visible to torch (use --cpu for the CPU code path)")
        return 2
    torch.manual_seed(SEED)
    if args.threads or args.cpu:
        # --cpu: one thread; on a shared, loaded machine more threads only spin (4x the CPU time)
        torch.set_num_threads(args.threads or 1)
    data["environment"]["dependencies"] = ensure_dependencies(args.wheels)
    try:
        p = import_project()
    except Exception as exc:  # without the project there is nothing to check
        data["device"] = device_info(plan, None)
        problem = error_text(exc)
        still = data["environment"]["dependencies"]["still_missing"]
        if still:
            problem += (
                f"; missing {', '.join(still)}: run `bash benchmarks/gpu_wheels.sh` where pip can "
                f"download and bring {args.wheels} along (device tool: carry=['benchmarks/wheels'])"
            )
        data["section_errors"].append({"section": "import", "error": problem})
        report.write()
        log(f"cannot import the project: {problem}")
        return 1
    data["device"] = device_info(plan, p)
    env = environment(p)
    data["environment"].update(env)
    missing = [m for m in ("deepspeed", "megatron", "ray") if not env["installed"][m]]
    data["not_measured"].append(
        {
            "what": "multi-GPU layouts (DeepSpeed ZeRO, Megatron-core TP, pipeline), Ray launch",
            "why": "single-GPU check; never imported here"
            + (f" (not installed on this machine: {', '.join(missing)})" if missing else ""),
        }
    )
    data["not_measured"].append(
        {
            "what": "the Trainer's data path (mosaicml-streaming shards)",
            "why": "training runs on synthetic token batches through TrainModule",
        }
    )
    report.write()
    log(f"device {data['device'].get('name')}, torch {torch.__version__}; env {env}")

    modules: dict[str, tuple[Variant, torch.nn.Module]] = {}
    if "compare" in sections or "timing" in sections:
        for v in variants(plan, env):
            if report.elapsed() > plan.deadline_s:
                data["comparisons"].append(
                    {"name": v.name, "symbol": v.symbol, "status": "error", "error": "time budget"}
                )
                continue
            try:
                row, module = compare(p, plan, v)
            except Exception as exc:
                row, module = {"name": v.name, "symbol": v.symbol, "status": "error"}, None
                row["error"] = error_text(exc)
                free_memory()
            data["comparisons"].append(row)
            if module is not None:
                module._gpu_check_d_model = row["shape"][-1]
                modules[v.name] = (v, module)
            log(
                f"compare {v.name}: {row['status']} "
                f"{ {k: row[k] for k in ('output_rel', 'input_grad_rel') if k in row} }"
                + (f" {row.get('error') or row.get('why')}" if row["status"] != "pass" else "")
            )
            report.write()
        if "compare" not in sections:
            data["comparisons"] = []  # timing alone: the comparisons only built the modules
    if "timing" in sections:
        for name, (v, module) in modules.items():
            if report.elapsed() > plan.deadline_s:
                data["timings"].append({"name": name, "status": "skipped", "why": "time budget"})
                continue
            try:
                row = time_module(plan, v, module)
            except Exception as exc:
                row = {"name": name, "symbol": v.symbol, "status": "error"}
                row["error"] = error_text(exc)
            data["timings"].append(row)
            log(f"time {name}: {row.get('ms_median', row.get('error'))} ms")
            report.write()
    modules.clear()
    free_memory()
    if "train" in sections:
        for spec in train_specs(plan, env):
            if report.elapsed() > plan.deadline_s:
                data["training"].append(
                    {"name": spec.name, "status": "skipped", "why": "time budget"}
                )
                continue
            log(f"train {spec.name} ...")
            try:
                row = train(p, plan, spec, report)
            except Exception as exc:
                row = {"name": spec.name, "status": "error", "error": error_text(exc)}
            free_memory()
            data["training"].append(row)
            log(
                f"train {spec.name}: {row.get('status')} "
                f"{row.get('tokens_per_s', row.get('error'))} tok/s, mfu {row.get('mfu')}"
            )
            report.write()
    report.write()
    passed, code = report.summary()
    log(f"wrote {report.out} and {report.md}; comparisons passed: {passed}; exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
