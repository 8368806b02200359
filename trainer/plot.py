"""A dependency-free SVG plot of a run's loss curves (train and held-out), from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 720, 400, 56
COLOURS = {"loss": "#1f77b4", "eval/loss": "#d62728"}


def _read_series(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {key: [] for key in COLOURS}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        for key in COLOURS:
            if key in row:
                series[key].append((row["step"], row[key]))
    return {k: v for k, v in series.items() if v}


def plot_losses(run_dir: Path, out: Path | None = None) -> Path | None:
    """Write ``run_dir/loss.svg`` (steps on x, loss on y); None when nothing was logged."""
    series = _read_series(run_dir / "metrics.jsonl")
    if not series:
        return None
    points = [p for values in series.values() for p in values]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)

    def sx(x: float) -> float:
        return MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)

    def sy(y: float) -> float:
        return HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{run_dir.name}: loss</text>',
    ]
    for i in range(5):  # grid and y labels
        y = y0 + (y1 - y0) * i / 4
        parts.append(
            f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
        )
        parts.append(f'<text x="{MARGIN - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i in range(5):  # x labels
        x = x0 + (x1 - x0) * i / 4
        parts.append(
            f'<text x="{sx(x):.1f}" y="{HEIGHT - MARGIN + 18}" text-anchor="middle">{x:.0f}</text>'
        )
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">step</text>')
    for n, (key, values) in enumerate(series.items()):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(
            f'<polyline fill="none" stroke="{COLOURS[key]}" stroke-width="2" points="{path}"/>'
        )
        label = "train" if key == "loss" else "held-out"
        parts.append(
            f'<text x="{WIDTH - MARGIN - 80}" y="{MARGIN + 16 * n}" fill="{COLOURS[key]}">{label}</text>'
        )
    parts.append("</svg>")
    out = out or run_dir / "loss.svg"
    out.write_text("\n".join(parts))
    return out
