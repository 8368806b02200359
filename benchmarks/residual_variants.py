"""Residual variants and the PC layer at equal tokens: plain, tmm, adamw residuals and plain + pc.

    .venv/bin/python benchmarks/residual_variants.py [--steps 300] [--seeds 1 2] [--out DIR]

Trains the same small model (pattern ``*-*-*-*-``, d_model 64, 4 heads, byte tokenizer, seq_len
64, 16 sequences per step) on the embedded stdlib corpus (300 kB, as ``configs/tiny.yaml``) with
each variant and seed through the real Trainer, on one thread. Writes ``residual_variants.md``
(final train loss = mean of the last 10 steps, held-out loss, parameters, seconds per step) and
``residual_variants.svg`` (train loss, mean over seeds, 10-step moving average) into ``--out``
(default ``benchmarks/results``). A smoke-scale comparison: the papers' gaps were measured at
124M-1B parameters and billions of tokens; at this scale differences are within seed noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from launch.config import load_config
from trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "plain": [],
    "tmm": ["model.residual.name=tmm"],
    "adamw": ["model.residual.name=adamw"],
    "plain+pc": ["model.preconditioner.name=pc"],
}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def run(name: str, seed: int, steps: int, work: Path) -> dict:
    overrides = [
        "model.pattern=*-*-*-*-",
        "model.d_model=64",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        f"data.path={REPO}/runs/data/bench-residual-variants-64",
        f"trainer.run_dir={work / f'{name}-s{seed}'}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        "trainer.micro_batch_size=16",
        "trainer.global_batch_size=16",
        f"trainer.eval_every={steps}",
        "trainer.eval_batches=8",
        "trainer.checkpoint_every=0",
        "trainer.log_every=10",
        "trainer.progress=false",
        "trainer.threads=1",
        f"optim.warmup_steps={max(1, steps // 10)}",
        *VARIANTS[name],
    ]
    cfg = load_config("tiny", overrides)
    start = time.perf_counter()
    result = Trainer(cfg, log=lambda *a: None).fit()
    seconds = time.perf_counter() - start
    losses = [result.losses[s] for s in sorted(result.losses)]
    from arch import build_model, count_parameters

    return {
        "variant": name,
        "seed": seed,
        "losses": losses,
        "final": statistics.fmean(losses[-10:]),
        "eval": result.eval_loss,
        "params": count_parameters(build_model(cfg.model)),
        "s_per_step": seconds / steps,
    }


def moving_average(values: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def svg(curves: dict[str, list[float]], title: str) -> str:
    w, h, m = 720, 400, 56
    ys = [y for c in curves.values() for y in c]
    n = max(len(c) for c in curves.values())
    y0, y1 = min(ys), max(ys)
    sx = lambda i: m + i / max(1, n - 1) * (w - 2 * m)  # noqa: E731
    sy = lambda y: h - m - (y - y0) / max(1e-9, y1 - y0) * (h - 2 * m)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
    ]
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{m}" x2="{w - m}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{m - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        x = (n - 1) * i / 4
        out.append(
            f'<text x="{sx(x):.1f}" y="{h - m + 18}" text-anchor="middle">{x + 1:.0f}</text>'
        )
    out.append(f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">step</text>')
    for k, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{sx(i):.1f},{sy(y):.1f}" for i, y in enumerate(curve))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        out.append(f'<text x="{w - m - 90}" y="{m + 16 * k}" fill="{colour}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            for seed in args.seeds:
                row = run(name, seed, args.steps, Path(tmp))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)

    table = [
        f"{args.steps} steps x 16 x 64 tokens, seeds {args.seeds}; final = mean train loss of the "
        "last 10 steps; mean ± spread (max - min) over seeds.",
        "",
        "| variant | params | final train loss | held-out loss | s/step |",
        "|---|---:|---:|---:|---:|",
    ]
    curves = {}
    for name in args.variants:
        mine = [r for r in rows if r["variant"] == name]
        final = [r["final"] for r in mine]
        evals = [r["eval"] for r in mine]
        table.append(
            f"| {name} | {mine[0]['params']:,} | {statistics.fmean(final):.4f} ± "
            f"{max(final) - min(final):.4f} | {statistics.fmean(evals):.4f} ± "
            f"{max(evals) - min(evals):.4f} | {statistics.fmean(r['s_per_step'] for r in mine):.3f} |"
        )
        mean_curve = [statistics.fmean(c) for c in zip(*(r["losses"] for r in mine), strict=True)]
        curves[name] = moving_average(mean_curve)
    (args.out / "residual_variants.md").write_text("\n".join(table) + "\n")
    (args.out / "residual_variants.svg").write_text(
        svg(curves, f"train loss (mean of {len(args.seeds)} seeds, 10-step average)")
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
