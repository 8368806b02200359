"""Seeded, unit-by-unit initialisation: the one-process model's values however it is split.

The model is made of *units* (`arch.model.unit_names`): the embedding, the residual state's
initialiser, each sub-layer ``layers.i``, the final norm and the untied head. Each unit is
constructed and initialised from an RNG stream of its own, seeded from (run seed, the unit's
dense name), so its values depend on nothing else in the model. A plugin may open finer *seed
scopes* inside its module with a ``seed_scopes`` class attribute (names relative to the module,
``*`` for one name component; the MoE opens one per expert): the generic init and the
``post_init_weights`` of what lies inside a scope draw from that scope's own stream, so a future
expert-parallel rank can initialise its experts alone.

A rank that holds only some units (its pipeline stage) or a shard of each (tensor parallel) thus
builds each unit it holds densely, one at a time, keeps its part and frees the rest
(`arch.model.materialize`): peak transient memory one unit, start values exactly the
one-process model's. Plugins draw from torch's global RNG as they always did (construction-time
inits such as nn.Conv1d's, ``post_init_weights``); the scopes only seed it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase

import torch
from torch import nn

from arch.config import ModelConfig

# Projections whose output is added to the residual stream: initialised smaller (GPT-2 / Megatron).
RESIDUAL_OUT_ROLES = ("wo", "w2", "out_proj")


def scope_seed(seed: int, name: str) -> int:
    """The seed of scope ``name`` (a dense module name) of the model of run seed ``seed``: a
    stable hash, the same in every process and Python version."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def draw_seed() -> int:
    """A model seed from the global RNG (an unseeded build is random, and reproducible under
    ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


@contextmanager
def rng_scope(seed: int, name: str) -> Iterator[None]:
    """Torch's global CPU RNG seeded for scope ``name``; the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(scope_seed(seed, name))
        yield


def seed_scopes(unit: nn.Module, prefix: str) -> list[str]:
    """Dense names of the scopes inside ``unit`` (named ``prefix``), the unit's own first."""
    scopes = [prefix]
    for name, module in unit.named_modules(prefix=prefix):
        for pattern in getattr(module, "seed_scopes", ()):
            depth = pattern.count(".")
            for child, _ in module.named_modules():
                if child and child.count(".") == depth and fnmatchcase(child, pattern):
                    scopes.append(f"{name}.{child}")
    return scopes


def _scope_of(name: str, scopes: list[str]) -> str:
    """The innermost scope holding module ``name``."""
    inside = [s for s in scopes if name == s or name.startswith(s + ".")]
    return max(inside, key=len)


class _Streams:
    """One RNG stream per scope, taking turns as torch's global RNG: the unit's continues from
    its construction, each inner one starts from its own seed."""

    def __init__(self, seed: int, unit_scope: str) -> None:
        self.seed, self.active = seed, unit_scope
        self.states: dict[str, torch.Tensor] = {}

    def use(self, scope: str) -> None:
        if scope == self.active:
            return
        self.states[self.active] = torch.get_rng_state()
        if scope in self.states:
            torch.set_rng_state(self.states[scope])
        else:
            torch.manual_seed(scope_seed(self.seed, scope))
        self.active = scope


@torch.no_grad()
def init_unit(unit: nn.Module, prefix: str, cfg: ModelConfig, seed: int) -> None:
    """Initialise unit ``unit`` (dense name ``prefix``) of the model, inside its `rng_scope`.

    N(0, init_std) on every Linear and Embedding, residual-output projections scaled by
    1/sqrt(N), N the whole model's number of residual additions (sub-layers; GPT-2's rule, which
    Megatron writes as 1/sqrt(2 L) for L blocks of two); RMSNorm weights 1. Then every module's
    ``post_init_weights()`` re-applies its special init (e.g. Mamba's A, D and dt bias), so a
    plugin's init survives this generic pass.
    """
    std = cfg.init_std
    out_std = std / math.sqrt(len(cfg.layers))
    scopes = seed_scopes(unit, prefix)
    modules = list(unit.named_modules(prefix=prefix))
    streams = _Streams(seed, prefix)
    for name, module in modules:
        streams.use(_scope_of(name, scopes))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            is_out = any(f".{role}" in f".{name}" for role in RESIDUAL_OUT_ROLES)
            nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
    for name, module in modules:
        if callable(getattr(module, "post_init_weights", None)):
            streams.use(_scope_of(name, scopes))
            module.post_init_weights()
