"""Where metrics go: metrics.jsonl, TensorBoard events, and the progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    On resume from step S, lines and events after S (written by the run that crashed after its
    last checkpoint) are dropped, so the files read as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

        self.jsonl_path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self._jsonl = open(self.jsonl_path, "a")
        self.tb = SummaryWriter(
            str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None
        )

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = [
            line
            for line in self.jsonl_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def text(self, tag: str, text: str) -> None:
        self.tb.add_text(tag, text)

    def close(self) -> None:
        self._jsonl.close()
        self.tb.flush()
        self.tb.close()


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, tokens/s and the ETA (on stderr)."""

    def __init__(self, total: int, initial: int, enabled: bool, quiet: bool = False) -> None:
        self.quiet = quiet  # ranks other than 0 of a multi-process run print nothing
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            file=sys.stderr,
            # In a log file (CI, a cluster job) every refresh is a line: refresh rarely there.
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}",
        )

    def update(self, loss: float, tokens_per_s: float, lr: float) -> None:
        self.bar.set_postfix_str(
            f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  lr {lr:.2e}", refresh=False
        )
        self.bar.update(1)

    def write(self, message: str) -> None:
        if not self.quiet:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
