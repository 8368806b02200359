"""Loading a job config: structured defaults <- YAML recipe <- key=value overrides, then checks.

Every way this can go wrong ends in one ConfigError / UserError line naming the key and the fix.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arch.registry import ConfigError, UsageError
from launch.cluster import ClusterConfig
from trainer.config import RunConfig, clamp_warmup, validate_run_config

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # local processes (torchrun semantics); --nproc-per-node N
    max_failures: int = 3  # hybridtron submit: worker-group restarts from the newest checkpoint
    # Where the run's durable files go. A directory every node sees: run_dir = <storage>/<run
    # name>. Or s3://bucket/prefix (S3 or an S3-compatible store at AWS_ENDPOINT_URL): run_dir
    # stays node-local and checkpoints go to s3://bucket/prefix/<run name>/checkpoints (an
    # explicit s3:// trainer.checkpoint_dir wins; a local one contradicts it).
    storage: str = ""


@dataclass
class JobConfig(RunConfig):
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # launch/cluster.py


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a recipe in configs/ (``tiny`` -> configs/tiny.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    recipe = CONFIGS_DIR / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if recipe.exists():
        return recipe
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise UsageError(f"config file {name!r} not found; give a YAML path or a recipe name ({known})")


def _omegaconf_error(exc: OmegaConfBaseException, key: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or key
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        return ConfigError(
            key, f"unknown key ({msg}); see `hybridtron train --dry-run` for every key"
        )
    return ConfigError(key, msg)


def _merge(base: DictConfig, layer: DictConfig, key: str) -> DictConfig:
    """Merge one section or one override, so that an error can name the key it came from."""
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, key) from None
    assert isinstance(merged, DictConfig)
    return merged


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """``file:line:column: problem (context)`` from a parser error, in one line."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {str(exc).splitlines()[0]}"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "syntax error"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context != problem:
        problem += f" ({context}" + (f" at {start.line + 1}:{start.column + 1})" if start else ")")
    return f"{where}: not valid YAML: {problem}"


def _load_recipe(config: str) -> DictConfig:
    path = resolve_config_path(config)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not UTF-8 text; give a YAML file") from None
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}; give a YAML file") from None
    try:
        root = yaml.compose(text)  # syntax and shape first: its errors carry line and column
        if not isinstance(root, yaml.MappingNode):
            recipe = None
        else:
            recipe = OmegaConf.load(io.StringIO(text))  # OmegaConf's loader (e.g. 3e-3 is a float)
    except yaml.YAMLError as exc:
        raise UsageError(_yaml_problem(path, exc)) from None
    if root is None or root.tag == "tag:yaml.org,2002:null":
        return OmegaConf.create()  # an empty recipe: the defaults
    if not isinstance(recipe, DictConfig):
        got = "a list" if isinstance(root, yaml.SequenceNode) else f"the value {root.value!r}"
        raise UsageError(
            f"{path} must be a YAML mapping of config groups (model:, trainer:, ...), got {got}"
        )
    return recipe


def parse_override(item: str) -> tuple[str, DictConfig]:
    """``key=value`` as (key, config); the value is YAML, or a plain string where YAML fails.

    A pattern such as ``model.pattern=*-*-`` is not valid YAML (``*`` starts an alias), but its
    meaning is obvious, so it is taken as the string it is.
    """
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"override {item!r} is not key=value (e.g. trainer.max_steps=100)")
    try:
        return key, OmegaConf.from_dotlist([item])
    except yaml.YAMLError:
        conf = OmegaConf.create()
        OmegaConf.update(conf, key, value, force_add=True)
        return key, conf


def note_to_stderr(message: str) -> None:
    print(f"[config] {message}", file=sys.stderr, flush=True)


def load_config(
    config: str | None,
    overrides: list[str],
    world_size: int | None = None,
    note: Callable[[str], None] | None = note_to_stderr,
) -> JobConfig:
    """The validated job config from an optional YAML recipe and dotlist overrides.

    ``world_size``: the processes of the launch this one belongs to (None: the launch this
    config asks for, ``launch.nproc_per_node``). ``note``: where a value that was adjusted
    rather than refused is reported (a warm-up longer than the run); None: nowhere."""
    cfg = OmegaConf.structured(JobConfig)
    if config:
        recipe = _load_recipe(config)
        for section in recipe:
            cfg = _merge(cfg, OmegaConf.create({section: recipe[section]}), str(section))
    for item in overrides:
        key, layer = parse_override(item)
        cfg = _merge(cfg, layer, key)
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, "?") from None
    assert isinstance(job, JobConfig)
    apply_storage(job)
    clamped = clamp_warmup(job)
    if clamped and note is not None:
        note(clamped)
    validate_job_config(job, world_size)
    return job


def apply_storage(cfg: JobConfig) -> None:
    """Apply launch.storage (idempotent): a directory makes the run directory
    ``<storage>/<run name>``; an ``s3://bucket/prefix`` URL leaves the run directory node-local
    and puts the checkpoints in the store."""
    storage = cfg.launch.storage
    if not storage:
        return
    if "://" not in storage:
        cfg.trainer.run_dir = str(Path(storage) / Path(cfg.trainer.run_dir).name)
        return
    url = storage_url(storage)
    name = Path(cfg.trainer.run_dir).name
    where = cfg.trainer.checkpoint_dir
    if where and not where.startswith("s3://"):
        raise ConfigError(
            "trainer.checkpoint_dir",
            f"{where!r} contradicts launch.storage={storage} (checkpoints in the store); drop "
            "one of them",
        )
    if not where:  # an explicit s3:// checkpoint_dir is the user's exact choice: it wins
        cfg.trainer.checkpoint_dir = f"{url}/{name}/checkpoints"


def storage_url(storage: str) -> str:
    """``s3://bucket/prefix`` without a trailing slash, or one ConfigError naming the fix."""
    fix = (
        "give s3://bucket/prefix (S3, or an S3-compatible store at AWS_ENDPOINT_URL) or a "
        "directory every node sees"
    )
    scheme = storage.partition("://")[0]
    if scheme != "s3":
        raise ConfigError("launch.storage", f"{storage!r}: {scheme}:// is not supported; {fix}")
    bucket = storage[len("s3://") :].split("/", 1)[0]
    if not bucket:
        raise ConfigError("launch.storage", f"{storage!r} names no bucket; {fix}")
    return storage.rstrip("/")


def validate_job_config(cfg: JobConfig, world_size: int | None = None) -> None:
    """Every check that can fail before a process starts, the parallel layout's included."""
    from trainer.parallel.layout import validate_layout

    if cfg.launch.nproc_per_node < 1:
        raise ConfigError(
            "launch.nproc_per_node", f"must be positive, got {cfg.launch.nproc_per_node}"
        )
    if cfg.launch.max_failures < -1:
        raise ConfigError(
            "launch.max_failures", f"must be >= 0 (-1: no limit), got {cfg.launch.max_failures}"
        )
    world = world_size or cfg.launch.nproc_per_node
    validate_run_config(cfg, world_size=world)
    validate_layout(cfg, world)


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
