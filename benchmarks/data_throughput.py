"""Data pipeline throughput: prepare-data over 1..N workers, and the loader vs what training eats.

    .venv/bin/python benchmarks/data_throughput.py [--max-bytes 3000000] [--workers 1 2]
        [--repeats 5] [--loader-workers 0 1] [--loader-batches 300] [--measure-training] [--record]

1. ``prepare_data`` on the embedded stdlib corpus (``--max-bytes`` characters of it) into a
   temporary directory, with ``data.workers`` = each of ``--workers`` (1 is always included), for
   the byte tokenizer and for a byte-level BPE tokenizer (``train_bpe``, ``--vocab-size`` 4096,
   trained on ``--bpe-train-bytes`` of the same corpus). The BPE tokenizer runs twice: ``bpe`` as
   ``hybridtron prepare-data`` gets it (Hugging Face ``tokenizers`` spreads ``encode_batch`` over
   its own thread pool in every worker, so one worker already uses every core) and ``bpe-1t``
   with ``TOKENIZERS_PARALLELISM=false`` (one thread per worker process, which isolates the
   scaling of ``data.workers``). Each measurement runs in a process forked for it, as a fresh
   CLI process would (``tokenizers`` turns its pool off in processes forked after their parent
   used it). Tokens are the packed tokens of the manifest (both splits); tokens/s is over the
   whole call, writing the zstd MDS shards included. Every measurement prepares into a fresh
   directory: the data fingerprint does not include ``data.workers``, so with ``overwrite=True``
   over the same directory the second call would be a no-op.
2. ``build_train_loader`` over the prepared byte data (``--seq-len`` 256, ``--micro-batch`` 8,
   shuffle on) with each of ``--loader-workers``: tokens/s (micro_batch x seq_len per batch, as
   training counts them) over ``--loader-batches`` batches after one warm-up batch, against the
   training consumption of the default run: the median ``tokens_per_s`` of the newest run in
   ``runs/default/metrics.jsonl`` (step 1, a one-step window with the warm-up, left out), or,
   without that file or with ``--measure-training``, 5 timed steps of ``SingleProcessTrainModule`` with
   ``configs/default.yaml`` on random batches. The target is loader >= 20x training.

Configurations run interleaved, ``--repeats`` times each; the best repeat is reported (the
machine is shared, so the minimum time is the least disturbed). CPU s of a prepare-data call is
the user + system time of its process and its workers: above wall s means several cores worked.
Prints a JSON line per measurement; ``--record`` writes the tables into the "Data pipeline
throughput" section of benchmarks/RESULTS.md (replacing it if present).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from data_pipeline import (
    DATASETS,
    DataConfig,
    build_train_loader,
    prepare_data,
    release_loader,
    train_bpe,
)
from data_pipeline.sources import IngestReport

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Data pipeline throughput"
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
TARGET_RATIO = 20.0


def cpu_seconds() -> float:
    """User + system time of this process (all threads) and its reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def stdlib_documents(max_bytes: int | None):
    cfg = DataConfig(dataset="stdlib", max_bytes=max_bytes)
    return DATASETS.get("stdlib")().documents(cfg, IngestReport())


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a forked child, so that every measurement starts like a CLI process.

    Hugging Face ``tokenizers`` turns its thread pool off in processes forked after the parent
    used it; measured in one process, whichever call came first would decide how the later
    ones' workers run. This process never encodes with the pool; each measurement is a child.
    """
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def target() -> None:
        try:
            send.send((True, fn(*args)))
        except BaseException as exc:
            send.send((False, f"{type(exc).__name__}: {exc}"))

    child = ctx.Process(target=target)
    child.start()
    ok, result = receive.recv()
    child.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in the child process: {result}")
    return result


def train_bpe_on_stdlib(max_bytes: int, vocab_size: int, output: Path) -> None:
    train_bpe(stdlib_documents(max_bytes), vocab_size, output)


def prepare_once(tokenizer: dict, workers: int, args, path: Path) -> dict:
    """One prepare_data call into a fresh ``path``: wall and CPU seconds, tokens."""
    shutil.rmtree(path, ignore_errors=True)
    cfg = DataConfig(
        path=str(path),
        dataset="stdlib",
        max_bytes=args.max_bytes,
        workers=workers,
        tokenizer=tokenizer["name"],
        tokenizer_path=tokenizer["path"],
    )
    saved = os.environ.pop("TOKENIZERS_PARALLELISM", None)  # "bpe": the library's default
    if tokenizer["single_thread"]:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        cpu, start = cpu_seconds(), time.perf_counter()
        prepared = prepare_data(cfg, args.seq_len, overwrite=True, progress=False)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    assert not prepared.up_to_date, "prepare_data reused existing data; the timing is void"
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "tokens": prepared.manifest["tokens"],
        "characters": prepared.manifest["characters"],
        "documents": prepared.manifest["documents"],
    }


def loader_once(data_path: Path, num_workers: int, args) -> dict:
    """Tokens/s the training loader delivers over ``args.loader_batches`` batches."""
    cfg = DataConfig(path=str(data_path), shuffle=True, num_workers=num_workers)
    loader = build_train_loader(cfg, args.micro_batch)
    try:
        batches = iter(loader)
        next(batches)  # warm-up: worker start, first shard opened
        tokens = 0
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            batch = next(batches)
            tokens += batch.shape[0] * (batch.shape[1] - 1)
        wall = time.perf_counter() - start
        del batches  # shuts the worker processes down
    finally:
        release_loader(loader)
    return {"seconds": wall, "tokens": tokens}


def training_from_metrics(metrics: Path) -> dict | None:
    """Median tokens_per_s of the newest run in a metrics.jsonl (lines after its last step 1)."""
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "tokens_per_s" in r]
    starts = [i for i, r in enumerate(records) if r.get("step") == 1]
    newest = records[starts[-1] :] if starts else records
    windows = [r["tokens_per_s"] for r in newest if r.get("step") != 1] or [
        r["tokens_per_s"] for r in newest
    ]
    if not windows:
        return None
    return {
        "tokens_per_s": statistics.median(windows),
        "source": f"median of {len(windows)} logged windows in {metrics.relative_to(REPO)}",
    }


def training_measured(steps: int) -> dict:
    """Tokens/s of ``steps`` optimizer steps of the default config on random batches."""
    from launch.config import load_config
    from trainer.config import grad_accumulation_steps
    from trainer.parallel.grid import Grid
    from trainer.rng import seed_everything
    from trainer.train_module import SingleProcessTrainModule

    cfg = load_config(str(DEFAULT_CONFIG), [])
    t = cfg.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    module = SingleProcessTrainModule(cfg, Grid.one_process())
    accum = grad_accumulation_steps(cfg, 1)

    def micro_batches() -> list[torch.Tensor]:
        shape = (t.micro_batch_size, t.seq_len + 1)
        return [torch.randint(0, cfg.model.vocab_size, shape) for _ in range(accum)]

    module.train_step(micro_batches(), cfg.optim.lr)  # warm-up
    batches = [micro_batches() for _ in range(steps)]
    start = time.perf_counter()
    for step_batches in batches:
        module.train_step(step_batches, cfg.optim.lr)
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": steps * t.global_batch_size * t.seq_len / seconds,
        "source": f"{steps} timed SingleProcessTrainModule steps of configs/default.yaml on random batches "
        f"({t.global_batch_size} x {t.seq_len} tokens, {torch.get_num_threads()} threads)",
    }


def best(runs: list[dict]) -> dict:
    top = min(runs, key=lambda r: r["seconds"])
    return {
        **top,
        "tokens_per_s": top["tokens"] / top["seconds"],
        "median_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in runs),
    }


def emit(record: dict) -> None:
    print(
        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}),
        flush=True,
    )


def markdown(args, prepare: list[dict], loaders: list[dict], training: dict, extra: dict) -> str:
    prepare_text = (
        f"`prepare_data` on {extra['characters'] / 1e6:.1f} MB of the stdlib corpus "
        f"({extra['documents']} documents, seq_len {args.seq_len}, zstd MDS shards), best of "
        f"{args.repeats}, {os.cpu_count()} CPU cores (1-minute load average {extra['load'][0]:.1f} "
        f"at the start, {extra['load'][1]:.1f} at the end). `bpe`: byte-level BPE, vocab "
        f"{args.vocab_size}, trained on {args.bpe_train_bytes / 1e6:.1f} MB of the same corpus, "
        "with `tokenizers`' own thread pool (the default); `bpe-1t`: the same with "
        "`TOKENIZERS_PARALLELISM=false`, one thread per worker. CPU s: this process and its "
        "workers; above wall s means more than one core worked."
    )
    loader_text = (
        f"`build_train_loader` over the prepared byte data (micro_batch {args.micro_batch}, "
        f"seq_len {args.seq_len}, shuffle on), {args.loader_batches} batches after one warm-up "
        f"batch, best of {args.repeats}, against training at {training['tokens_per_s']:,.0f} "
        f"tokens/s ({training['source']}); target >= {TARGET_RATIO:.0f}x:"
    )
    lines = [
        f"{SECTION} (`benchmarks/data_throughput.py`)",
        textwrap.fill(prepare_text, 100),
        "",
        "| tokenizer | data.workers | tokens | wall s | CPU s | tokens/s | speed-up over 1 worker |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in prepare:
        lines.append(
            f"| {r['tokenizer']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.2f} | "
            f"{r['cpu_seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['speedup_over_1_worker']:.2f}x |"
        )
    lines += [
        "",
        textwrap.fill(loader_text, 100),
        "",
        "| data.num_workers | tokens/s | x training |",
        "|---:|---:|---:|",
    ]
    for r in loaders:
        lines.append(
            f"| {r['num_workers']} | {r['tokens_per_s']:,.0f} | {r['ratio_to_training']:,.0f}x |"
        )
    return "\n".join(lines) + "\n"


def record(section: str) -> None:
    """Replace the section in RESULTS.md (up to the next ``## `` heading), or append it."""
    lines = RESULTS.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION)), None)
    if start is None:
        text = "".join(lines).rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=3_000_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--bpe-train-bytes", type=int, default=3_000_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--training-steps", type=int, default=5)
    parser.add_argument(
        "--measure-training",
        action="store_true",
        help="time SingleProcessTrainModule steps even when runs/default/metrics.jsonl exists",
    )
    parser.add_argument("--record", action="store_true", help="write into benchmarks/RESULTS.md")
    args = parser.parse_args()
    workers = sorted({1, *args.workers})

    load_before = os.getloadavg()[0]  # other work on the machine shows up here
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        in_fresh_process(train_bpe_on_stdlib, args.bpe_train_bytes, args.vocab_size, tmp / "bpe")
        emit({"bpe_training_s": time.perf_counter() - start, "vocab_size": args.vocab_size})
        tokenizers = [
            {"label": "byte", "name": "byte", "path": None, "single_thread": False},
            {"label": "bpe", "name": "hf", "path": str(tmp / "bpe"), "single_thread": False},
            {"label": "bpe-1t", "name": "hf", "path": str(tmp / "bpe"), "single_thread": True},
        ]
        # Warm-up here (imports, zstd, the page cache), inherited by every measuring child; the
        # BPE one single-threaded, which leaves the tokenizers thread pool unused in this process.
        warm = argparse.Namespace(**{**vars(args), "max_bytes": 200_000})
        prepare_once(tokenizers[0], 1, warm, tmp / "warm-up")
        prepare_once(tokenizers[2], 1, warm, tmp / "warm-up")

        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeats):
            for tok in tokenizers:
                for w in workers:
                    path = tmp / f"{tok['label']}-w{w}"
                    result = in_fresh_process(prepare_once, tok, w, args, path)
                    runs.setdefault((tok["label"], w), []).append(result)
        prepare = []
        for tok in tokenizers:
            one = best(runs[(tok["label"], 1)])
            for w in workers:
                row = best(runs[(tok["label"], w)])
                row = {
                    "stage": "prepare",
                    "tokenizer": tok["label"],
                    "workers": w,
                    **row,
                    "speedup_over_1_worker": row["tokens_per_s"] / one["tokens_per_s"],
                }
                prepare.append(row)
                emit(row)

        data = tmp / "byte-w1"  # prepared byte data from the last repeat
        loader_runs: dict[int, list[dict]] = {}
        for _ in range(args.repeats):
            for nw in args.loader_workers:
                loader_runs.setdefault(nw, []).append(loader_once(data, nw, args))

        training = None
        if not args.measure_training:
            from launch.config import load_config

            run_dir = Path(load_config(str(DEFAULT_CONFIG), []).trainer.run_dir)
            training = training_from_metrics(
                (run_dir if run_dir.is_absolute() else REPO / run_dir) / "metrics.jsonl"
            )
        if training is None:
            training = training_measured(args.training_steps)
        emit({"stage": "training", **training})

        loaders = []
        for nw in args.loader_workers:
            row = best(loader_runs[nw])
            ratio = row["tokens_per_s"] / training["tokens_per_s"]
            row = {
                "stage": "loader",
                "num_workers": nw,
                **row,
                "training_tokens_per_s": training["tokens_per_s"],
                "ratio_to_training": ratio,
                "meets_target": ratio >= TARGET_RATIO,
            }
            loaders.append(row)
            emit(row)

    load = (load_before, os.getloadavg()[0])
    emit({"load_average_1min_start": load[0], "load_average_1min_end": load[1]})
    byte = next(r for r in prepare if r["tokenizer"] == "byte")
    section = markdown(args, prepare, loaders, training, {**byte, "load": load})
    if args.record:
        record(section)
        print(f"recorded in {RESULTS.relative_to(REPO)}", flush=True)


if __name__ == "__main__":
    main()
