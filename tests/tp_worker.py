"""Run under torchrun by test_tensor_parallel.py: one tensor-parallel rank (gloo, CPU).

argv: OUT_DIR. For every model in `models()` it builds the dense model (same seed on every rank),
its tensor-parallel form (`build_model(cfg, seed, tp)` with the Megatron context), and compares losses, gradients
(merged from all ranks), a torch AdamW step and the loss after it. Writes OUT_DIR/rank<R>.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

faulthandler.dump_traceback_later(120, exit=True)  # a mismatched collective hangs on gloo

from megatron.core import parallel_state  # noqa: E402

from arch import ModelConfig  # noqa: E402
from arch.config import (  # noqa: E402
    AttentionConfig,
    Mamba2Config,
    MambaConfig,
    MoEConfig,
    PreconditionerConfig,
    ResidualConfig,
)
from arch.model import build_model, lm_loss  # noqa: E402
from arch.model_plan import is_tensor_parallel_param, merge_shards  # noqa: E402
from trainer.parallel.sequence_parallel import reduce_sequence_parallel_grads  # noqa: E402
from trainer.parallel.tensor_parallel import MegatronTensorParallel  # noqa: E402

PC_TARGETS = ["w1", "w2", "w3", "wo", "wq", "in_proj", "x_proj", "out_proj"]


def tiny(**kw) -> ModelConfig:
    base = dict(
        pattern="*-M-S-*E",
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=100,
        vocab_pad_multiple=64,
        ffn_hidden=64,
        mamba=MambaConfig(d_state=4),
        mamba2=Mamba2Config(d_state=8, head_dim=16, n_groups=2, chunk_size=8),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32),
    )
    base.update(kw)
    return ModelConfig(**base)


def models() -> dict[str, tuple[ModelConfig, bool, bool]]:
    """name -> (config, use doc_ids, sequence parallel): each model plain TP and with sequence
    parallelism (Megatron's form for the built-in mixers; the generic form with the PC layer)."""
    plain = {
        "hybrid_tied_heavy_ball_docs": (
            tiny(residual=ResidualConfig(name="heavy_ball"), tie_embeddings=True),
            True,
        ),
        "hybrid_untied_plain_window": (
            tiny(
                tie_embeddings=False,
                attention=AttentionConfig(name="sliding_window", window=5),
                mamba=MambaConfig(d_state=4, dt_norms=False),
                ffn_activation="relu2",
            ),
            False,
        ),
        "hybrid_pc_docs": (
            tiny(
                preconditioner=PreconditionerConfig(
                    name="pc", options={"level": 2, "targets": PC_TARGETS}
                ),
                tie_embeddings=False,
            ),
            True,
        ),
    }
    out = {name: (cfg, docs, False) for name, (cfg, docs) in plain.items()}
    out.update({f"{name}_sp": (cfg, docs, True) for name, (cfg, docs) in plain.items()})
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def post_step(model: torch.nn.Module) -> None:
    for module in model.modules():
        hook = getattr(module, "post_optimizer_step", None)
        if callable(hook):
            hook()


def check(cfg: ModelConfig, use_docs: bool, sequence_parallel: bool) -> dict:
    # float64: in fp32 the sharded sums' rounding left the loss 2.2e-7, the grads 1.4e-5, the
    # params after AdamW's sign-like first step 4e-4 and PC's power-iteration buffers 1.5e-4 apart
    # (MKL_CBWR=COMPATIBLE), 2-5x under the bounds or past them; see test_tensor_parallel.
    dense = build_model(cfg, seed=7).double()
    tp = MegatronTensorParallel(torch.float64, sequence_parallel=sequence_parallel)
    # The rank's shard as training builds it (meta device, unit by unit), then in float64 like
    # the dense model: the fp32 start values are upcast exactly either way.
    model = build_model(cfg, seed=7, tp=tp).double()
    if sequence_parallel:  # what ParallelTrainModule does: norms etc. see a sequence part
        group = parallel_state.get_tensor_model_parallel_group()
        res_sp = reduce_sequence_parallel_grads(model, group)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    doc_ids = None
    if use_docs:
        doc_ids = torch.zeros_like(inputs)
        doc_ids[0, 5:] = 1
        doc_ids[0, 11:] = 2
        doc_ids[1, 9:] = 1
    res: dict = {"sp_params": len(res_sp) if sequence_parallel else 0}
    res["keys_equal"] = list(model.state_dict()) == list(dense.state_dict())
    names = [n for n, _ in model.named_parameters()]
    res["names_equal"] = names == [n for n, _ in dense.named_parameters()]
    res["attrs_ok"] = all(
        bool(getattr(p, "tensor_model_parallel", False)) == is_tensor_parallel_param(n, cfg)
        for n, p in model.named_parameters()
    )
    res["n_sharded"] = sum(is_tensor_parallel_param(n, cfg) for n in names)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1)
    tp_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(2):
        dense_loss = lm_loss(dense(inputs, doc_ids), targets)
        logits = model(inputs, doc_ids)
        tp_loss = tp.cross_entropy(logits, targets)
        res["logits_shape"] = list(logits.shape)
        losses.append(
            (dense_loss.item(), tp_loss.item(), rel(tp_loss.detach(), dense_loss.detach()))
        )
        if step == 1:
            break
        dense_loss.backward()
        tp_loss.backward()
        dense_params = dict(dense.named_parameters())
        pairs, repl_diff = {}, 0.0
        for name, p in model.named_parameters():
            ref = dense_params[name].grad
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            ref = ref if ref is not None else torch.zeros_like(dense_params[name])
            if is_tensor_parallel_param(name, cfg):
                full = merge_shards(name, gather(g), cfg)
            else:
                full = g
                others = gather(g)
                repl_diff = max(repl_diff, max(float((o - g).abs().max()) for o in others))
            pairs[name] = (full, ref)
        # Relative to each grad's own scale, floored at 1e-3 of the largest grad: the residual
        # plugins' scalar grads are sums that cancel to ~1e-8, where fp32 rounding alone (dense
        # fp32 against fp64) is already 1e-3 relative.
        top = max(float(ref.abs().max()) for _, ref in pairs.values())
        grad_rel, worst = 0.0, ""
        for name, (full, ref) in pairs.items():
            r = float((full - ref).abs().max()) / max(float(ref.abs().max()), 1e-3 * top)
            if r > grad_rel:
                grad_rel, worst = r, name
        res["grad_max_rel"], res["grad_worst"] = grad_rel, worst
        res["replicated_grad_max_abs_diff"] = repl_diff
        dense_opt.step()
        tp_opt.step()
        post_step(dense)
        post_step(model)
    res["losses"] = losses
    dense_params = dict(dense.named_parameters())
    res["param_after_step_max_rel"] = max(
        rel(merge_shards(n, gather(p.detach()), cfg), dense_params[n].detach())
        for n, p in model.named_parameters()
    )
    dense_buffers = dict(dense.named_buffers())
    res["buffers_max_abs_diff"] = max(
        [float((b - dense_buffers[n]).abs().max()) for n, b in model.named_buffers()] + [0.0]
    )
    res["n_buffers"] = len(dense_buffers)
    res["buffers_rank_max_diff"] = max(
        [max(float((o - b).abs().max()) for o in gather(b)) for b in model.buffers()] + [0.0]
    )
    return res


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    torch.manual_seed(0)
    results = {name: check(*spec) for name, spec in models().items()}
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
