"""What a plugin declares to run under tensor parallelism (TP), and the context it is built with.

A mixer, FFN, residual or preconditioner plugin that supports TP gives its class a classmethod
``tensor_parallel_plan(cfg) -> TensorParallelPlan``: which of its parameters/buffers are split
(names relative to the module, glob patterns allowed; anything unlisted is replicated), which
config sizes the TP size must divide, and one line on the collectives its forward uses. Its
constructor then takes the parallel context ``tp`` as a third argument and builds its *local*
form directly: projections through ``tp.linear(cfg, in, out, role, split)``, per-channel
parameters at the local width, and replicated values entering split computation through
``tp.copy_to_region``. Local head counts come from tensor shapes in ``forward``.

`TensorParallel` here is the single-process context (size 1: plain Linears, identity
collectives), the default everywhere in ``arch``; ``trainer.parallel.tensor_parallel`` provides
the Megatron one. This module imports torch and ``arch`` leaves only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from arch.config import ModelConfig
from arch.layers_registry import PRECONDITIONERS
from arch.numerics import fp32_or_wider


@dataclass(frozen=True)
class Split:
    """A tensor cut along ``dim``; a fused tensor lists its ``parts`` (sizes along dim), each cut
    evenly, and a shard is its piece of every part, in order."""

    dim: int
    parts: tuple[int, ...] | None = None  # None: one part (the whole dim)

    @property
    def stride(self) -> int:
        return 1 if self.parts is None else len(self.parts)

    @property
    def column_parallel(self) -> bool:
        """For a weight [out, in]: its output is split (rows); else its input (columns)."""
        return self.dim == 0


COLUMN_PARALLEL = Split(0)  # a column-parallel weight [out, in] keeps a block of rows
ROW_PARALLEL = Split(1)  # a row-parallel weight keeps a block of columns (its input is split)


def split_tensor(full: torch.Tensor, split: Split, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank`` of ``size``'s shard of ``full`` (a view where possible)."""
    if size == 1:
        return full
    pieces = [full] if split.parts is None else full.split(list(split.parts), split.dim)
    out = []
    for piece in pieces:
        n = piece.shape[split.dim]
        if n % size:
            raise ValueError(f"dim {split.dim} of size {n} does not split into {size} shards")
        out.append(piece.narrow(split.dim, rank * (n // size), n // size))
    return out[0] if len(out) == 1 else torch.cat(out, split.dim)


def merge_tensors(shards: list[torch.Tensor], split: Split) -> torch.Tensor:
    """The full tensor from its shards in rank order (inverse of `split_tensor`)."""
    size = len(shards)
    if size == 1:
        return shards[0]
    if split.parts is None:
        return torch.cat(shards, split.dim)
    local = [p // size for p in split.parts]
    pieces = [s.split(local, split.dim) for s in shards]
    return torch.cat(
        [torch.cat([p[i] for p in pieces], split.dim) for i in range(len(local))], split.dim
    )


def shard_reads(
    split: Split, saved_len: int, saved: int, rank: int, size: int
) -> list[tuple[int, int, int]]:
    """Where rank ``rank`` of ``size``'s shard of a tensor lies in ``saved`` saved shards of it
    (each ``saved_len`` long along ``split.dim``, from `split_tensor` at size ``saved``):
    (saved shard, start, length) along ``split.dim``, in order; the pieces concatenated are
    the shard. So a rank reads only what overlaps its slice, whatever layout saved it."""
    parts = [saved_len * saved] if split.parts is None else list(split.parts)
    if sum(parts) != saved_len * saved:
        raise ValueError(f"{saved} shards of {saved_len} do not make parts {split.parts}")
    reads, offset = [], 0  # offset: where the current part starts inside a saved shard
    for part in parts:
        if part % saved or part % size:
            raise ValueError(f"dim {split.dim} part of size {part} does not split evenly")
        have, want = part // saved, part // size
        lo, hi = rank * want, (rank + 1) * want
        for k in range(lo // have, (hi - 1) // have + 1):
            a, b = max(lo, k * have), min(hi, (k + 1) * have)
            reads.append((k, offset + a - k * have, b - a))
        offset += have
    return reads


@dataclass(frozen=True)
class TensorParallelPlan:
    """How one plugin's state splits under TP (see the module docstring).

    ``splits``: name relative to the module (glob patterns allowed) -> Split; ``divisible``:
    config key -> the size at that key the TP size must divide; ``collectives``: what the forward
    communicates (for docs and ``registry list``). ``wraps`` (preconditioners only): where the
    wrapped projection's raw weight sits inside the wrapper (``lin.weight``): it splits as the
    owner's plan splits ``<projection>.weight``.

    ``boundary`` (mixers/FFNs, for sequence parallelism): the roles of the projections that are
    the *only* readers of the sub-layer's input (column-parallel) and the only writers of its
    output (row-parallel). Under sequence parallelism they are then built without their own
    collectives, and the sub-layer's all-gather before them / reduce-scatter after them do the
    communication (Megatron's form: as many bytes as plain TP). Empty: the generic form, correct
    for any plugin with a plan: the input is all-gathered (its gradient, already whole through
    the plugin's own collectives, is sliced) and the whole output sliced.

    ``experts`` (MoE plugins, for expert parallelism): the name of the ModuleDict holding the
    plugin's ``num_experts`` experts under their global indices; expert-parallel ranks each build
    and hold a disjoint block of them (`TensorParallel.local_experts`), so checkpoints keep the
    dense names whatever the layout.
    """

    splits: dict[str, Split] = field(default_factory=dict)
    divisible: dict[str, int] = field(default_factory=dict)
    collectives: str = "none (replicated)"
    wraps: str | None = None
    boundary: tuple[str, ...] = ()
    experts: str | None = None
    num_experts: int = 0

    def split_of(self, name: str) -> Split | None:
        """The Split of parameter/buffer ``name`` (relative to the module), None: replicated."""
        if name in self.splits:
            return self.splits[name]
        for pattern, split in self.splits.items():
            if fnmatchcase(name, pattern):
                return split
        return None


REPLICATED = TensorParallelPlan()


def has_plan(plugin: object) -> bool:
    """Whether a plugin class declares how it runs under TP."""
    return callable(getattr(plugin, "tensor_parallel_plan", None))


class TensorParallel:
    """The parallel context plugins are built with; this one is a single process (size 1).

    Subclasses (the Megatron one in ``trainer``) override the local projections and the
    collectives; the plugins' code is the same for both.
    """

    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    boundary_roles: frozenset[str] = frozenset()  # see `with_boundary`
    expert_size: int = 1  # expert-parallel ranks (carved out of the data-parallel ones)
    expert_rank: int = 0

    def local_linear(self, in_features: int, out_features: int, split: Split) -> nn.Module:
        """This rank's bias-free projection of an [out, in] weight split as ``split``."""
        return nn.Linear(in_features, out_features, bias=False)

    def linear(
        self, cfg: ModelConfig, in_features: int, out_features: int, role: str, split: Split
    ) -> nn.Module:
        """A projection (full sizes given) in its local form, wrapped by the configured
        preconditioner. ``split``: the one the plugin's plan gives its weight, column-parallel
        (output split, possibly fused parts) or `ROW_PARALLEL` (input split, output summed)."""
        precondition = PRECONDITIONERS.get(cfg.preconditioner.name)
        if role in self.boundary_roles:  # its collective is the sub-layer's (sequence parallel)
            rows = out_features // self.size if split.column_parallel else out_features
            cols = in_features if split.column_parallel else in_features // self.size
            local: nn.Module = nn.Linear(cols, rows, bias=False)
        else:
            local = self.local_linear(in_features, out_features, split)
        return precondition(local, cfg.preconditioner, role, tp=self, split=split)

    def with_boundary(self, roles: tuple[str, ...]) -> TensorParallel:
        """The context one plugin is built with under sequence parallelism when its plan names
        its ``boundary`` projections: those are built without collectives (`linear`)."""
        return self

    def from_sequence_shard(self, h: torch.Tensor, partial_grad: bool) -> torch.Tensor:
        """Sequence parallelism: the whole sequence [B, T, ...] from this rank's part
        [B, T / size, ...] (all-gather). Backward: ``partial_grad``, each rank holds a partial
        sum of the whole gradient (reduce-scatter); else the gradient is already whole (slice).
        Identity without sequence parallelism."""
        return h

    def to_sequence_shard(self, y: torch.Tensor, partial: bool) -> torch.Tensor:
        """Sequence parallelism: this rank's part of the sequence of ``y`` [B, T, ...]:
        ``partial``, each rank holds partial sums (reduce-scatter; backward all-gather); else
        ``y`` is whole on every rank (slice; backward all-gather). Identity without it."""
        return y

    def sequence_shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a per-token input [B, T] that needs no gradient (token ids)."""
        return t

    def local_experts(self, num_experts: int) -> range:
        """The global indices of the experts this expert-parallel rank holds (a block)."""
        per_rank = num_experts // self.expert_size
        return range(self.expert_rank * per_rank, (self.expert_rank + 1) * per_rank)

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: ``counts`` [ranks, local experts] holds how many rows this rank
        sends to each rank's experts; returns [ranks, local experts]: how many each rank sends
        to this rank's experts (an all-to-all)."""
        return counts

    def all_to_all(self, rows: torch.Tensor, receive: list[int], send: list[int]) -> torch.Tensor:
        """Expert parallelism: send consecutive blocks of ``rows`` (sizes ``send``) to the
        expert-parallel ranks in order, receive blocks of ``receive`` rows from each; the
        gradient travels back the same way."""
        return rows

    def copy_to_region(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated value entering split computation: identity forward, all-reduce of its
        gradient backward."""
        return x

    def reduce_from_region(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sums of split computation made whole: all-reduce forward, identity backward."""
        return x

    def gather(self, shard: torch.Tensor, split: Split) -> torch.Tensor:
        """The full tensor from every rank's ``shard`` (backward: this rank's slice; exact when
        the full tensor's gradient is the same on every rank)."""
        return shard

    def shard(self, full: torch.Tensor, split: Split) -> torch.Tensor:
        """This rank's shard of ``full``."""
        return split_tensor(full, split, self.rank, self.size)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        """The token embedding over the padded vocabulary (vocab-parallel under TP)."""
        return nn.Embedding(vocab, dim)

    def vocab_logits(self, h: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
        """Logits of the real vocabulary (this rank's slice of the padded one under TP, padding
        rows at -inf) from the output matrix's local rows ``weight``."""
        return F.linear(h, weight[:vocab])

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32 of `vocab_logits` (targets already shifted)."""
        return F.cross_entropy(fp32_or_wider(logits).flatten(0, 1), targets.flatten())

    def mark_split(self, param: nn.Parameter, split: Split) -> None:
        """Tag a split parameter (Megatron counts its gradient norm on every rank)."""

    def check_same_model(self, fingerprint: str) -> None:
        """Raise when the ranks start from different models: ``fingerprint`` (e.g. config and
        seed, `arch.model.model_fingerprint`) differs between them (nothing to compare in one)."""


DENSE = TensorParallel()
