"""Loading a job config: structured defaults <- YAML recipe <- key=value overrides, then checks.

Every way this can go wrong ends in one ConfigError / UserError line naming the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arch.registry import ConfigError, UserError
from trainer.config import RunConfig, validate_run_config

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # local processes (torchrun semantics)


@dataclass
class JobConfig(RunConfig):
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a recipe in configs/ (``tiny`` -> configs/tiny.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    recipe = CONFIGS_DIR / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if recipe.exists():
        return recipe
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise UserError(f"config file {name!r} not found; give a YAML path or a recipe name ({known})")


def _omegaconf_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        return ConfigError(
            key, f"unknown key ({msg}); see `hybridtron train --dry-run` for every key"
        )
    return ConfigError(key, msg)


def load_config(config: str | None, overrides: list[str]) -> JobConfig:
    """The validated job config from an optional YAML recipe and dotlist overrides."""
    layers = [OmegaConf.structured(JobConfig)]
    try:
        if config:
            path = resolve_config_path(config)
            try:
                layers.append(OmegaConf.load(path))
            except yaml.YAMLError as exc:
                raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        layers.append(parse_overrides(overrides))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from None
    assert isinstance(cfg, JobConfig)
    validate_job_config(cfg)
    return cfg


def parse_overrides(overrides: list[str]):
    """``key=value`` items as a config; values are YAML, or plain strings where YAML fails.

    A pattern such as ``model.pattern=*-*-`` is not valid YAML (``*`` starts an alias), but its
    meaning is obvious, so it is taken as the string it is.
    """
    conf = OmegaConf.create()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. trainer.max_steps=100)")
        try:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError:
            OmegaConf.update(conf, key, value, force_add=True)
    return conf


def validate_job_config(cfg: JobConfig) -> None:
    if cfg.launch.nproc_per_node != 1:
        raise ConfigError("launch.nproc_per_node", "this build trains in one process; set it to 1")
    validate_run_config(cfg, world_size=cfg.launch.nproc_per_node)


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
