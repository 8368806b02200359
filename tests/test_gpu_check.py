"""benchmarks/gpu_check.py keeps working between GPU runs: its ``--cpu`` mode runs the same code
path (mixer/FFN comparisons, bf16 timings, TrainModule training runs) at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from arch.config import MAMBA_SCANS

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_cpu_mode_writes_json_and_markdown(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu" and data["exit_code"] == 0
    assert data["device"]["kind"] == "cpu" and data["device"]["name"]
    assert data["device"]["torch"] == torch.__version__
    # Never DeepSpeed, Ray, Megatron-core or streaming (not on the GPU machine).
    assert data["environment"]["heavy_modules_imported"] == []

    rows = {c["name"]: c for c in data["comparisons"]}
    assert data["all_comparisons_passed"] is True
    for symbol in "*MSE-":
        assert any(c["symbol"] == symbol and c["status"] == "pass" for c in rows.values()), symbol
    for c in rows.values():
        assert c["status"] in ("pass", "skipped"), c
        if c["status"] == "pass":
            assert c["output_rel"] <= c["tolerance"] and c["input_grad_rel"] <= c["tolerance"]
    assert rows["* attention, SDPA flash only"]["status"] == "pass"
    chunked = rows["M mamba, scan=chunked"]["status"]
    assert chunked == ("pass" if "chunked" in MAMBA_SCANS else "skipped")
    assert rows["M mamba, scan=cuda"]["status"] == "skipped"  # no CUDA here

    timed = [t for t in data["timings"] if t["status"] == "ok"]
    assert len(timed) == sum(c["status"] == "pass" for c in rows.values())
    assert all(t["ms_median"] > 0 for t in timed)

    runs = {r["name"]: r for r in data["training"]}
    assert any(n.startswith("jamba_125m") for n in runs) and any(
        n.startswith("dense") for n in runs
    )
    for r in runs.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["train_flops_per_token"] > 0
        assert r["timed_steps"] == 2 and r["parameters"] > 0
        assert r["mfu"] is None  # no peak for a CPU

    md = out.with_suffix(".md").read_text()
    assert "| section | item | status | figures |" in md
    for name in list(rows) + list(runs):
        assert f"| {name} |" in md


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    gpu_check = load_script()
    real = gpu_check.mixer_module

    def broken(p, plan, symbol, settings):
        if symbol == "S":
            raise RuntimeError("boom")
        return real(p, plan, symbol, settings)

    monkeypatch.setattr(gpu_check, "mixer_module", broken)
    out = tmp_path / "check.json"
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            code = gpu_check.main(["--cpu", "--sections", "compare", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert code == 1 and data["exit_code"] == 1 and data["all_comparisons_passed"] is False
    rows = {c["symbol"] + c["name"]: c for c in data["comparisons"]}
    assert rows["SS mamba2"]["status"] == "error" and "boom" in rows["SS mamba2"]["error"]
    assert rows["EE moe"]["status"] == "pass" and rows["-- mlp"]["status"] == "pass"
    assert data["timings"] == [] and data["training"] == []


def test_wheel_tags():
    fits = load_script().wheel_fits
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert fits("omegaconf-2.4.0-py3-none-any.whl")
    assert fits(f"xxhash-3.8.2-{ours}-{ours}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    assert not fits("xxhash-3.8.2-cp27-cp27mu-manylinux2014_x86_64.whl")


def test_on_cuda_the_chunked_rows_name_both_strategies():
    """On CUDA `M mamba, scan=chunked` runs the parallel strategy and one more row the sequential
    one (cpu / sequential / parallel in one table); on CPU neither is forced."""
    gpu_check = load_script()
    env = {"chunked_scan": True, "chunked_strategies": True, "mamba_ssm_kernels": False}
    on = {v.name: v for v in gpu_check.variants(SimpleNamespace(device=torch.device("cuda")), env)}
    assert on["M mamba, scan=chunked"].settings == {
        "mamba.scan": "chunked",
        "mamba.chunked_strategy": "parallel",
    }
    sequential = on["M mamba, scan=chunked, strategy=sequential"]
    assert sequential.settings["mamba.chunked_strategy"] == "sequential" and not sequential.skip
    off = {v.name: v for v in gpu_check.variants(SimpleNamespace(device=torch.device("cpu")), env)}
    assert off["M mamba, scan=chunked"].settings == {"mamba.scan": "chunked"}
    assert "M mamba, scan=chunked, strategy=sequential" not in off
