"""The engine without ZeRO: ``parallel.zero_stage: 0``, and any stage whose ZeRO group is one rank.

Every data-parallel rank keeps its whole shard's optimizer state (Megatron's non-distributed
optimizer): at the accumulation boundary the gradients are averaged over the data-parallel group
(bucketed all-reduce; none for a group of one), clipped by the global norm over the model-parallel
group, and a plain torch optimizer steps the model's own parameters.

Why not DeepSpeed at stage 0 or ZeRO over one rank: its ZeRO-1/2 optimizer keeps an fp32 copy of
the weights and flat gradient partitions (2x the shard's weights) even when there is nothing to
partition, which is most of a tp x pp rank's memory at the step (`benchmarks/bench_shard_memory.py`).

It answers the part of DeepSpeed's engine that `ParallelTrainModule` uses: calling it (forward),
``backward``, ``set_gradient_accumulation_boundary``, ``step``, ``get_global_grad_norm`` and
``optimizer``; and it counts the norm as ZeRO does, so both engines report the same norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trainer.host_memory import release_freed_host_memory

BUCKET_ELEMENTS = 2**24  # 64 MiB of fp32 per all-reduce: the transient copy stays small


def effective_zero_stage(zero_stage: int, zero_group: int) -> int:
    """The ZeRO stage a rank runs: over a ZeRO group of one rank there is nothing to partition,
    so every stage runs as 0 (`DataParallelEngine`, without ZeRO's copies)."""
    return zero_stage if zero_group > 1 else 0


def counts_in_norm(p: nn.Parameter, tp_rank: int) -> bool:
    """ZeRO's rule: a tensor-parallel shard counts on every TP rank, a replicated parameter on
    TP rank 0 only, a pipeline- or expert-replicated copy (``ds_pipe_replicated``) never."""
    if getattr(p, "ds_pipe_replicated", False):
        return False
    sharded = getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", False)
    return bool(sharded) or tp_rank == 0


class DataParallelEngine:
    """``module`` trained by ``optimizer`` over ``mpu``'s groups (`trainer.parallel.grid.MegatronMPU`):
    gradients averaged over its data-parallel group, the norm summed over its model-parallel group;
    ``grad_clip`` 0 clips nothing; ``accumulation_steps`` divides the loss as DeepSpeed does."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        mpu,
        grad_clip: float,
        accumulation_steps: int,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.accumulation_steps = accumulation_steps
        self.dp_group = mpu.get_data_parallel_group()
        self.dp_size = dist.get_world_size(self.dp_group)
        self.mp_group = mpu.get_model_parallel_group()
        self.mp_size = dist.get_world_size(self.mp_group)
        self.tp_rank = mpu.get_tensor_model_parallel_rank()
        self._norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        """Nothing to do: the reduction runs in `step`, once per optimizer step."""

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.accumulation_steps if scale_wrt_gas else loss).backward()

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _average_gradients(self, params: list[nn.Parameter]) -> None:
        """Mean over the data-parallel group. A parameter this rank did not use (an expert no
        token reached) joins with zeros: every rank must send the same buckets."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        start = 0
        while start < len(grads):
            end, size = start, 0
            while end < len(grads) and (
                end == start or size + grads[end].numel() <= BUCKET_ELEMENTS
            ):
                size += grads[end].numel()
                end += 1
            bucket = grads[start:end]
            flat = _flatten_dense_tensors(bucket)
            flat.div_(self.dp_size)
            dist.all_reduce(flat, group=self.dp_group)
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(reduced)
            del flat
            start = end

    def _global_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The 2-norm of the whole model's gradient (fp64 sums of squares over the model-parallel
        group; after the average every data-parallel rank holds the same gradients)."""
        device = params[0].device if params else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            if p.grad is not None and counts_in_norm(p, self.tp_rank):
                # fp32 per tensor (as clip_grad_norm_), summed in fp64: no fp64 copy of a grad
                total += torch.linalg.vector_norm(p.grad).double() ** 2
        if self.mp_size > 1:
            dist.all_reduce(total, group=self.mp_group)
        return total.sqrt().float()

    def step(self) -> None:
        params = self._params()
        if self.dp_size > 1:
            self._average_gradients(params)
        norm = self._global_norm(params)
        self._norm = float(norm)
        if self.grad_clip > 0:  # torch's clip_grad_norm_, as the one-process module clips
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        release_freed_host_memory(norm.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._norm
