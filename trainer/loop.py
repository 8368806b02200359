"""The Trainer: data -> steps -> metrics -> evaluation -> checkpoints, resumable exactly.

Everything that decides the next step's numbers is in a checkpoint: weights, optimizer moments,
the step counter (the LR schedule is a pure function of it), every RNG, and the data loader's
position; so N steps equal N/2 steps + resume + N/2 steps, bit for bit (fp32, same machine).
"""

from __future__ import annotations

import signal
import threading
import time
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
from trainer.config import RunConfig, grad_accumulation_steps
from trainer.metrics import MetricsLogger, ProgressBar
from trainer.plot import plot_losses
from trainer.rng import rng_state, seed_everything, set_rng_state
from trainer.schedules import lr_at
from trainer.train_module import TrainModule


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


class PreemptionWatcher:
    """Turns SIGTERM / SIGUSR1 (what schedulers send before killing a job) into a flag.

    The loop finishes the step it is in, writes a checkpoint and stops, so a pre-empted job loses
    at most one step and resumes exactly. A second signal acts at once (the default action), for
    a step that cannot finish. Only the main thread can install handlers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, notice: Path | None = None) -> None:
        self.requested = False
        self.signal_name = ""
        self.notice = notice
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested:  # a second signal: the step is not finishing (e.g. a stalled read)
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def check(self) -> bool:
        """A signal arrived, or the notice file (`PREEMPT_FILE`) appeared: where no signal can
        reach the trainer (Ray Train runs it off the main thread) the job's driver creates it."""
        if not self.requested and self.notice is not None and self.notice.exists():
            self.requested = True
            self.signal_name = f"{self.notice.name} file"
        return self.requested

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Drives a TrainModule; with a ``grid`` (a multi-process launch) the distributed one, and
    then only global rank 0 logs, plots and writes the shared checkpoint files."""

    def __init__(self, cfg: RunConfig, *, log=print, grid=None) -> None:
        self.cfg = cfg
        self.grid = grid
        self.main = grid is None or grid.is_main
        self.log = log if self.main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.trainer.run_dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.accum = grad_accumulation_steps(cfg, world_size=grid.world if grid else 1)

    # ---- set-up -------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.grid is not None:
            import torch.distributed as dist

            from trainer.parallel.watchdog import operation

            with operation("barrier"):
                dist.barrier()

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
        self._barrier()  # the other ranks wait for rank 0 to prepare the data
        return check_prepared(data, self.cfg.trainer.seq_len, self.cfg.model.vocab_size)

    def _resume_point(self) -> ckpt.Checkpoint | None:
        t = self.cfg.trainer
        if t.resume_from:
            return ckpt.verify_checkpoint(t.resume_from)
        if t.resume:
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
        g = self.grid
        loader = build_train_loader(
            cfg.data, t.micro_batch_size, data_parallel=(g.dp_rank, g.dp) if g else None
        )
        eval_set = load_eval_set(cfg.data, t.eval_batches * t.micro_batch_size)
        step, tokens = 0, 0
        if resume is not None:
            state = resume.trainer_state()
            step, tokens = state["step"], state["tokens"]
            if "data" in state:  # imported weights (import-hf, merge-pc) start the data afresh
                loader.load_state_dict(state["data"])
            rng = self._rng_of(resume, state)
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
                + (f"; {g.world} processes: dp {g.dp} x pp {g.pp} x tp {g.tp}" if g else "")
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
        self._barrier()
        preemption = PreemptionWatcher(notice)
        try:
            while step < stop:
                lr = lr_at(step, t.max_steps, cfg.optim)
                micro_batches = [next(batches) for _ in range(self.accum)]
                if g is None:
                    out = module.train_step(micro_batches, lr)
                else:  # aux metrics are gathered over the ranks only when they are logged
                    logged = (step + 1) % t.log_every == 0 or step == 0 or step + 1 == stop
                    out = module.train_step(micro_batches, lr, gather_metrics=logged)
                step, tokens = step + 1, tokens + tokens_per_step
                window_tokens += tokens_per_step
                result.losses[step] = out.loss
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                bar.update(out.loss, tps, lr)
                if not torch.isfinite(torch.tensor(out.loss)):
                    raise UserError(
                        f"loss is {out.loss} at step {step}; lower optim.lr or use trainer.precision=fp32 "
                        f"(the last good checkpoint is kept in {self.checkpoints_dir})"
                    )
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
                preempted = self._agreed(preemption.check())
                if last or preempted or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    result.last_checkpoint = self._save(module, loader, step, tokens)
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
            preemption.restore()
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
            devices = self.grid.world if self.grid else 1
            perf["perf/mfu"] = tflops / (self.peak_tflops * devices)
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

    def _build_module(self, resume: ckpt.Checkpoint | None):
        if resume is not None:
            self._check_compatible(resume)
        if self.grid is None:
            module = TrainModule(self.cfg)
            if resume is not None:
                module.load_checkpoint(resume)
            return module
        from trainer.parallel.checkpoint import dense_reader
        from trainer.parallel.train_module import ParallelTrainModule

        reader = None if resume is None else dense_reader(resume, self.cfg.optim.weight_decay)
        return ParallelTrainModule(self.cfg, self.grid, self.accum, reader)

    def _rng_of(self, resume: ckpt.Checkpoint, state: dict) -> dict | None:
        """This rank's RNG from the checkpoint: its own file when the layout is unchanged."""
        if self.grid is None:
            return state.get("rng")
        from trainer.parallel.checkpoint import rng_file

        own = resume.path / rng_file(self.grid.rank)
        if resume.layout == self._layout() and own.exists():
            return torch.load(own, weights_only=False)
        return None  # another layout: ranks do not map one to one; keep this run's seeding

    def _layout(self) -> dict[str, int]:
        g = self.grid
        return {"tp": g.tp, "pp": g.pp, "dp": g.dp} if g else {"tp": 1, "pp": 1, "dp": 1}

    def _layout_change(self, resume: ckpt.Checkpoint) -> str:
        theirs = resume.layout or {"tp": 1, "pp": 1, "dp": 1}
        if theirs == self._layout():
            return ""
        fmt = "tp {tp} x pp {pp} x dp {dp}"
        return f" (resharded from {fmt.format(**theirs)} to {fmt.format(**self._layout())})"

    def _agreed(self, flag: bool) -> bool:
        """A flag any rank raised (a signal may reach the ranks at different steps)."""
        if self.grid is None:
            return flag
        import torch.distributed as dist

        t = torch.tensor(float(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _save(self, module, loader, step: int, tokens: int) -> Path:
        state = {"step": step, "tokens": tokens, "rng": rng_state(), "data": loader.state_dict()}
        if self.grid is None:
            path = ckpt.save_checkpoint(
                self.checkpoints_dir,
                step,
                module.model.state_dict(),
                module.optimizer.state_dict(),
                state,
                config_yaml(self.cfg),
                write_extra=self.tokenizer.save,
            )
            ckpt.prune_checkpoints(self.checkpoints_dir, self.cfg.trainer.keep_checkpoints)
            return path
        # Every rank writes its shard into step_N.tmp; rank 0 adds the shared files, hashes
        # everything and renames the directory once all ranks are done.
        if self.main:
            ckpt.begin_checkpoint(self.checkpoints_dir, step)
        self._barrier()
        tmp = self.checkpoints_dir / (ckpt.step_dir_name(step) + ".tmp")
        module.save_shards(tmp)
        if self.main:
            torch.save(state, tmp / ckpt.STATE_FILE)
            (tmp / ckpt.CONFIG_FILE).write_text(config_yaml(self.cfg))
            self.tokenizer.save(tmp)
        self._barrier()
        if self.main:
            ckpt.finish_checkpoint(self.checkpoints_dir, step, self._layout())
            ckpt.prune_checkpoints(self.checkpoints_dir, self.cfg.trainer.keep_checkpoints)
        self._barrier()
        return self.checkpoints_dir / ckpt.step_dir_name(step)


class NullMetrics:
    """The metrics sink of ranks other than 0."""

    def log(self, step: int, values: dict) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass
