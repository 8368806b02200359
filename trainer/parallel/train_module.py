"""The distributed TrainModule: tensor-parallel stage, (interleaved) 1F1B, one engine per stage.

Implements `trainer.train_module_base.TrainModule` for a grid of several processes, so the
Trainer does not know which module it drives. Recipe (measured in ../shared/reference/parallel.md):

- every rank builds its tensor-parallel shard of its pipeline stage on the meta device and fills
  it unit by unit with the one-process model's values (`arch.model.materialize`): at step 0 the
  distributed model is the single-process model, exactly, and no rank holds more than its
  share plus one dense unit; a resumed rank reads only its slices of the checkpoint;
- one engine per stage over the data-parallel group (Megatron groups via `MegatronMPU`) with a
  torch optimizer instance: DeepSpeed ZeRO 1/2 (3 only without pipelining) when the ZeRO group
  has several ranks, else `DataParallelEngine` (stage 0, or nothing to partition: no fp32 copy
  or flat gradient partitions); both count the gradient norm the same way;
- the model's last chunk calls ``engine.backward(loss)``; the others a scalar surrogate
  sum(output * grad) with ``scale_wrt_gas=False``; the optimizer steps only after the stage has
  sent its last input gradients (the boundary step all-reduces the norm over TP x PP);
- with ``parallel.virtual_stages`` v > 1 a stage holds v chunks (interleaved 1F1B), all under
  the one engine: the gradient-accumulation boundary is the step's last backward of any chunk.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from arch import HybridLM, count_parameters
from arch.aux_losses import Totals, add_totals, merge_totals, recording
from arch.flops import training_flops_per_token
from arch.model import aux_loss_counts, materialize, unit_shards
from arch.model_plan import split_of
from arch.recompute import set_recompute
from arch.tensor_parallel_plan import DENSE
from trainer.checkpoint import Checkpoint, CheckpointReader, piece_chunks, rng_file, save_chunks
from trainer.checkpoint.dcp_io import STEP_KEY, model_key, moment_key
from trainer.config import RunConfig, grad_accumulation_steps
from trainer.optim import OPTIMIZERS, param_groups
from trainer.parallel.data_parallel import DataParallelEngine, effective_zero_stage
from trainer.parallel.expert_parallel import reduce_expert_parallel_grads
from trainer.parallel.grid import Grid, MegatronMPU
from trainer.parallel.held_state import held_pieces, set_zero3_state
from trainer.parallel.p2p import RingLink, StageLink
from trainer.parallel.schedule import (
    bubble_fraction,
    forward_only,
    interleaved_forward_only,
    interleaved_one_f_one_b,
    one_f_one_b,
)
from trainer.parallel.sequence_parallel import reduce_sequence_parallel_grads
from trainer.parallel.stages import PipelineStage, rank_chunks, stage_layer_ranges, state_shapes
from trainer.parallel.tensor_parallel import MegatronTensorParallel
from trainer.parallel.watchdog import operation
from trainer.rng import rng_state
from trainer.train_module import autocast, model_inputs, post_optimizer_step
from trainer.train_module_base import StepResult, TrainModule

_TIED_TAG = 17  # point-to-point tag of the tied-embedding gradient and weight transfers


def deepspeed_config(cfg: RunConfig, accum: int, dp: int, zero_stage: int) -> dict:
    t = cfg.trainer
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * dp,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def stage_param_groups(stage: PipelineStage, weight_decay: float) -> list[dict]:
    """The same two groups (decayed, not decayed) on every stage.

    DeepSpeed all-reduces the gradient norm over TP x PP once per parameter group, so every
    stage must have the same number of groups or the step deadlocks; "decay_other" (only for
    Muon, which runs in one process) joins "decay", and a stage with nothing to put in a group
    gets a one-element placeholder parameter (outside the model, never saved, zero gradient).
    """
    groups = param_groups(stage.model, weight_decay)
    decay = [p for g in groups if g["group"] != "no_decay" for p in g["params"]]
    no_decay = [p for g in groups if g["group"] == "no_decay" for p in g["params"]]
    out = []
    for name, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if not params:
            placeholder = torch.nn.Parameter(torch.zeros(1))
            stage.register_parameter(f"placeholder_{name}", placeholder)
            params = [placeholder]
        out.append({"params": params, "weight_decay": wd, "group": name})
    return out


class ParallelTrainModule(TrainModule):
    """This rank's tensor-parallel shard of its pipeline stage. A ``checkpoint`` of any layout
    is read through `trainer.checkpoint.CheckpointReader`: weights go in before the engine
    copies them into its fp32 partitions, optimizer moments after."""

    def __init__(self, cfg: RunConfig, grid: Grid, checkpoint: Checkpoint | None = None) -> None:
        super().__init__(cfg, grid, checkpoint)
        self.accum = grad_accumulation_steps(cfg, world_size=grid.world)
        resume = None if checkpoint is None else CheckpointReader(checkpoint)
        from megatron.core import parallel_state as ps

        self.ps = ps
        if grid.tp > 1 or grid.ep > 1:
            self.tp = MegatronTensorParallel(sequence_parallel=cfg.parallel.sequence_parallel)
        else:
            self.tp = DENSE
        with torch.device("meta"):  # shapes only: the whole model's, and this rank's form
            whole = HybridLM(cfg.model, init=False)
            model = HybridLM(cfg.model, tp=self.tp, init=False)
        self.num_params = count_parameters(whole)
        self.train_flops_per_token = training_flops_per_token(whole, cfg.trainer.seq_len)
        self.virtual = cfg.parallel.virtual_stages
        ranges = stage_layer_ranges(cfg.model, grid.pp, self.virtual)
        chunks = rank_chunks(ranges, grid.pp_rank, grid.pp)
        self.stage = PipelineStage(model, chunks, grid.is_first_stage, grid.is_last_stage)
        seed = cfg.trainer.seed
        materialize(self.stage.model, seed)  # only the units of this stage, this rank's shards
        if self.stage.tied_head is not None:
            weight = unit_shards(cfg.model, "embed", seed, self.tp)["weight"]
            self.stage.tied_head = weight.clone().requires_grad_(True)
        # Hooks on the materialized parameters (to_empty made new ones).
        if self.tp.sequence_parallel:
            group = self.ps.get_tensor_model_parallel_group()
            reduce_sequence_parallel_grads(self.stage.model, group)
        if grid.ep > 1:
            group = self.ps.get_expert_model_parallel_group()
            reduce_expert_parallel_grads(self.stage.model, cfg.model, group, grid.ep_rank)
        set_recompute(self.stage.model, cfg.parallel.recompute)  # the same on every rank
        # Each chunk adds its share of the auxiliary losses: its reports over the whole model's.
        self.aux_counts = aux_loss_counts(cfg.model)
        self.chunk_aux_counts = [aux_loss_counts(cfg.model, range(s, e)) for s, e in chunks]
        if self.stage.model.embed is not None:
            self.stage.model.embed.weight._no_weight_decay = True  # as for nn.Embedding
        if resume is not None:
            self._load_weights(resume)
        self.stage.to(grid.device)
        if self.stage.tied_head is not None:
            self.stage.tied_head = self.stage.tied_head.to(grid.device).detach().requires_grad_()
        groups = stage_param_groups(self.stage, cfg.optim.weight_decay)
        optimizer = OPTIMIZERS.get(cfg.optim.name)(groups, cfg.optim)
        mpu = MegatronMPU(expert_parallel=grid.ep > 1)
        self.zero_stage = effective_zero_stage(cfg.parallel.zero_stage, grid.dp // grid.ep)
        if self.zero_stage == 0:
            self.engine = DataParallelEngine(
                self.stage, optimizer, mpu, cfg.optim.grad_clip or 0.0, self.accum
            )
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import deepspeed

                self.engine, *_ = deepspeed.initialize(
                    model=self.stage,
                    optimizer=optimizer,
                    mpu=mpu,
                    config=deepspeed_config(cfg, self.accum, grid.dp // grid.ep, self.zero_stage),
                    dist_init_required=False,
                )
        if resume is not None:
            self._load_optimizer(resume)
        post_optimizer_step(self.stage)
        self.link = StageLink(grid.prev_rank, grid.next_rank, grid.device)
        # Interleaving: the last rank's chunk c feeds the first rank's chunk c + 1 (a ring).
        self.ring = (
            RingLink(
                ps.get_pipeline_model_parallel_prev_rank(),
                ps.get_pipeline_model_parallel_next_rank(),
                grid.device,
            )
            if self.virtual > 1
            else None
        )
        # Checkpoint writes plan over their own group: an asynchronous save's collectives run
        # in a background thread while training uses the default group.
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        self._checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
        self._first_peer = ps.get_pipeline_model_parallel_first_rank()
        self._last_peer = ps.get_pipeline_model_parallel_last_rank()

    # ---- one optimizer step ---------------------------------------------------------------
    def train_step(
        self, micro_batches: list[torch.Tensor], lr: float, gather_metrics: bool = True
    ) -> StepResult:
        g, engine, stage = self.grid, self.engine, self.stage
        stage.train()
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        m = len(micro_batches)
        batches = [b.to(g.device) for b in micro_batches]
        shapes = state_shapes(self.cfg.model, batches[0].shape[0], self._stage_seq(batches[0]))
        lm_losses: list[torch.Tensor] = []
        metrics: Totals = {}
        precision = self.cfg.trainer.precision

        backwards = 0  # of the step's m x v; the last one is the accumulation boundary

        def forward(chunk: int, i: int, received):
            kwargs, targets = model_inputs(batches[i], self.eos_id)
            if received is not None:
                for t in received.values():
                    t.requires_grad_(True)
            counts = (self.aux_counts, self.chunk_aux_counts[chunk])
            with autocast(precision, g.device.type), recording(*counts) as recorder:
                out = engine(received, kwargs["input_ids"], kwargs.get("doc_ids"), chunk)
            aux = recorder.losses
            add_totals(metrics, recorder.totals())
            if stage.ends_model(chunk):
                lm = self.tp.cross_entropy(out, targets)
                lm_losses.append(lm.detach())
                out = lm + sum(aux.values()) if aux else lm
            return out, (received, aux)

        def backward(chunk: int, i: int, out, out_grads, ctx):
            nonlocal backwards
            received, aux = ctx
            backwards += 1
            last = backwards == m * self.virtual
            engine.set_gradient_accumulation_boundary(last)
            if stage.ends_model(chunk):
                engine.backward(out)  # DeepSpeed divides by the m micro-batches
            else:
                surrogate = sum((out[k] * out_grads[k]).sum() for k in out if out[k].requires_grad)
                if aux:  # this chunk's MoE losses, scaled as the engine scales the LM loss
                    surrogate = surrogate + sum(aux.values()) / m
                # The first rank's last backward is the embedding's chunk (last micro-batch).
                if last and self._tied_across_stages() and stage.first:
                    surrogate = surrogate + self._tied_gradient_term()
                engine.backward(surrogate, scale_wrt_gas=False)
            if received is None:
                return None
            return {
                k: t.grad if t.grad is not None else torch.zeros_like(t)
                for k, t in received.items()
            }

        if self.ring is not None:
            interleaved_one_f_one_b(
                m, g.pp_rank, g.pp, self.virtual, self.ring, shapes, forward, backward
            )
        else:  # v = 1: plain 1F1B over the one chunk
            one_f_one_b(
                m,
                g.pp_rank,
                g.pp,
                self.link,
                shapes,
                lambda i, received: forward(0, i, received),
                lambda i, out, out_grads, ctx: backward(0, i, out, out_grads, ctx),
            )
        if stage.tied_head is not None:  # the last stage's share of the tied embedding's gradient
            with operation("send the tied-embedding gradient to the first stage"):
                dist.send(stage.tied_head.grad.contiguous(), self._first_peer, tag=_TIED_TAG)
            stage.tied_head.grad = None
        with operation("optimizer step"):
            engine.step()
        self._sync_tied_weight()
        post_optimizer_step(stage)
        loss = self._mean_over_pipeline_and_data(
            torch.stack(lm_losses).mean() if lm_losses else None
        )
        norm = engine.get_global_grad_norm()
        gathered = self._gather_metrics(metrics) if gather_metrics else {}
        if gather_metrics and g.pp > 1:  # what interleaving saves, next to plain 1F1B
            gathered["pipeline/bubble"] = bubble_fraction(g.pp, m, self.virtual)
            gathered["pipeline/bubble_1f1b"] = bubble_fraction(g.pp, m)
        return StepResult(
            loss=loss,
            grad_norm=float(norm) if norm is not None else float("nan"),
            metrics=gathered,
        )

    def _stage_seq(self, batch: torch.Tensor) -> int:
        """The sequence length stages exchange: under sequence parallelism, a TP rank's part."""
        seq = batch.shape[1] - 1  # inputs and targets are one token apart
        return seq // self.tp.size if self.tp.sequence_parallel else seq

    def _tied_across_stages(self) -> bool:
        return self.cfg.model.tie_embeddings and self.grid.pp > 1

    def _tied_gradient_term(self) -> torch.Tensor:
        """First stage: sum(W * G_head), whose gradient adds the last stage's head gradient to
        the embedding's, inside the backward DeepSpeed's hooks watch."""
        weight = self.stage.model.embed.weight
        grad = torch.empty_like(weight)
        with operation("receive the tied-embedding gradient from the last stage"):
            dist.recv(grad, self._last_peer, tag=_TIED_TAG)
        return (weight * grad).sum()

    def _sync_tied_weight(self) -> None:
        """After the step the last stage's head copy takes the updated embedding."""
        if not self._tied_across_stages():
            return
        with operation("send the updated tied embedding to the last stage"):
            if self.stage.first:
                dist.send(
                    self.stage.model.embed.weight.data.contiguous(), self._last_peer, tag=_TIED_TAG
                )
            elif self.stage.tied_head is not None:
                dist.recv(self.stage.tied_head.data, self._first_peer, tag=_TIED_TAG)

    def _mean_over_pipeline_and_data(self, value: torch.Tensor | None) -> float:
        """The last stage's value, averaged over data-parallel ranks, known to every rank."""
        t = torch.zeros((), device=self.grid.device, dtype=torch.float64)
        if value is not None:  # float64 on every stage: the sum is the same whatever the dtype
            t += value.detach()
        with operation("all-reduce the loss"):
            if self.grid.pp > 1:
                dist.all_reduce(t, group=self.ps.get_pipeline_model_parallel_group())
            if self.grid.dp > 1:
                dist.all_reduce(t, group=self.ps.get_data_parallel_group())
        return t.item() / self.grid.dp

    def _gather_metrics(self, totals: Totals) -> dict[str, float]:
        """The auxiliary metrics as one process would log them: every (sum, count) of every
        stage and data-parallel rank merged, so a value averaged over the model's MoE sub-layers
        stays that wherever the pipeline cuts. Tensor-parallel peers hold the same values."""
        mine = (
            {k: (v.tolist(), n) for k, (v, n) in totals.items()} if self.grid.tp_rank == 0 else {}
        )
        gathered: list[dict] = [{} for _ in range(self.grid.world)]
        with operation("gather metrics"):
            dist.all_gather_object(gathered, mine)
        return merge_totals(gathered)

    # ---- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, samples: torch.Tensor, micro_batch_size: int) -> float:
        """Mean loss over held-out samples; every data-parallel group evaluates all of them."""
        g, stage = self.grid, self.stage
        stage.eval()
        batches = [c.to(g.device) for c in samples.split(micro_batch_size)]

        def forward(chunk: int, i: int, received):
            kwargs, targets = model_inputs(batches[i], self.eos_id)
            with autocast(self.cfg.trainer.precision, g.device.type):
                out = self.engine(received, kwargs["input_ids"], kwargs.get("doc_ids"), chunk)
            if stage.ends_model(chunk):
                return self.tp.cross_entropy(out, targets) * len(batches[i])
            return out

        def shapes_of(i: int):
            return state_shapes(self.cfg.model, len(batches[i]), self._stage_seq(batches[i]))

        if self.ring is not None:
            outputs = interleaved_forward_only(
                len(batches), g.pp_rank, g.pp, self.virtual, self.ring, shapes_of, forward
            )
        else:
            outputs = forward_only(
                len(batches), self.link, shapes_of, lambda i, received: forward(0, i, received)
            )
        stage.train()
        total = torch.stack(outputs).sum() if stage.last else None
        return self._mean_over_pipeline_and_data(total) / len(samples)

    # ---- checkpoints --------------------------------------------------------------------
    @property
    def layout(self) -> str:
        g = self.grid
        levers = [f"ep {g.ep}"] * (g.ep > 1) + ["sequence parallel"] * self.tp.sequence_parallel
        return f"{g.world} processes: dp {g.dp} x pp {g.pp} x tp {g.tp}" + "".join(
            f", {lever}" for lever in levers
        )

    @property
    def checkpoint_layout(self) -> dict[str, int]:
        return self.grid.layout

    def saved_rng(self, checkpoint: Checkpoint, trainer_state: dict) -> dict | None:
        """This rank's own RNG file when the layout is unchanged; under another layout ranks
        do not map one to one, so this run's seeding stays."""
        if checkpoint.layout != self.grid.layout:
            return None
        return CheckpointReader(checkpoint).rank_rng(self.grid.rank)

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def _link_optimizer_state(self) -> None:
        """Point every parameter at its slice of the optimizer state.

        DeepSpeed's ZeRO-1/2 links them once, right after the first parameter group's first
        step, when the other groups have no state yet: those stay unlinked (0.19.8), and
        their fragments then have no optimizer state to write or set. Linking again fixes that.
        """
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _state_keys(self) -> tuple[list[str], int]:
        """The optimizer's per-parameter state names (exp_avg, ...) and its step count."""
        keys, step = [], 0
        for state in self._inner_optimizer().state.values():
            keys = [k for k, v in state.items() if torch.is_tensor(v) and v.ndim > 0]
            step = int(float(state.get("step", 0)))
            break
        return keys, step

    def prepare_save(self, copy: bool) -> Callable[[Path], list[str]]:
        """What this rank holds, no gather: of each parameter its pieces (`held_pieces`: the
        tensor shard, or under ZeRO its partition of the fp32 master and moments) as boxes of
        the dense tensors, its buffers, and its RNG. The writer is a collective over the
        checkpoint group (`trainer.checkpoint.save_chunks`): boxes several ranks hold alike
        (replicas over data/tensor/expert parallelism) are written once, spread over them."""
        g, cfg = self.grid, self.cfg.model
        self._link_optimizer_state()
        keys, step = self._state_keys()
        optimizer = self.engine.optimizer
        chunks = []

        def place(key: str, name: str, shape, start: int, values: torch.Tensor) -> None:
            values = values.detach().float().to("cpu", copy=copy)
            split = split_of(name, cfg)
            chunks.extend(piece_chunks(key, tuple(shape), start, values, split, g.tp_rank, g.tp))

        for name, p in self.stage.model.named_parameters():
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3: the shard's shape, not the stub's
            for piece in held_pieces(p, self.zero_stage, optimizer, keys):
                place(model_key(name), name, shape, piece.start, piece.values)
                for key, moment in piece.moments.items():
                    place(moment_key(name, key), name, shape, piece.start, moment)
        # Persistent buffers are model state too (the PC layer's power-iteration vectors).
        for name, b in self._buffers().items():
            place(model_key(name), name, b.shape, 0, b)
        rng = rng_state()

        def write(directory: Path) -> list[str]:
            written = save_chunks(directory, chunks, {STEP_KEY: step}, self._checkpoint_group)
            torch.save(rng, directory / rng_file(g.rank))
            return [*written, rng_file(g.rank)]

        return write

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The stage's persistent buffers by dense name (what its state dict holds beyond the
        parameters)."""
        params = {name for name, _ in self.stage.model.named_parameters()}
        state = self.stage.model.state_dict(keep_vars=True)
        return {name: t for name, t in state.items() if name not in params}

    def _load_weights(self, reader: CheckpointReader) -> None:
        """This rank's slices of its stage's weights, read straight into them."""
        g = self.grid
        targets = {**dict(self.stage.model.named_parameters()), **self._buffers()}
        reader.read_into(targets, g.tp_rank, g.tp)
        if self.stage.tied_head is not None:
            reader.read_into({"embed.weight": self.stage.tied_head}, g.tp_rank, g.tp)

    def _load_optimizer(self, reader: CheckpointReader) -> None:
        step = reader.optimizer_step()
        if step == 0:
            return  # imported weights: the optimizer starts afresh
        g = self.grid
        if self.zero_stage == 0:  # the slices read become the state: no warm-up, no copies
            optimizer = self.engine.optimizer
            named = reader.named_optimizer_state(self.stage.model, optimizer, g.tp_rank, g.tp)
            optimizer.load_state_dict(named)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        self._materialize_optimizer_state()  # ZeRO: fill the partitions it creates
        self._link_optimizer_state()
        for name, p in self.stage.model.named_parameters():
            for key, shard in reader.moments(name, g.tp_rank, g.tp).items():
                if self.zero_stage == 3:
                    set_zero3_state(p, shard.to(g.device), key)
                else:
                    safe_set_full_optimizer_state(p, shard.to(g.device), key)
        for state in self._inner_optimizer().state.values():
            if "step" in state:  # keeps its device and dtype (fused AdamW: on the parameter's)
                state["step"] = torch.full_like(torch.as_tensor(state["step"]), float(step))

    def _materialize_optimizer_state(self) -> None:
        """One step with zero gradients at lr 0, so the engine creates its (empty) optimizer
        state to fill; AdamW and SGD leave the weights exactly as they are."""
        engine = self.engine
        saved = [group["lr"] for group in engine.optimizer.param_groups]
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
        engine.set_gradient_accumulation_boundary(True)
        params = list(self.stage.model.parameters())
        if self.zero_stage == 3:  # the partitioned tensors are stubs until gathered
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                zero = sum(p.sum() for p in params) * 0.0
                engine.backward(zero, scale_wrt_gas=False)
        else:
            zero = sum(p.sum() for p in params) * 0.0
            engine.backward(zero, scale_wrt_gas=False)
        with operation("optimizer warm-up step (restoring moments)"):
            engine.step()
        for group, lr in zip(engine.optimizer.param_groups, saved, strict=True):
            group["lr"] = lr
