"""The one-process TrainModule (the whole model, a torch optimizer), and the pieces of a step
(inputs, autocast, losses, evaluation) the distributed one shares.

The contract both implement is `trainer.train_module_base.TrainModule`; this one trains the
one-process grid, and is the reference every layout of the distributed one is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from arch import build_model, count_parameters, lm_loss
from arch.aux_losses import recording
from arch.documents import document_ids
from arch.flops import training_flops_per_token
from arch.model import aux_loss_counts
from arch.recompute import set_recompute
from trainer.config import RunConfig
from trainer.host_memory import release_freed_host_memory
from trainer.optim import build_optimizer
from trainer.parallel.grid import Grid
from trainer.train_module_base import StepResult, TrainModule

# The checkpoint format (safetensors, xxhash) is imported where a checkpoint is written or read:
# benchmarks/gpu_check.py drives this module on a GPU machine that has neither.
if TYPE_CHECKING:
    from trainer.checkpoint import Checkpoint


class SingleProcessTrainModule(TrainModule):
    """The whole model on one process (`Grid.one_process`); its checkpoint holds every tensor
    whole and its optimizer's state dict by parameter name (`one_process_state`)."""

    def __init__(self, cfg: RunConfig, grid: Grid, checkpoint: Checkpoint | None = None) -> None:
        super().__init__(cfg, grid, checkpoint)
        # The model lives where it trains (a GPU when there is one); the optimizer's state
        # follows it. Checkpoints are written from CPU copies, so they load anywhere.
        self.device = grid.device
        self.model = build_model(cfg.model, seed=cfg.trainer.seed).to(self.device)
        set_recompute(self.model, cfg.parallel.recompute)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        post_optimizer_step(self.model)  # e.g. the PC layer's first power iteration
        self.num_params = count_parameters(self.model)
        self.aux_counts = aux_loss_counts(cfg.model)
        self.train_flops_per_token = training_flops_per_token(self.model, cfg.trainer.seq_len)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Weights and optimizer state from a checkpoint of any layout: exactly as saved when
        one process wrote it; merged from the shards of a multi-process checkpoint otherwise."""
        from trainer.checkpoint import CheckpointReader

        reader = CheckpointReader(checkpoint)
        self.model.load_state_dict(reader.model_state(), strict=True)
        self.optimizer.load_state_dict(reader.optimizer_state_for(self.model, self.optimizer))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return batch_loss(
            self.model, batch.to(self.device), self.cfg.trainer.precision, self.eos_id
        )

    def train_step(
        self, micro_batches: list[torch.Tensor], lr: float, gather_metrics: bool = True
    ) -> StepResult:
        # gather_metrics: one process has its metrics at hand, so they always come back.
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # float64: a float64 model's loss stays float64
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            batch = batch.to(self.device)
            lm, aux = train_loss(
                self.model,
                batch,
                self.cfg.trainer.precision,
                metrics,
                self.eos_id,
                self.aux_counts,
            )
            loss = lm + sum(aux.values()) if aux else lm
            (loss / len(micro_batches)).backward()
            total += lm.detach() / len(micro_batches)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        release_freed_host_memory(self.device)
        self.optimizer.step()
        post_optimizer_step(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            loss=total.item(),
            grad_norm=grad_norm.item(),
            metrics=scalar_metrics(metrics, len(micro_batches)),
        )

    def eval_loss(self, samples: torch.Tensor, micro_batch_size: int) -> float:
        return evaluate_loss(
            self.model, samples, micro_batch_size, self.cfg.trainer.precision, self.eos_id
        )

    # ---- checkpoints ----------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return ""

    @property
    def checkpoint_layout(self) -> None:
        return None

    def prepare_save(self, copy: bool) -> Callable[[Path], list[str]]:
        from trainer.checkpoint import one_process_state, optimizer_param_names, save_chunks

        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        if copy:  # a snapshot in host memory: the next steps update the tensors in place
            model = {k: v.detach().to("cpu", copy=True) for k, v in model.items()}
            optimizer = host_copy(optimizer)
        else:  # written before the next step: CPU copies only where the tensors live elsewhere
            model = {k: v.detach().cpu() for k, v in model.items()}
            optimizer = host_copy(optimizer) if self.device.type != "cpu" else optimizer
        state = one_process_state(
            model, optimizer, optimizer_param_names(self.model, self.optimizer)
        )
        return lambda directory: save_chunks(directory, *state)

    def saved_rng(self, checkpoint: Checkpoint, trainer_state: dict) -> dict | None:
        return trainer_state.get("rng")  # one process: the main rank's, in the trainer state

    def state_bytes(self) -> int:
        from trainer.checkpoint import tensor_bytes

        return tensor_bytes(self.model.state_dict()) + tensor_bytes(self.optimizer.state_dict())


def host_copy(tree):
    """``tree`` (dicts, lists, tensors, numbers) with every tensor copied to host memory."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(host_copy(v) for v in tree)
    return tree


def post_optimizer_step(model: torch.nn.Module) -> None:
    """Call ``post_optimizer_step()`` on every sub-module that defines it (after each step and
    once at construction): state derived from the weights, e.g. the PC layer's power iteration."""
    for module in model.modules():
        hook = getattr(module, "post_optimizer_step", None)
        if callable(hook):
            hook()


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast (master weights stay fp32) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_inputs(batch: torch.Tensor, eos_id: int | None) -> tuple[dict, torch.Tensor]:
    """(keyword arguments of the model call, targets) of a [B, T + 1] batch of token ids.

    With an ``eos_id`` the model also gets each position's document index, so attention and
    Mamba state never cross the documents packed into one sample.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    kwargs = {"input_ids": inputs}
    if eos_id is not None:
        kwargs["doc_ids"] = document_ids(inputs, eos_id)
    return kwargs, targets


def batch_loss(
    model: torch.nn.Module, batch: torch.Tensor, precision: str, eos_id: int | None = None
) -> torch.Tensor:
    """Next-token loss of a [B, T + 1] batch of token ids."""
    kwargs, targets = model_inputs(batch, eos_id)
    with autocast(precision, batch.device.type):
        logits = model(**kwargs)
    return lm_loss(logits, targets)


def train_loss(
    model: torch.nn.Module,
    batch: torch.Tensor,
    precision: str,
    metrics: dict[str, torch.Tensor],
    eos_id: int | None = None,
    aux_counts: dict[str, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(LM loss, the model's weighted auxiliary losses) of a [B, T + 1] batch.

    Detached copies of the auxiliary losses and the model's diagnostics are summed into
    ``metrics`` (so a step's metrics add up over its micro-batches). ``aux_counts``: the model's
    declared auxiliary-loss reports (`arch.model.aux_loss_counts`), checked against the forward.
    """
    kwargs, targets = model_inputs(batch, eos_id)
    # What HybridLM.forward_with_aux does, around model(): also works through wrappers (DDP, ...).
    with autocast(precision, batch.device.type), recording(aux_counts, aux_counts) as recorder:
        logits = model(**kwargs)
    aux = recorder.losses
    step_metrics = {**recorder.metrics, **{name: value.detach() for name, value in aux.items()}}
    for name, value in step_metrics.items():
        metrics[name] = metrics[name] + value if name in metrics else value
    return lm_loss(logits, targets), aux


def scalar_metrics(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Means over ``count`` micro-batches as floats; a vector metric v becomes key/0, key/1, ..."""
    out: dict[str, float] = {}
    for name, value in sums.items():
        flat = (value / count).flatten().tolist()
        out.update(
            {name: flat[0]} if value.ndim == 0 else {f"{name}/{i}": v for i, v in enumerate(flat)}
        )
    return out


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    samples: torch.Tensor,
    micro_batch_size: int,
    precision: str,
    eos_id: int | None = None,
) -> float:
    """Mean loss over held-out samples [N, T + 1], in micro-batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = sum(
        batch_loss(model, chunk.to(device), precision, eos_id).item() * len(chunk)
        for chunk in samples.split(micro_batch_size)
    )
    model.train(was_training)
    return total / len(samples)
