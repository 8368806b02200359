"""Run under torchrun by test_data_ranks.py: one data-parallel rank reading the train split.

argv: DATA_DIR OUT_DIR MODE(full|first|rest|replicated|pipeline) K
Writes OUT_DIR/<mode>_rank<R>.json with the samples it read (as token lists) and, for `first`,
the loader state after K batches.
"""

import json
import os
import sys
from pathlib import Path

import torch

from data_pipeline import DataConfig, build_train_loader

data_dir, out_dir, mode, k = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rank = int(os.environ["RANK"])
replication = 2 if mode == "replicated" else 1  # both ranks as tensor-parallel peers
# pipeline: 4 ranks as pp 2 x dp 2 in Megatron's order (rank = pp_rank * 2 + dp_rank).
data_parallel = (rank % 2, 2) if mode == "pipeline" else None
loader = build_train_loader(
    DataConfig(path=data_dir, num_workers=2),
    2,
    replication=replication,
    data_parallel=data_parallel,
)
state_file = out_dir / f"state_rank{rank}.pt"
if mode == "rest":
    loader.load_state_dict(torch.load(state_file, weights_only=False))
samples = []
for i, batch in enumerate(loader):
    samples += batch.tolist()
    if mode in ("replicated", "pipeline") and i + 1 == k:
        if mode == "pipeline":
            (out_dir / f"state_pipeline_rank{rank}.json").write_text(
                json.dumps(loader.state_dict())
            )
        break
    if mode == "first" and i + 1 == k:
        torch.save(loader.state_dict(), state_file)
        break
(out_dir / f"{mode}_rank{rank}.json").write_text(json.dumps(samples))
