"""One rank of the two-"node" object-store test (tests/test_checkpoint_remote.py).

In one process group (start-up dominates on 2 cores): (1) the uninterrupted run, both ranks
staging in one run directory; (2) rank 0 removes the run's last checkpoint from the store, as if
the job was lost before that upload; (3) the same run resumed with a run directory per rank
(nodes without a shared volume). Rank 0 prints the CLI's summary after each run.

    RANK=r WORLD_SIZE=2 ... python -m tests.store_nodes_worker WHOLE NODE_DIR LAST key=value...
"""

from __future__ import annotations

import faulthandler
import sys
import warnings

warnings.simplefilter("ignore")

from launch.cli import _print_summary  # noqa: E402
from launch.config import load_config  # noqa: E402
from trainer import Trainer  # noqa: E402
from trainer.checkpoint.remote import S3Checkpoints  # noqa: E402
from trainer.parallel.grid import destroy_grid, init_grid  # noqa: E402


def main() -> None:
    whole, node, last, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    faulthandler.dump_traceback_later(240, exit=True)  # a mismatched collective hangs on gloo
    grid = None
    for run_dir in (whole, node):
        cfg = load_config(None, [*overrides, f"trainer.run_dir={run_dir}"], 2, note=None)
        p = cfg.parallel
        grid = grid or init_grid(p.tensor, p.pipeline, p.timeout_s, p.expert)
        result = Trainer(cfg, grid=grid).fit()
        if grid.is_main:
            _print_summary(cfg, result, ["train"])
            print("[worker] run done", flush=True)
        if run_dir == whole and grid.is_main:
            store = S3Checkpoints(str(cfg.trainer.checkpoint_dir))
            for key in store._objects(last):
                store.client.delete_object(Bucket=store.bucket, Key=key)
        grid.barrier("wait for the store's last checkpoint to go")
    destroy_grid()


if __name__ == "__main__":
    main()
