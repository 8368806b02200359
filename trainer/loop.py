"""The Trainer: data -> steps -> metrics -> evaluation -> checkpoints, resumable exactly.

Everything that decides the next step's numbers is in a checkpoint: weights, optimizer moments,
the step counter (the LR schedule is a pure function of it), every RNG, and the data loader's
position; so N steps equal N/2 steps + resume + N/2 steps, bit for bit (fp32, same machine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arch.config import ModelConfig
from arch.flops import peak_tflops
from arch.registry import UserError
from data_pipeline import (
    build_train_loader,
    check_prepared,
    data_tokenizer,
    load_eval_set,
    prepare_data,
    release_loader,
)
from data_pipeline.prepare import MANIFEST
from trainer import checkpoint as ckpt
from trainer import exit_codes
from trainer.checkpoint.background import BackgroundSave
from trainer.checkpoint.format import FORMAT, manifest_of, tmp_dir
from trainer.checkpoint.remote import S3Checkpoints, is_remote
from trainer.config import RunConfig, grad_accumulation_steps
from trainer.launch_dir import PREEMPT_NOTICE, launch_file, note_reported
from trainer.metrics import MetricsLogger, ProgressBar
from trainer.parallel.grid import Grid
from trainer.plot import plot_losses
from trainer.rng import rng_state, seed_everything, set_rng_state
from trainer.run_lock import WAIT_S as RUN_LOCK_WAIT_S
from trainer.run_lock import RunDirLock
from trainer.schedules import lr_at
from trainer.train_module_base import TrainModule, build_train_module


def config_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_config_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg.model))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, of this process's steps
    eval_loss: float | None = None
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None
    plot: Path | None = None  # loss.svg
    preempted: bool = False  # stopped by SIGTERM/SIGUSR1 after checkpointing


PREEMPT_FILE = "PREEMPT"  # in trainer.run_dir: asks a run to checkpoint and stop, like SIGTERM
NOTICE_WINDOW_S = 5.0  # a signal this soon after a notice is the same request, not a second one


class PeerReported(UserError):
    """This rank stops on an error another rank (global rank 0) reports for the whole job."""

    quiet = True  # the CLI prints nothing for it: one line per job, not one per rank


class PreemptionWatcher:
    """Turns SIGTERM / SIGUSR1 (what schedulers send before killing a job) into a flag.

    The loop finishes the step it is in, writes a checkpoint and stops, so a pre-empted job loses
    at most one step and resumes exactly. A second signal acts at once, for a step that cannot
    finish: the handler installed before gets it, and where that is the default action the
    process exits 75 (`exit_codes.STOPPED_WITHOUT_CHECKPOINT`) instead of dying by the signal,
    whose 143 would claim a checkpoint. A request from a notice file counts as a first signal only
    once ``NOTICE_WINDOW_S`` have passed: the launcher writes its notice for the same SIGTERM that
    may reach this process directly too. Only the main thread can install handlers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, notice: Path | None = None) -> None:
        self.requested = False
        self.signal_name = ""
        launcher = launch_file(PREEMPT_NOTICE)  # `--nproc-per-node`'s notice (launch.spawn)
        self.notices = [n for n in (notice, launcher) if n is not None]
        self.writing: Path | None = None  # a partial checkpoint to remove when stopping at once
        self._signalled = False
        self._noticed_at: float | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        noticed = self._noticed_at is not None
        if self._signalled or (noticed and time.monotonic() - self._noticed_at > NOTICE_WINDOW_S):
            self._act_at_once(signum)  # a second signal: the step is not finishing
            return
        self._signalled = self.requested = True
        self.signal_name = signal.Signals(signum).name

    def _act_at_once(self, signum: int) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if previous is signal.SIG_IGN:
            return
        if previous not in (signal.SIG_DFL, None):
            signal.raise_signal(signum)  # a handler someone installed before us
            return
        if self.writing is not None:
            shutil.rmtree(self.writing, ignore_errors=True)
        name = signal.Signals(signum).name
        code = exit_codes.STOPPED_WITHOUT_CHECKPOINT
        os.write(
            2,
            f"hybridtron: a second {name}: stopping at once, without a checkpoint of the current "
            f"step (exit {code}); completed checkpoints are kept\n".encode(),
        )
        os._exit(code)

    def check(self) -> bool:
        """A signal arrived, or a notice file appeared: `PREEMPT_FILE`, which the job's driver
        creates where no signal can reach the trainer (Ray Train runs it off the main thread),
        or the launcher's notice."""
        if not self.requested:
            for notice in self.notices:
                if notice.exists():
                    self.requested, self._noticed_at = True, time.monotonic()
                    self.signal_name = self._notice_name(notice)
                    break
        return self.requested

    @staticmethod
    def _notice_name(notice: Path) -> str:
        if notice.name == PREEMPT_FILE:
            return f"{PREEMPT_FILE} file"
        try:  # the launcher writes the signal it got
            return notice.read_text().strip() or "launcher notice"
        except OSError:
            return "launcher notice"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """Drives the TrainModule that `build_train_module` picks for ``grid`` (a multi-process
    launch's; the one-process grid when none is given), without knowing which. Only global
    rank 0 logs, plots and writes the shared checkpoint files."""

    def __init__(self, cfg: RunConfig, *, log=print, grid: Grid | None = None) -> None:
        self.cfg = cfg
        self.grid = grid or Grid.one_process()
        self.main = self.grid.is_main
        self.log = log if self.main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.trainer.run_dir)
        # Checkpoints are written (staged) locally; with an s3:// checkpoint_dir each complete
        # one is then uploaded there (trainer/checkpoint/remote.py).
        where = cfg.trainer.checkpoint_dir
        remote = where is not None and is_remote(where)
        self.checkpoints_dir = Path(where) if where and not remote else self.run_dir / "checkpoints"
        self.remote = S3Checkpoints(where) if remote else None
        # Which ranks stage checkpoints (`_find_stagers`): decided at the first checkpoint
        # operation, a collective. Without a store, rank 0 as always.
        self._stager: bool | None = None if remote and self.grid.world > 1 else self.main
        self._per_node = False  # the store is the only place a whole checkpoint exists
        self._background: BackgroundSave | None = None  # the checkpoint being written, if any
        self.accum = grad_accumulation_steps(cfg, world_size=self.grid.world)

    # ---- set-up -------------------------------------------------------------------------
    def _ensure_data(self) -> dict:
        data = self.cfg.data
        if (
            self.main
            and not (Path(data.path) / MANIFEST).exists()
            and data.prepare_if_missing
            and not data.remote
            and not data.sources
        ):
            self.log(
                f"[data] preparing {data.dataset!r} with tokenizer {data.tokenizer!r} into {data.path}"
            )
            prepared = prepare_data(
                data, self.cfg.trainer.seq_len, progress=self.cfg.trainer.progress
            )
            m = prepared.manifest
            self.log(
                f"[data] {m['documents']} documents, {m['characters'] / 1e6:.1f}M characters -> "
                f"{m['splits']['train']['samples']} train / {m['splits']['eval']['samples']} eval samples "
                f"in {m['seconds']} s"
            )
        self.grid.barrier()  # the other ranks wait for rank 0 to prepare the data
        return check_prepared(data, self.cfg.trainer.seq_len, self.cfg.model.vocab_size)

    def _resume_point(self) -> ckpt.Checkpoint | None:
        t = self.cfg.trainer
        if t.resume_from and str(t.resume_from).startswith("s3://"):
            return self._fetch_resume_from(str(t.resume_from))
        if t.resume_from:
            return ckpt.verify_checkpoint(t.resume_from)
        if t.resume:
            self._fetch_remote()
            found = ckpt.find_latest_checkpoint(self.checkpoints_dir)
            if found is None and (self.run_dir / "metrics.jsonl").exists():
                # Never restart over an earlier run without saying so.
                self.log(
                    f"[resume] {self.run_dir} has metrics but no complete checkpoint "
                    f"(interrupted writes are ignored): starting from step 0"
                )
            return found
        if ckpt.list_checkpoints(self.checkpoints_dir):
            raise UserError(
                f"{self.checkpoints_dir} holds checkpoints but trainer.resume=false; use a new "
                f"trainer.run_dir to start over (nothing is overwritten)"
            )
        return None

    def _find_stagers(self) -> None:
        """Which ranks stage checkpoints for the store (collective; once per run).

        Ranks whose staging directory is the same (one node's disk, or a file system they all
        mount) need one copy of a checkpoint there, written and fetched by one rank: the
        lowest rank of each (host, staging path) group, unless it sees rank 0's staging too
        (a shared file system, checked through a file rank 0 writes). Several stagers mean
        node-local staging: each stages and uploads its node's part and only the store holds
        whole checkpoints."""
        if self._stager is not None:
            return
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        key = (socket.gethostname(), str(self.checkpoints_dir.resolve()))
        mark = uuid.uuid4().hex if self.main else None
        seen = self.grid.gather((key, mark), "find the ranks that share a staging directory")
        first = min(r for r, (k, _) in enumerate(seen) if k == key)
        token = self.checkpoints_dir / f".staging-{seen[0][1]}"  # a new name: no stale lookup
        if self.main:
            token.write_text("rank 0")
        self.grid.barrier("share rank 0's staging mark")
        shares_main = token.exists()
        self._stager = first == self.grid.rank and (self.main or not shares_main)
        stagers = self.grid.gather(self._stager, "count the staging directories")
        self._per_node = sum(stagers) > 1
        if self.main:
            token.unlink()
            if self._per_node:
                self.log(f"[checkpoint] {sum(stagers)} node-local staging directories")

    def _fetch_remote(self) -> None:
        """With an object store: rank 0 finds its newest complete checkpoint, and each
        staging directory without that one (or a newer) gets it downloaded by its stager (one
        rank per node, or rank 0 alone over a shared file system); the other ranks wait."""
        if self.remote is None:
            return
        self._find_stagers()
        newest, failure = None, None
        if self.main:
            try:
                done = self.remote.complete()
                newest = done[-1] if done else None
            except Exception as exc:  # botocore's errors: connection, credentials, bucket
                failure = self._store_failure(exc)
        newest, failure = self.grid.gather((newest, failure), "share the store's newest")[0]
        if failure is None and newest is not None and self._stager:
            try:
                local = ckpt.completed_checkpoints(self.checkpoints_dir)
                if not local or local[-1].name < newest:
                    self.log(f"[resume] downloading {self.remote.url}/{newest}")
                    self.remote.download(newest, self.checkpoints_dir)
            except ckpt.CheckpointError as exc:
                failure = str(exc)
            except Exception as exc:
                failure = self._store_failure(exc)
        failed = [f for f in self.grid.gather(failure, "wait for the checkpoint download") if f]
        if failed:
            if not self.main:
                raise PeerReported(failed[0])
            raise ckpt.CheckpointError(failed[0])

    def _fetch_resume_from(self, url: str) -> ckpt.Checkpoint:
        """``trainer.resume_from=s3://...``: rank 0 downloads the checkpoint into its cache
        (`remote.fetch_checkpoint`: verified, an intact earlier copy reused); ranks that cannot
        see that copy (another node's disk) get one on their node, fetched by the lowest such
        rank there first. A failure is one line from rank 0, every rank stopping."""
        from trainer.checkpoint.remote import fetch_checkpoint

        def fetch() -> tuple[ckpt.Checkpoint | None, str | None]:
            try:
                return fetch_checkpoint(url), None
            except ckpt.CheckpointError as exc:
                return None, str(exc)

        def agree(failure: str | None, what: str) -> None:
            failed = [f for f in self.grid.gather(failure, what) if f]
            if failed and not self.main:
                raise PeerReported(failed[0])
            if failed:
                raise ckpt.CheckpointError(failed[0])

        found, failure = fetch() if self.main else (None, None)
        agree(failure, "download the checkpoint to resume from")
        path = self.grid.gather(None if found is None else str(found.path), "share its path")[0]
        if found is None and Path(path).is_dir():  # rank 0's copy: a file system they share
            found = ckpt.verify_checkpoint(path)
        # The rest: the lowest rank of each host downloads, then the others reuse its copy.
        host = socket.gethostname() if found is None else None
        hosts = self.grid.gather(host, "find the ranks without rank 0's copy")
        if host is not None and hosts.index(host) == self.grid.rank:
            found, failure = fetch()
        agree(failure, "download the checkpoint on every node")
        if found is None:
            found, failure = fetch()
            if failure:
                raise ckpt.CheckpointError(failure)
        return found

    def _store_failure(self, exc: Exception) -> str:
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        assert self.remote is not None
        return (
            f"cannot read the checkpoint store {self.remote.url} ({cause}); check "
            f"AWS_ENDPOINT_URL, the credentials and the bucket"
        )

    def _upload_per_node(self, module: TrainModule, step: int, known: dict[str, dict]) -> None:
        """Node-local staging: each stager uploads its node's part of ``step_N.tmp`` and
        removes it; rank 0 then writes the manifest of every part to the store (the complete
        marker), points ``latest`` at it and prunes the store. A failure stops every rank
        with one line; the store's previous checkpoints stay complete."""
        assert self.remote is not None
        name, tmp = ckpt.step_dir_name(step), tmp_dir(self.checkpoints_dir, step)
        failure, files = None, {}
        if self._stager:
            try:
                files = manifest_of(tmp, step, None, known)["files"]
                self.remote.upload_files(tmp, name, sorted(files))
            except Exception as exc:  # botocore's errors: connection, credentials, bucket
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        parts = self.grid.gather((files, failure), f"share checkpoint {step}'s parts")
        failure = next((f for _, f in parts if f), None)
        if failure is None and self.main:
            files = dict(sorted((k, v) for part, _ in parts for k, v in part.items()))
            manifest: dict = {"format": FORMAT, "step": step, "files": files}
            if module.checkpoint_layout is not None:
                manifest["layout"] = module.checkpoint_layout
            try:
                self.remote.commit(name, json.dumps(manifest, indent=2).encode())
                self.remote.prune(self.cfg.trainer.keep_checkpoints)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failed = [f for f in self.grid.gather(failure, f"commit checkpoint {step}") if f]
        if self._stager:  # the parts are in the store, or the checkpoint is abandoned
            shutil.rmtree(tmp, ignore_errors=True)
            ckpt.prune_checkpoints(self.checkpoints_dir, self.cfg.trainer.keep_checkpoints)
        if failed:
            raise ckpt.CheckpointWriteError(
                f"uploading checkpoint {name} to {self.remote.url} failed ({failed[0]}); the "
                f"store's previous checkpoints are intact. Fix the store (endpoint, "
                f"credentials, bucket), then run the same command: it resumes from the newest "
                f"of them"
            )

    def _upload(self, module: TrainModule, step: int) -> None:
        """Rank 0 uploads completed checkpoint ``step`` and prunes the store; a failure stops
        every rank with one line (the local copy and the previous remote checkpoint stay)."""
        if self.remote is None:
            return
        failure = None
        path = self.checkpoints_dir / ckpt.step_dir_name(step)
        if self.main:
            try:
                self.remote.upload(path)
                self.remote.prune(self.cfg.trainer.keep_checkpoints)
            except Exception as exc:  # botocore's errors: connection, credentials, bucket
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failed = [f for f in self.grid.gather(failure, f"share checkpoint {step}'s upload") if f]
        if failed:
            raise ckpt.CheckpointWriteError(
                f"uploading checkpoint {path.name} to {self.remote.url} failed ({failed[0]}); "
                f"the local copy {path} is complete and the store's previous checkpoints are "
                f"intact. Fix the store (endpoint, credentials, bucket), then run the same "
                f"command: it resumes from the local copy"
            )

    def _check_compatible(self, checkpoint: ckpt.Checkpoint) -> None:
        # The checkpoint's model config over today's defaults: fields added since it was
        # written take their default (which builds the same model) instead of counting as a change.
        try:
            theirs = OmegaConf.to_container(
                OmegaConf.merge(
                    OmegaConf.structured(ModelConfig), checkpoint.config.get("model", {})
                )
            )
        except OmegaConfBaseException as exc:
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint.path} has a model config this version cannot read ({exc})"
            ) from None
        ours = model_config_dict(self.cfg)
        diffs = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if diffs:
            detail = ", ".join(
                f"model.{k}: {theirs.get(k)!r} in the checkpoint, {ours.get(k)!r} now"
                for k in diffs
            )
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint.path} was written for another model ({detail}); "
                f"use the same model config or another trainer.run_dir"
            )

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        # First, so that a signal while the data or the model is being prepared is honoured
        # after the first step instead of killing the process without a checkpoint.
        preemption = PreemptionWatcher(self.run_dir / PREEMPT_FILE)
        lock = None
        try:
            lock = self._lock_run_dir()
            return self._fit(preemption)
        except UserError as exc:
            if self.main and not isinstance(exc, PeerReported):
                note_reported(str(exc))  # the launcher adds no line of its own
            raise
        except OSError as exc:  # e.g. metrics.jsonl on a full disk (checkpoints: see _save)
            if ckpt.is_disk_full(exc, self.run_dir):
                free = ckpt.free_bytes(self.run_dir)
                raise UserError(
                    f"disk full: no space left on device in {self.run_dir} "
                    f"({ckpt.human_bytes(free or 0)} free) while writing {exc.filename or 'a file'};"
                    f" free space there, then {ckpt.what_resumes(self.checkpoints_dir)}"
                ) from None
            raise
        finally:
            preemption.restore()
            if lock is not None:
                lock.release()

    def _lock_run_dir(self) -> RunDirLock | None:
        """One trainer per run directory: global rank 0 takes the lock, every rank learns
        whether it got it."""
        lock, error = None, None
        if self.main:
            lock = RunDirLock(self.run_dir)
            try:
                lock.acquire(wait_s=RUN_LOCK_WAIT_S)
            except UserError as exc:
                lock, error = None, exc
        self._stop_if_any_failed(error)
        return lock

    def _fit(self, preemption: PreemptionWatcher) -> TrainResult:
        cfg, t = self.cfg, self.cfg.trainer
        if t.threads:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed)
        manifest = self._ensure_data()
        self.tokenizer = data_tokenizer(cfg.data)  # saved into every checkpoint
        resume = self._resume_point()

        module = self._build_module(resume)
        self.train_flops_per_token = module.train_flops_per_token
        self.peak_tflops = peak_tflops(t.peak_tflops)
        if cfg.data.document_masking:
            module.eos_id = self.tokenizer.eos_id
        loader = build_train_loader(
            cfg.data, t.micro_batch_size, data_parallel=self.grid.data_partition
        )
        eval_set = load_eval_set(cfg.data, t.eval_batches * t.micro_batch_size)
        step, tokens = 0, 0
        if resume is not None:
            state = ckpt.CheckpointReader(resume).trainer_state()
            step, tokens = state["step"], state["tokens"]
            if "data" in state:  # imported weights (import-hf, merge-pc) start the data afresh
                loader.load_state_dict(state["data"])
            rng = module.saved_rng(resume, state)
            if rng is not None:
                set_rng_state(rng)
            self.log(f"[resume] from {resume.path} at step {step}{self._layout_change(resume)}")

        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_yaml(cfg))
        metrics = MetricsLogger(self.run_dir, step) if self.main else NullMetrics()
        if step == 0 and self.main:
            metrics.text("config", "```\n" + config_yaml(cfg) + "\n```")
            self.log(
                f"[model] {module.num_params / 1e6:.2f}M parameters, pattern {cfg.model.pattern!r}; "
                f"data {manifest['splits']['train']['tokens'] / 1e6:.1f}M train tokens; "
                f"{t.global_batch_size} x {t.seq_len} tokens per step ({self.accum} micro-batches); "
                f"{self.train_flops_per_token / 1e6:.1f} MFLOP per token (fwd+bwd)"
                + (f"; {module.layout}" if module.layout else "")
            )
        result = TrainResult(
            run_dir=self.run_dir, step=step, resumed_from=resume.path if resume else None
        )
        bar = ProgressBar(t.max_steps, step, t.progress and self.main, quiet=not self.main)
        batches = self._batches(loader)
        tokens_per_step = t.global_batch_size * t.seq_len
        window_start, window_tokens = time.perf_counter(), 0
        stop = t.stop_at_step or t.max_steps
        notice = self.run_dir / PREEMPT_FILE
        if self.main:
            notice.unlink(missing_ok=True)  # a notice the previous run already honoured
        self.grid.barrier()
        try:
            while step < stop:
                lr = lr_at(step, t.max_steps, cfg.optim)
                micro_batches = [next(batches) for _ in range(self.accum)]
                # The auxiliary metrics are gathered over the ranks only when they are logged.
                logged = (step + 1) % t.log_every == 0 or step == 0 or step + 1 == stop
                out = module.train_step(micro_batches, lr, gather_metrics=logged)
                step, tokens = step + 1, tokens + tokens_per_step
                window_tokens += tokens_per_step
                result.losses[step] = out.loss
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                bar.update(out.loss, tps, lr)
                # One collective a step: a signal may reach the ranks at different steps, and
                # a stage's gradient norm may blow up alone (DeepSpeed then skips every step).
                # ... which also tells whether a background checkpoint is still being written.
                writing = self._background is not None and self._background.writing()
                preempted, diverged, writing = self.grid.any_rank(
                    preemption.check(), _diverged(out), writing
                )
                if diverged:
                    raise self._divergence_error(out, step)
                if self._background is not None and not writing:
                    result.last_checkpoint = self._finish_background(module)
                if step % t.log_every == 0 or step == 1 or step == stop:
                    metrics.log(
                        step,
                        {
                            "loss": out.loss,
                            "lr": lr,
                            "grad_norm": out.grad_norm,
                            "tokens": tokens,
                            "tokens_per_s": tps,
                            **self._perf(tokens, tps),
                            **out.metrics,  # e.g. MoE aux losses and expert loads
                        },
                    )
                    window_start, window_tokens = time.perf_counter(), 0
                last = step == stop
                if last or (t.eval_every and step % t.eval_every == 0):
                    result.eval_loss = module.eval_loss(eval_set, t.micro_batch_size)
                    metrics.log(step, {"eval/loss": result.eval_loss})
                    bar.write(f"[eval] step {step}: held-out loss {result.eval_loss:.4f}")
                if last or preempted or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    if self._background is not None:  # at most one save in flight
                        result.last_checkpoint = self._finish_background(module)
                    if t.checkpoint_async and not (last or preempted):
                        self._save_in_background(module, loader, step, tokens)
                    else:
                        result.last_checkpoint = self._save(
                            module, loader, step, tokens, preemption
                        )
                if preempted and self.main:
                    notice.unlink(missing_ok=True)  # honoured: a resumed run goes on
                if preempted and not last:
                    result.preempted = True
                    bar.write(
                        f"[preempted] {preemption.signal_name} at step {step}: checkpoint "
                        f"{result.last_checkpoint}; run the same command again to resume"
                    )
                    break
        finally:
            if self._background is not None:  # stopped by an error: let its writer end
                self._background.wait()
            bar.close()
            metrics.close()
            batches.close()
            release_loader(loader)
        result.plot = plot_losses(self.run_dir) if self.main else None
        result.step = step
        return result

    def _perf(self, tokens: int, tokens_per_s: float) -> dict[str, float]:
        """Training FLOPs so far (to plot loss against compute), TFLOP/s and, with a peak, MFU."""
        tflops = tokens_per_s * self.train_flops_per_token / 1e12
        perf = {"flops": tokens * self.train_flops_per_token, "perf/tflops_per_s": tflops}
        if self.peak_tflops:  # the peak is per device; the throughput is the whole job's
            perf["perf/mfu"] = tflops / (self.peak_tflops * self.grid.world)
        return perf

    def _batches(self, loader) -> Iterator[torch.Tensor]:
        """Micro-batches forever: a new epoch starts when the shards run out."""
        while True:
            produced = False
            try:
                for batch in loader:
                    produced = True
                    yield batch
            # What mosaicml-streaming's reader threads raise when a shard cannot be read.
            except (RuntimeError, ValueError, OSError) as exc:
                raise UserError(
                    f"reading the training shards in {self.cfg.data.path} failed ({exc}); check the "
                    f"files or prepare the data again (hybridtron prepare-data --overwrite)"
                ) from exc
            if not produced:
                raise UserError(
                    f"the training split of {self.cfg.data.path} yields no batch of "
                    f"{self.cfg.trainer.micro_batch_size}; use more data or a smaller micro batch"
                )

    def _build_module(self, resume: ckpt.Checkpoint | None) -> TrainModule:
        if resume is not None:
            self._check_compatible(resume)
        return build_train_module(self.cfg, self.grid, resume)

    def _layout_change(self, resume: ckpt.Checkpoint) -> str:
        theirs, ours = resume.layout or {"tp": 1, "pp": 1, "dp": 1}, self.grid.layout
        if theirs == ours:
            return ""
        fmt = "tp {tp} x pp {pp} x dp {dp}"
        return f" (resharded from {fmt.format(**theirs)} to {fmt.format(**ours)})"

    def _divergence_error(self, out, step: int) -> UserError:
        """What to do about a non-finite loss or gradient norm, saying only what is true of
        this run."""
        if not self.main:
            return PeerReported(f"training diverged at step {step}")
        if not math.isfinite(out.loss):
            what = f"loss is {out.loss}"
        elif math.isinf(out.grad_norm):
            what = f"gradient norm is {out.grad_norm} (loss {out.loss:.4f})"
        else:
            what = "loss or gradient norm is not finite on another rank"
        t, lr = self.cfg.trainer, self.cfg.optim.lr
        done = ckpt.completed_checkpoints(self.checkpoints_dir)
        fix = f"Lower optim.lr (now {lr:g}; e.g. optim.lr={lr / 10:g})"
        if t.precision != "fp32":
            fix += f" or use trainer.precision=fp32 (now {t.precision})"
        if done:
            where = (
                f"then resume from the newest checkpoint, written before the loss diverged: "
                f"trainer.resume_from={done[-1]}"
            )
        else:
            where = "no checkpoint was written before it, so start again with that change"
        return UserError(f"{what} at step {step}: training diverged. {fix}; {where}")

    def _stop_if_any_failed(self, error: UserError | None) -> None:
        """Every rank stops when any rank raised ``error``: global rank 0 reports it, the others
        stop quietly (one line per job). A collective, so every rank must call it."""
        message = None if error is None else str(error)
        messages = self.grid.gather(message, "share the ranks' errors")
        first = next((m for m in messages if m), None)
        if first is None:
            return
        if not self.main:
            raise PeerReported(first)
        raise error if error is not None else UserError(first)

    def _save(
        self, module: TrainModule, loader, step: int, tokens: int, preemption: PreemptionWatcher
    ) -> Path:
        """Write checkpoint ``step`` through the module, the same way for every layout.

        Every rank writes its state into step_N.tmp; rank 0 adds the shared files, hashes
        everything and renames the directory once all ranks are done. Each phase ends with the
        ranks sharing their write errors (instead of a barrier), so a full disk on any rank
        stops every rank with one line and no partial checkpoint.
        """
        state = {"step": step, "tokens": tokens, "rng": rng_state(), "data": loader.state_dict()}
        tmp = self.checkpoints_dir / (ckpt.step_dir_name(step) + ".tmp")
        preemption.writing = tmp  # a second signal mid-write removes it (a failure ends the run)
        self._begin(module, step)

        def write_state() -> None:
            module.save_state(tmp)
            if self.main:
                ckpt.write_shared(tmp, state, config_yaml(self.cfg), self.tokenizer.save)

        self._agree_written(module, step, write_state, every_rank=True)
        preemption.writing = None
        return self._complete(module, step, {})

    def _begin(self, module: TrainModule, step: int) -> None:
        """A fresh ``step_N.tmp`` in every staging directory (rank 0's alone unless staging
        is node-local: `_find_stagers`)."""
        self._find_stagers()
        self._agree_written(
            module, step, lambda: ckpt.begin_checkpoint(self.checkpoints_dir, step), self._stager
        )

    def _complete(self, module: TrainModule, step: int, known: dict[str, dict]) -> Path:
        """Complete written checkpoint ``step`` (``known``: hashes the writers computed):
        locally then in the store, or, with node-local staging, in the store only."""
        if self._per_node:
            self._upload_per_node(module, step, known)
            return self.checkpoints_dir / ckpt.step_dir_name(step)

        def finish() -> None:
            layout = module.checkpoint_layout
            ckpt.finish_checkpoint(self.checkpoints_dir, step, layout, known)
            ckpt.prune_checkpoints(self.checkpoints_dir, self.cfg.trainer.keep_checkpoints)

        self._agree_written(module, step, finish)
        self._upload(module, step)
        return self.checkpoints_dir / ckpt.step_dir_name(step)

    def _save_in_background(self, module: TrainModule, loader, step: int, tokens: int) -> None:
        """Checkpoint ``step`` as `_save` writes it, from a host-memory snapshot taken now, by a
        background thread; `_finish_background` completes it once every rank's writer is done."""
        state = {"step": step, "tokens": tokens, "rng": rng_state(), "data": loader.state_dict()}
        tmp = self.checkpoints_dir / (ckpt.step_dir_name(step) + ".tmp")
        self._begin(module, step)
        write_rank = module.prepare_save(copy=True)
        yaml, tokenizer = config_yaml(self.cfg), self.tokenizer.save

        def write() -> list[str]:
            written = write_rank(tmp)
            if self.main:  # the shared files are small: completing the checkpoint hashes them
                ckpt.write_shared(tmp, state, yaml, tokenizer)
            return written

        self._background = BackgroundSave(step, tmp, write)

    def _finish_background(self, module: TrainModule) -> Path:
        """Wait for this rank's background writer, share the ranks' write errors (a failure
        stops every rank with one line, as a synchronous save's does) and complete the
        checkpoint; returns it."""
        background, self._background = self._background, None
        assert background is not None
        step = background.step
        self._agree_written(module, step, background.result, every_rank=True)
        known: dict[str, dict] = {}
        for hashes in self.grid.gather(background.hashes, f"share checkpoint {step}'s hashes"):
            known.update(hashes)
        return self._complete(module, step, known)

    def _agree_written(
        self, module: TrainModule, step: int, write, every_rank: bool | None = False
    ) -> None:
        """Run ``write`` (on rank 0 only unless ``every_rank``: True, or whether this rank
        should), then stop every rank if it failed on any: rank 0 removes the partial
        checkpoint and reports the failure."""
        failure = None
        if every_rank or self.main:
            try:
                write()
            except Exception as exc:
                if not ckpt.is_write_failure(exc, self.checkpoints_dir):
                    raise  # a failed collective or a bug: not a write to report as one
                full = ckpt.is_disk_full(exc, self.checkpoints_dir)
                failure = {"rank": self.grid.rank, "full": full, "error": str(exc)}
        what = f"share the ranks' checkpoint write errors (step {step})"
        failed = [f for f in self.grid.gather(failure, what) if f]
        if not failed:
            return
        if not self.main:
            raise PeerReported(f"rank {failed[0]['rank']} could not write checkpoint step {step}")
        first = next((f for f in failed if f["full"]), failed[0])
        # Several ranks: say which one failed; one process has nothing to tell apart.
        where = f"rank {first['rank']}: " if self.grid.world > 1 else ""
        raise ckpt.abandon_checkpoint(
            self.checkpoints_dir, step, where + first["error"], first["full"], module.state_bytes()
        ) from None


def _diverged(out) -> bool:
    """A non-finite loss, or an infinite gradient norm (a nan one can mean "not computed")."""
    return not math.isfinite(out.loss) or math.isinf(out.grad_norm)


class NullMetrics:
    """The metrics sink of ranks other than 0."""

    def log(self, step: int, values: dict) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass
