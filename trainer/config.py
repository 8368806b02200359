"""The run config: trainer, optimizer and parallel settings, composed with model and data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from arch.config import ModelConfig, validate_model_config
from arch.layers_registry import ATTENTION, PRECONDITIONERS, RESIDUALS
from arch.registry import ConfigError, Registry
from data_pipeline.config import DataConfig, validate_data_config
from data_pipeline.registries import DATASETS, TOKENIZERS
from trainer.registries import OPTIMIZERS, SCHEDULERS

PRECISIONS = ("fp32", "bf16")


@dataclass
class OptimConfig:
    name: str = "adamw"  # registry `optimizer`
    lr: float = 3e-3
    weight_decay: float = 0.1  # applied to matrices only (not norms or embeddings)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    scheduler: str = "cosine"  # registry `scheduler`: cosine | wsd | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the schedule's floor, as a fraction of lr
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    # optim.name=muon (trainer/muon.py): Muon on hidden matrices, AdamW (lr, betas) on the rest.
    muon_lr: float = 0.02  # peak lr of the Muon matrices; follows the same schedule as lr
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_scale: str = (
        "jordan"  # jordan: sqrt(max(1, rows/cols)) | moonlight: 0.2 sqrt(max(rows, cols))
    )


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    max_steps: int = 300
    seed: int = 1234
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 16  # = micro_batch_size x grad accumulation x data-parallel size
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # held-out micro-batches per evaluation
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 3  # newest K checkpoints kept
    checkpoint_dir: str | None = (
        None  # None: <run_dir>/checkpoints; s3://bucket/prefix: staged there, uploaded
    )
    checkpoint_async: bool = False  # periodic saves: host-memory snapshot, background write
    stop_at_step: int | None = None  # checkpoint and exit here; the schedule still spans max_steps
    resume: bool = True  # continue from the newest checkpoint in run_dir if there is one
    resume_from: str | None = None  # or from this checkpoint directory
    progress: bool = True  # progress bar on stderr
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    peak_tflops: float | None = None  # device peak for MFU (None: a table of known GPUs; CPU: none)


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size (Megatron-core layers): splits heads, d_inner, vocab
    pipeline: int = 1  # pipeline stages (1F1B), cut at `|` in model.pattern or balanced
    zero_stage: int = (
        0  # 0: no ZeRO; 1, 2, 3: DeepSpeed ZeRO over the data-parallel group (> 1 rank)
    )
    recompute: str = "none"  # activation recomputation: none | selective | full
    sequence_parallel: bool = False  # shard norms and residual streams along the sequence (tp > 1)
    expert: int = 1  # expert-parallel size, carved out of the data-parallel ranks
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    timeout_s: float = 600.0  # any collective or transfer that takes longer fails every rank


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def grad_accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank, after checking the batch arithmetic."""
    t, p = cfg.trainer, cfg.parallel
    model_parallel = p.tensor * p.pipeline
    if world_size < model_parallel:
        raise ConfigError(
            "launch.nproc_per_node",
            f"parallel.tensor x parallel.pipeline = {p.tensor} x {p.pipeline} needs "
            f"{model_parallel} processes (or a multiple), got {world_size}; pass "
            f"--nproc-per-node {model_parallel}",
        )
    if world_size % model_parallel:
        raise ConfigError(
            "parallel.tensor",
            f"tensor x pipeline = {model_parallel} does not divide the {world_size} processes",
        )
    dp = world_size // model_parallel
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            "trainer.global_batch_size",
            f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
            f"= {t.micro_batch_size} x {dp}; use a multiple of {per_step}",
        )
    return t.global_batch_size // per_step


def effective_warmup(warmup_steps: int, max_steps: int) -> int:
    """The warm-up a run of ``max_steps`` gets: at most ``max_steps - 1`` steps, so that the peak
    lr is reached and the schedule proper (cosine, wsd decay, constant) has at least one step."""
    return max(0, min(warmup_steps, max_steps - 1))


def clamp_warmup(cfg: RunConfig) -> str | None:
    """Shorten a warm-up that is not shorter than the run (a smoke test with the default
    warm-up) in ``cfg`` itself, so the schedule and the recorded config.yaml agree; the one-line
    note to print, or None when nothing changed. Invalid values are left to validation."""
    o, t = cfg.optim, cfg.trainer
    if o.warmup_steps < 0 or t.max_steps <= 0:
        return None
    clamped = effective_warmup(o.warmup_steps, t.max_steps)
    if clamped == o.warmup_steps:
        return None
    requested, o.warmup_steps = o.warmup_steps, clamped
    return (
        f"optim.warmup_steps={requested} is not shorter than trainer.max_steps={t.max_steps}: "
        f"warming up over {clamped} steps instead (recorded as optim.warmup_steps={clamped})"
    )


def validate_trainer_config(cfg: RunConfig, world_size: int = 1) -> None:
    t, o, p = cfg.trainer, cfg.optim, cfg.parallel
    where = t.checkpoint_dir or ""
    if "://" in where and not re.fullmatch(r"s3://[^/]+(/.*)?", where):
        raise ConfigError(
            "trainer.checkpoint_dir",
            f"{where!r} is not a directory or an s3://bucket/prefix URL; give one of those",
        )
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.seq_len": t.seq_len,
        "trainer.micro_batch_size": t.micro_batch_size,
        "trainer.global_batch_size": t.global_batch_size,
        "trainer.log_every": t.log_every,
        "trainer.eval_batches": t.eval_batches,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "optim.lr": o.lr,
        "parallel.tensor": p.tensor,
        "parallel.pipeline": p.pipeline,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
    for key, value in {
        "trainer.eval_every": t.eval_every,
        "trainer.checkpoint_every": t.checkpoint_every,
        "optim.warmup_steps": o.warmup_steps,
        "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip,
    }.items():
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError("trainer.peak_tflops", f"must be positive or null, got {t.peak_tflops}")
    if t.threads is not None and t.threads <= 0:
        raise ConfigError("trainer.threads", f"must be positive or null, got {t.threads}")
    if t.stop_at_step is not None and not 0 < t.stop_at_step <= t.max_steps:
        raise ConfigError(
            "trainer.stop_at_step", f"must be in [1, max_steps={t.max_steps}], got {t.stop_at_step}"
        )
    if t.precision not in PRECISIONS:
        raise ConfigError(
            "trainer.precision", f"must be one of {'|'.join(PRECISIONS)}, got {t.precision!r}"
        )
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.muon_lr <= 0:
        raise ConfigError("optim.muon_lr", f"must be positive, got {o.muon_lr}")
    if not 0 <= o.muon_momentum < 1:
        raise ConfigError("optim.muon_momentum", f"must be in [0, 1), got {o.muon_momentum}")
    if o.muon_ns_steps < 1:
        raise ConfigError("optim.muon_ns_steps", f"must be >= 1, got {o.muon_ns_steps}")
    if o.muon_scale not in ("jordan", "moonlight"):
        raise ConfigError("optim.muon_scale", f"must be jordan or moonlight, got {o.muon_scale!r}")
    if not 0 <= o.decay_fraction <= 1:
        raise ConfigError("optim.decay_fraction", f"must be in [0, 1], got {o.decay_fraction}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.zero_stage == 3 and p.pipeline > 1:
        raise ConfigError(
            "parallel.zero_stage",
            "ZeRO-3 needs parallel.pipeline=1; use stage 1 or 2 with pipelining",
        )
    n_layers = len(cfg.model.layers)
    if p.pipeline > n_layers:
        raise ConfigError(
            "parallel.pipeline",
            f"{p.pipeline} stages for {n_layers} sub-layers; use at most {n_layers}",
        )
    if cfg.model.n_heads % p.tensor or cfg.model.kv_heads % p.tensor:
        raise ConfigError(
            "parallel.tensor",
            f"{p.tensor} must divide model.n_heads={cfg.model.n_heads} and n_kv_heads={cfg.model.kv_heads}",
        )
    grad_accumulation_steps(cfg, world_size)


def _check_name(key: str, name: str, registry: Registry) -> None:
    if name not in registry:
        raise ConfigError(
            key, f"unknown {registry.kind} {name!r}; choose one of: {', '.join(registry.names())}"
        )


def validate_run_config(cfg: RunConfig, world_size: int = 1) -> None:
    """Every check that can fail before a process starts; raises ConfigError naming the key."""
    for key, name, registry in (
        ("model.attention.name", cfg.model.attention.name, ATTENTION),
        ("model.residual.name", cfg.model.residual.name, RESIDUALS),
        ("model.preconditioner.name", cfg.model.preconditioner.name, PRECONDITIONERS),
        ("optim.name", cfg.optim.name, OPTIMIZERS),
        ("optim.scheduler", cfg.optim.scheduler, SCHEDULERS),
        ("data.tokenizer", cfg.data.tokenizer, TOKENIZERS),
        ("data.dataset", cfg.data.dataset, DATASETS),
    ):
        _check_name(key, name, registry)
    validate_model_config(cfg.model)
    validate_data_config(cfg.data)
    validate_trainer_config(cfg, world_size)
    # Tokenizers with a fixed vocabulary say so as a class attribute; file-based ones are checked
    # against the prepared data's manifest when the run starts.
    vocab = getattr(TOKENIZERS.get(cfg.data.tokenizer), "vocab_size", 0)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than tokenizer {cfg.data.tokenizer!r}'s {vocab} tokens",
        )
