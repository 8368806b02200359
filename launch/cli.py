"""The `hybridtron` command line: train, eval, generate, prepare-data, registry list."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from arch.registry import UserError

CKPT_HELP = (
    "checkpoint directory, run directory (its newest), s3://bucket/prefix (the store's newest "
    "complete checkpoint) or s3://bucket/prefix/step_N (downloaded, verified, cached)"
)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: tells a scheduler the job did not finish

MAIN_HELP = """hybridtron: pre-train hybrid (Mamba + attention + MoE) and optimizer-inspired LMs.

  hybridtron train [CONFIG] [key=value ...]      train (resumes from the newest checkpoint)
        [--nproc-per-node N]                     ... as N processes: parallel.tensor/pipeline/zero_stage
  hybridtron eval CKPT                           held-out loss of a checkpoint (a directory or s3://)
  hybridtron generate CKPT --prompt TEXT         sample text (greedy or top-p)
  hybridtron prepare-data [INPUT ...] --output DIR  files or a corpus -> tokenized MDS shards
  hybridtron train-tokenizer [INPUT ...] --output DIR   train a byte-level BPE tokenizer
  hybridtron merge-pc CKPT OUT                   fold PC-layer weights into plain ones
  hybridtron export CKPT OUT                     any checkpoint -> one-process run directory
  hybridtron import-hf HF_DIR OUT                Hugging Face Llama/Mixtral/Jamba -> run directory
  hybridtron export-hf CKPT OUT                  checkpoint -> Hugging Face config.json + safetensors
  hybridtron registry list [KIND]                every plugin with its one-line doc
  hybridtron plan [CONFIG] [key=value ...] --gpus N   layouts that fit, ranked by step time
  hybridtron cluster render KIND --nodes N --gpus-per-node G [CONFIG] [key=value ...]
                                                 Slurm / KubeRay / ray up file for a multi-node run
  hybridtron submit [CONFIG] [key=value ...] [--address ADDR] --num-workers N
                                                 train on Ray (embedded, or a cluster's Jobs API)
  hybridtron status|logs|stop JOB_ID [--address ADDR]   follow a submitted job

CONFIG is a YAML path or a recipe name from configs/ (default: the built-in defaults)."""


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] key=value",
        help="a YAML recipe (path or configs/ name) then dotlist overrides",
    )


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """(recipe or None, overrides), the overrides a new list (callers append to it)."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridtron",
        description=MAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model. Resumes from the "
        "newest checkpoint in trainer.run_dir when there is one.",
    )
    _config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume-from", metavar="PATH", help="resume from this checkpoint directory")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="run N processes on this machine (dp x pp x tp = N; gloo on CPU, NCCL on GPU); "
        "same as launch.nproc_per_node=N",
    )

    p = sub.add_parser(
        "eval",
        help="held-out loss of a checkpoint",
        description="Evaluate a checkpoint on the held-out split of its data.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument(
        "--data", metavar="PATH", help="prepared data directory (default: the run's data.path)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="held-out samples to evaluate (default: the run's trainer.eval_batches x "
        "micro_batch_size, so the figure matches the eval/loss it logged)",
    )

    p = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Generate text from a checkpoint: greedy by default, nucleus with --top-p.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; omit for greedy"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (top-p)")

    p = sub.add_parser(
        "prepare-data",
        help="tokenize a corpus into MDS shards",
        description="Tokenize files (INPUT: .txt/.md, .jsonl[.gz|.zst], .parquet, directories, "
        "globs) or the corpus data.dataset with data.tokenizer into MDS shards at data.path "
        "(--output), as samples of trainer.seq_len + 1 tokens. Re-running on the same input "
        "with the same settings does nothing.",
    )
    p.add_argument(
        "args", nargs="*", metavar="[CONFIG] [INPUT ...] [key=value]",
        help="a YAML recipe, input files/directories/globs, dotlist overrides",
    )  # fmt: skip
    p.add_argument("--output", metavar="DIR", help="where the shards go (data.path)")
    p.add_argument("--tokenizer", help="tokenizer name (data.tokenizer): byte, hf, ...")
    p.add_argument("--tokenizer-path", help="tokenizer.json or its directory (data.tokenizer_path)")
    p.add_argument("--seq-len", type=int, help="tokens per sample minus one (trainer.seq_len)")
    p.add_argument("--text-field", help="JSONL/Parquet field with the text (data.text_field)")
    p.add_argument("--workers", type=int, help="tokenizer processes (data.workers)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    p.add_argument(
        "--overwrite", action="store_true", help="replace data.path if it holds other data"
    )

    p = sub.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) on files, or on "
        "the embedded stdlib corpus when no INPUT is given; writes DIR/tokenizer.json for "
        "data.tokenizer=hf data.tokenizer_path=DIR.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories or globs")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")

    p = sub.add_parser(
        "merge-pc",
        help="merge PC-layer weights into plain ones",
        description="Write a checkpoint of the same model with every PC-layer projection merged "
        "into a plain weight (model.preconditioner.name=none): same outputs, no overhead.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("out", metavar="OUT", help="new run directory for the merged checkpoint")

    p = sub.add_parser(
        "export",
        help="consolidate a checkpoint into a one-process run directory",
        description="Write a new run directory OUT (config.yaml + checkpoints/step_N) holding one "
        "one-process checkpoint of the same model, from a one-process or tp x pp x dp sharded "
        "checkpoint: dense weights and buffers, the optimizer moments, step, tokens, RNG, data "
        "position and tokenizer. eval, generate, trainer.resume_from and load_pretrained take "
        "it, for any plugin's model (export-hf needs a Hugging Face family).",
    )
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("out", metavar="OUT", help="new (or empty) run directory")

    p = sub.add_parser(
        "import-hf",
        help="import a Hugging Face Llama / Mixtral / Jamba model",
        description="Convert a local Hugging Face directory (config.json + *.safetensors) of "
        "LlamaForCausalLM, MixtralForCausalLM or JambaForCausalLM into a run directory OUT "
        "(config.yaml + checkpoints/step_00000000) with identical logits.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model directory")
    p.add_argument("out", metavar="OUT", help="new run directory")

    p = sub.add_parser(
        "export-hf",
        help="export a checkpoint as a Hugging Face model",
        description="Write OUT/config.json + OUT/model.safetensors that transformers loads "
        "(AutoModelForCausalLM): Llama for '*-' patterns, Mixtral for '*E', Jamba when Mamba "
        "layers are present.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    p.add_argument("out", metavar="OUT", help="output directory")

    p = sub.add_parser(
        "checkpoint",
        help="convert a checkpoint of any layout into one model file or a Hugging Face model",
        description="checkpoint convert CKPT --to safetensors|torch|hf OUT: the dense weights "
        "of a checkpoint of any layout (its optimizer state is not read) as one safetensors or "
        "torch file (model config and step inside) or a Hugging Face directory.",
    )
    chk = p.add_subparsers(dest="checkpoint_command", metavar="convert")
    c = chk.add_parser("convert", help="write CKPT's model as one file or a Hugging Face model")
    c.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    c.add_argument("--to", required=True, choices=["safetensors", "torch", "hf"])
    c.add_argument("out", metavar="OUT", help="new file (safetensors, torch) or directory (hf)")

    p = sub.add_parser("registry", help="list plugins", description="List registered plugins.")
    reg = p.add_subparsers(dest="registry_command", metavar="list")
    r = reg.add_parser("list", help="print every plugin name with its one-line doc")
    r.add_argument("kind", nargs="?", help="only this kind (mixer, ffn, attention, residual, ...)")

    p = sub.add_parser(
        "plan",
        help="rank the parallel layouts that fit a cluster",
        description="Every valid layout (tensor, pipeline, virtual stages, expert, data "
        "parallelism, ZeRO, recomputation, micro-batch, sequence parallelism) of the config's "
        "model and global batch on --gpus devices: per-rank memory (parameters, gradients, "
        "optimizer from each rank's shard built on the meta device; activations, buffers, "
        "allocator overhead from the memory model), predicted step time, tokens/s per GPU, "
        "MFU and communication per kind, ranked by step time. Nothing runs on a GPU.",
    )
    _config_args(p)
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="devices in all")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="behind NVLink")
    p.add_argument(
        "--gpu",
        default="h100",
        type=str.lower,
        choices=("h100", "h200", "a100"),
        help="hardware preset (default h100); the flags below override its figures",
    )
    p.add_argument("--gpu-memory-gib", type=float, metavar="GIB", help="device memory")
    p.add_argument("--tflops", type=float, help="dense bf16 peak TFLOP/s per device")
    p.add_argument("--hbm-gbs", type=float, help="memory bandwidth, GB/s")
    p.add_argument("--nvlink-gbs", type=float, help="NVLink GB/s per GPU and direction")
    p.add_argument("--ib-gbs", type=float, help="InfiniBand GB/s per GPU and direction")
    p.add_argument(
        "--mamba-scan",
        default="cuda",
        choices=("cuda", "chunked", "cpu"),
        help="the Mamba-1 scan the cluster runs (cuda: mamba_ssm kernels)",
    )
    p.add_argument("--top", type=int, default=15, metavar="K", help="rows to show (default 15)")
    p.add_argument(
        "--explain",
        type=int,
        nargs="?",
        const=1,
        metavar="RANK",
        help="per-rank table of the RANK-th layout (default: the best)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser(
        "cluster",
        help="render a cluster file (Slurm, KubeRay, ray up)",
        description="Fill a template of clusters/ from the run config (cluster.* keys) and print "
        "it: slurm (sbatch script), kuberay (RayJob manifest), ray-launcher (ray up YAML).",
    )
    clu = p.add_subparsers(dest="cluster_command", metavar="render")
    c = clu.add_parser("render", help="print a filled cluster file")
    c.add_argument("kind", metavar="KIND", help="slurm, kuberay or ray-launcher")
    _config_args(c)
    c.add_argument("--nodes", type=int, metavar="N", help="nodes (cluster.nodes)")
    c.add_argument("--gpus-per-node", type=int, metavar="G", help="cluster.gpus_per_node")
    c.add_argument("--output", metavar="FILE", help="write FILE instead of printing")

    p = sub.add_parser(
        "submit",
        help="train on Ray: an embedded instance, or a cluster (--address)",
        description="Train with Ray Train (one worker per process, the same dp x pp x tp grid "
        "as train --nproc-per-node). Without --address: an embedded Ray on this machine, in the "
        "foreground. With --address http://HEAD:8265: submit through the cluster's Jobs API "
        "(the code and resolved config travel with the job), print the job id and follow it. "
        "Failed workers restart from the newest checkpoint (launch.max_failures).",
    )
    _config_args(p)
    p.add_argument("--address", metavar="ADDR", help="Ray dashboard / Jobs API, http://HEAD:8265")
    p.add_argument("--num-workers", type=int, default=1, metavar="N", help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=int, default=0, metavar="G", help="0: CPU (gloo)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    for name, text in (("status", "print a submitted job's status"),
                       ("logs", "print a submitted job's logs"),
                       ("stop", "stop a submitted job")):  # fmt: skip
        p = sub.add_parser(name, help=text, description=text.capitalize() + ".")
        p.add_argument("job_id", metavar="JOB_ID")
        p.add_argument(
            "--address", metavar="ADDR", help="Ray Jobs API (default: $RAY_ADDRESS or :8265)"
        )
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="follow until the job ends")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow an option (`train tiny --nproc-per-node 2 trainer.max_steps=9`).
    if extra and isinstance(getattr(args, "args", None), list):
        if any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"hybridtron {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            f"hybridtron {args.command}: interrupted; completed checkpoints are kept",
            file=sys.stderr,
        )
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from launch.config import load_config, to_yaml
    from trainer.parallel.grid import env_world

    config, overrides = _split_config(args.args)
    if args.resume_from:
        overrides.append(f"trainer.resume_from={args.resume_from}")
    if args.nproc_per_node is not None:
        overrides.append(f"launch.nproc_per_node={args.nproc_per_node}")
    world = env_world()[1]  # > 1: this process is one rank of a launch (ours, torchrun, Slurm, Ray)
    if world > 1:  # ranks keep quiet about adjusted values: a launcher said so once
        cfg = load_config(config, overrides, world_size=world, note=None)
    else:
        cfg = load_config(config, overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        import torch

        from arch import build_model, count_parameters

        with torch.device("meta"):
            n = count_parameters(build_model(cfg.model))
        print(f"# parameters: {n:,} ({n / 1e6:.2f}M)")
        with warnings.catch_warnings():  # Megatron's about Apex and Transformer Engine
            warnings.simplefilter("ignore")
            from trainer.parallel.memory_model import dry_run_line

            print(dry_run_line(cfg, max(world, cfg.launch.nproc_per_node)))
        return 0
    command = _train_command(args)
    if world > 1:
        return _train_rank(cfg, config, command=command)
    if cfg.launch.nproc_per_node > 1:
        from launch.spawn import spawn

        # The ranks get this command line, flags included, so rank 0's hints repeat it.
        argv = command + (["--resume-from", args.resume_from] if args.resume_from else [])
        return spawn(argv, cfg.launch.nproc_per_node, cfg.parallel.timeout_s, log=print)
    from trainer import Trainer

    result = Trainer(cfg).fit()
    _print_summary(cfg, result, command)
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def _train_command(args: argparse.Namespace) -> list[str]:
    """`train` with its recipe, overrides and --nproc-per-node, as parsed (no --resume-from)."""
    command = ["train", *args.args]
    if args.nproc_per_node is not None:
        command += ["--nproc-per-node", str(args.nproc_per_node)]
    return command


def _train_rank(
    cfg, config: str | None, reraise: bool = False, command: list[str] | None = None
) -> int:
    """One rank of a multi-process run: join the grid, train, report failures by rank.

    ``reraise``: raise errors instead of ending the process (a Ray Train worker).
    ``command``: the command line after `hybridtron` that started the run, for the hints at
    the end (a Ray worker gets the `submit` line from the driver; None: a `submit` of the run
    directory's resolved config)."""
    import logging

    from trainer import Trainer
    from trainer.parallel import watchdog
    from trainer.parallel.grid import destroy_grid, init_grid

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    p = cfg.parallel
    grid = init_grid(p.tensor, p.pipeline, p.timeout_s, p.expert)
    watchdog.set_prefix(grid.describe())
    dog = watchdog.Watchdog(p.timeout_s)
    try:
        result = Trainer(cfg, grid=grid).fit()
    except UserError as exc:
        if not getattr(exc, "quiet", False):  # else rank 0 reports what every rank stopped on
            print(f"hybridtron train: {grid.describe()}: error: {exc}", file=sys.stderr, flush=True)
        if reraise:
            dog.stop()
            raise
        os._exit(exc.exit_code)  # peers blocked in a collective must not keep this one alive
    except (RuntimeError, OSError) as exc:  # a collective that failed or timed out
        print(f"hybridtron train: {watchdog.describe_failure(exc)}", file=sys.stderr, flush=True)
        if reraise:
            dog.stop()
            raise
        os._exit(1)
    dog.stop()
    if grid.is_main:
        if command is None:
            command = _resolved_submit_command(cfg, grid.world)
        _print_summary(cfg, result, command)
    destroy_grid()
    return PREEMPTED_EXIT_CODE if result.preempted else 0


def _resolved_submit_command(cfg, world: int) -> list[str]:
    """A Ray run's `submit` command when the worker was not told the one the user typed: the
    run directory's resolved config (every key the run had) as the recipe."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    command = ["submit", str(Path(cfg.trainer.run_dir) / "config.yaml"), "--num-workers"]
    return command + [str(world)] + (["--gpus-per-worker", str(gpus)] if gpus else [])


def _parse_command(command: Sequence[str]) -> tuple[str, str | None, list[str], list[str]]:
    """(subcommand, recipe, overrides, options) of a `train` or `submit` command line; the
    options normalised to ``--flag value`` and --resume-from left out (hints never repeat it)."""
    args, extra = build_parser().parse_known_args(list(command))
    recipe, overrides = _split_config([*args.args, *extra])
    flags: list[str] = []
    if args.command == "train" and args.nproc_per_node is not None:
        flags += ["--nproc-per-node", str(args.nproc_per_node)]
    if args.command == "submit":
        flags += ["--address", args.address] if args.address else []
        flags += ["--num-workers", str(args.num_workers)]
        flags += ["--gpus-per-worker", str(args.gpus_per_worker)] if args.gpus_per_worker else []
        flags += ["--no-wait"] if args.no_wait else []
    return args.command, recipe, overrides, flags


def _set_keys(
    overrides: list[str], changes: dict[str, str | None], recipe: str | None
) -> list[str]:
    """``overrides`` with each key of ``changes`` set to its value: an override of the key is
    replaced in place, else one is appended. None unsets the key: its overrides go, and
    ``key=null`` is appended only when the recipe sets it."""
    out = list(overrides)
    for key, value in changes.items():
        spots = [i for i, item in enumerate(out) if item.partition("=")[0] == key]
        if value is None:
            out = [item for i, item in enumerate(out) if i not in spots]
            if recipe and _recipe_sets(recipe, key):
                out.append(f"{key}=null")
        elif spots:
            out[spots[-1]] = f"{key}={value}"  # the last one is the one that counted
            out = [item for i, item in enumerate(out) if i not in spots[:-1]]
        else:
            out.append(f"{key}={value}")
    return out


def _recipe_sets(recipe: str, key: str) -> bool:
    """Whether the recipe sets ``key``; True when it cannot be read here (a Ray worker on
    another machine or in another directory than the `submit`): ``key=null`` is then safe."""
    from omegaconf import OmegaConf

    from launch.config import _load_recipe

    try:
        loaded = _load_recipe(recipe)
    except UserError:
        return True
    return OmegaConf.select(loaded, key, default=None) is not None


def rerun_commands(command: Sequence[str], cfg) -> tuple[str, str]:
    """("resume", "continue longer") command lines for a run started by ``command`` (the
    arguments after `hybridtron`): that command with only the keys that must change replaced,
    shell-quoted. Both go on from the newest checkpoint in the run directory, so a
    --resume-from / trainer.resume_from, trainer.stop_at_step or trainer.resume=false is
    dropped; "continue longer" doubles trainer.max_steps and, when the warm-up took the whole
    run (the CLI shortens a longer one to max_steps - 1), keeps it at what the run used, so
    that a longer run does not warm up again."""
    sub, recipe, overrides, flags = _parse_command(command)
    t, o = cfg.trainer, cfg.optim
    resume: dict[str, str | None] = {}
    if t.resume_from:
        resume["trainer.resume_from"] = None
    if t.stop_at_step is not None:
        resume["trainer.stop_at_step"] = None
    if not t.resume:
        resume["trainer.resume"] = "true"
    longer = {**resume, "trainer.max_steps": str(2 * t.max_steps)}
    if o.warmup_steps >= t.max_steps - 1:
        longer["optim.warmup_steps"] = str(o.warmup_steps)

    def line(changes: dict[str, str | None]) -> str:
        items = _set_keys(overrides, changes, recipe)
        return shlex.join(["hybridtron", sub, *([recipe] if recipe else []), *items, *flags])

    return line(resume), line(longer)


def _print_summary(cfg, result, command: Sequence[str]) -> None:
    run = result.run_dir
    ckpt = result.last_checkpoint or result.resumed_from  # a resumed run may have had no step
    store = cfg.trainer.checkpoint_dir or ""
    if ckpt is not None and store.startswith("s3://") and not Path(ckpt).exists():
        ckpt = f"{store.rstrip('/')}/{Path(ckpt).name}"  # node-local staging: only the store has it
    last_loss = result.losses[max(result.losses)] if result.losses else float("nan")
    resume, longer = rerun_commands(command, cfg)
    head = "Pre-empted" if result.preempted else "Done"
    lines = [
        f"{head}: step {result.step}/{cfg.trainer.max_steps}, train loss {last_loss:.4f}"
        + (
            f", held-out loss {result.eval_loss:.4f} (perplexity {math.exp(result.eval_loss):.2f})"
            if result.eval_loss is not None
            else ""
        ),
        f"  run directory    {run}",
        f"  metrics          {run / 'metrics.jsonl'}",
        f"  TensorBoard      tensorboard --logdir {run / 'tb'}",
        f"  loss plot        {result.plot}",
        f"  checkpoint       {ckpt}",
        f"  resume           {resume}  # picks up the newest checkpoint",
        f"  continue longer  {longer}",
        f"  evaluate         hybridtron eval {ckpt}",
        f"  generate         hybridtron generate {ckpt} --prompt 'def '",
    ]
    print("\n".join(lines))


def cmd_eval(args: argparse.Namespace) -> int:
    from data_pipeline import check_prepared, load_eval_set
    from trainer.checkpoint import load_model
    from trainer.train_module import evaluate_loss

    model, cfg, checkpoint = load_model(args.checkpoint)
    if args.data:
        cfg.data.path = args.data
    check_prepared(cfg.data, cfg.trainer.seq_len, cfg.model.vocab_size)
    count = args.samples or cfg.trainer.eval_batches * cfg.trainer.micro_batch_size
    samples = load_eval_set(cfg.data, count)
    eos_id = None
    if cfg.data.document_masking:
        from data_pipeline.tokenizers import load_tokenizer

        eos_id = load_tokenizer(cfg.data.tokenizer, str(checkpoint.path)).eos_id
    loss = evaluate_loss(
        model, samples, cfg.trainer.micro_batch_size, cfg.trainer.precision, eos_id
    )
    print(
        f"checkpoint {checkpoint.path} (step {checkpoint.step}): held-out loss {loss:.4f}, "
        f"perplexity {math.exp(loss):.2f} over {len(samples)} samples of {cfg.trainer.seq_len} tokens "
        f"from {cfg.data.path}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from arch.generate import generate
    from data_pipeline.tokenizers import load_tokenizer
    from trainer.checkpoint import load_model

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model, cfg, checkpoint = load_model(args.checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer, str(checkpoint.path))  # saved with the weights
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue")
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(
        model,
        torch.tensor([prompt]),
        args.max_new_tokens,
        top_p=args.top_p,
        temperature=args.temperature,
        generator=generator,
        stop_token=tokenizer.eos_id,
    )
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from data_pipeline import prepare_data
    from launch.config import load_config

    config, rest = _split_config(args.args)
    if config is not None and not config.endswith((".yaml", ".yml")):
        config, rest = None, args.args  # no recipe: the first item is an input
    overrides = [a for a in rest if "=" in a]
    inputs = [a for a in rest if "=" not in a]
    if inputs:
        overrides += ["data.dataset=files", f"data.inputs={json.dumps(inputs)}"]
    for flag, key in (("output", "data.path"), ("tokenizer", "data.tokenizer"),
                      ("tokenizer_path", "data.tokenizer_path"), ("seq_len", "trainer.seq_len"),
                      ("text_field", "data.text_field"), ("workers", "data.workers")):  # fmt: skip
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    cfg = load_config(config, overrides)
    try:
        prepared = prepare_data(cfg.data, cfg.trainer.seq_len, overwrite=args.overwrite)
    except UserError as exc:
        for note in getattr(exc, "__notes__", []):  # what was skipped, before the error line
            print(note, file=sys.stderr)
        raise
    m = prepared.manifest
    if prepared.up_to_date:
        print(f"{prepared.path} is up to date (same inputs, tokenizer and settings): nothing to do")
        return 0
    for line in m["skip_summary"]:
        print(line)
    print(
        f"prepared {m['documents']} documents ({m['characters']:,} characters) of {m['dataset']!r} with "
        f"tokenizer {m['tokenizer']!r}: {m['splits']['train']['samples']} train and "
        f"{m['splits']['eval']['samples']} eval samples of {m['seq_len'] + 1} tokens in {prepared.path}"
    )
    if m["eval_split"] == "tokens":
        print(
            f"eval holds the last {cfg.data.eval_fraction:.0%} of the tokens: too few documents "
            f"to hold out whole ones"
        )
    return 0


def cmd_merge_pc(args: argparse.Namespace) -> int:
    from launch.merge_pc import merge_pc_checkpoint

    path = merge_pc_checkpoint(args.checkpoint, args.out)
    print(
        f"merged PC weights into {path} (model.preconditioner.name=none); evaluate: hybridtron eval {path}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launch.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path} (one process); evaluate: hybridtron eval {path}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from launch.hf_interop import import_hf

    path = import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} -> {path}; evaluate: hybridtron eval {path}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from launch.hf_interop import export_hf

    path = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path} (AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from arch.registry import UsageError
    from launch.convert import convert_checkpoint

    if args.checkpoint_command != "convert":
        raise UsageError("usage: hybridtron checkpoint convert CKPT --to safetensors|torch|hf OUT")
    path = convert_checkpoint(args.checkpoint, args.to, args.out)
    print(f"converted {args.checkpoint} -> {path} ({args.to})")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline import DATASETS, DataConfig, train_bpe
    from data_pipeline.sources import IngestReport

    name = "files" if args.inputs else "stdlib"
    cfg = DataConfig(dataset=name, inputs=args.inputs, text_field=args.text_field,
                     max_bytes=args.max_bytes)  # fmt: skip
    docs = DATASETS.get(name)().documents(cfg, IngestReport())
    file = train_bpe(docs, args.vocab_size, Path(args.output))
    print(f"trained a {args.vocab_size}-token byte-level BPE on {name} -> {file}; use it with "
          f"data.tokenizer=hf data.tokenizer_path={args.output}")  # fmt: skip
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    import data_pipeline  # noqa: F401  (each package registers its built-ins on import)
    import trainer  # noqa: F401
    from arch.model_plan import tensor_parallel_note
    from arch.recompute import recompute_note
    from arch.registry import Registry

    registries = Registry.all()
    if args.registry_command != "list":
        raise UserError("usage: hybridtron registry list [KIND]")
    if args.kind:
        if args.kind not in registries:
            raise UserError(f"unknown plugin kind {args.kind!r}; kinds: {', '.join(registries)}")
        registries = {args.kind: registries[args.kind]}
    for kind, registry in registries.items():
        print(f"{kind}: {registry.description}  [entry points: {registry.entry_point_group}]")
        for name, obj in registry.items():
            notes = tensor_parallel_note(kind, obj) + recompute_note(kind, obj)
            print(f"  {name:<16} {Registry.doc_line(obj)}{notes}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from launch.config import load_config

    config, overrides = _split_config(args.args)
    cfg = load_config(config, overrides, note=None)
    if args.gpus < 1:
        raise UserError(f"--gpus must be positive, got {args.gpus}")
    with warnings.catch_warnings():  # Megatron's about Apex and Transformer Engine
        warnings.simplefilter("ignore")
        from launch import plan_report
        from trainer.parallel.hardware import hardware
        from trainer.parallel.planner import plan, smallest_fitting_world

        hw = hardware(
            args.gpu,
            args.gpus,
            args.gpus_per_node,
            memory_gib=args.gpu_memory_gib,
            bf16_tflops=args.tflops,
            hbm_gbs=args.hbm_gbs,
            nvlink_gbs=args.nvlink_gbs,
            ib_gbs=args.ib_gbs,
        )
        preds = plan(cfg, hw, args.mamba_scan)
        fitting = [p for p in preds if p.fits]
        if args.json:
            print(json.dumps(plan_report.as_json(fitting, hw, args.mamba_scan, args.top), indent=1))
        elif fitting:
            t = cfg.trainer
            plan_report.print_ranking(
                fitting,
                f"{len(fitting)} of {len(preds)} valid layouts fit {hw.gpus} x {hw.name} "
                f"({hw.memory_gib:g} GiB); seq {t.seq_len}, global batch {t.global_batch_size}, "
                f"{t.precision}",
                args.top,
            )
            if args.explain is not None:
                if not 1 <= args.explain <= len(fitting):
                    raise UserError(f"--explain {args.explain}: choose 1..{len(fitting)}")
                plan_report.print_explain(fitting[args.explain - 1], hw, args.explain)
            plan_report.print_constants(hw, args.mamba_scan)
        if not fitting:
            if not preds:
                raise UserError(
                    f"no valid layout for {hw.gpus} GPUs: the global batch "
                    f"{cfg.trainer.global_batch_size} or the model's sizes divide no "
                    f"tensor x pipeline x data split of {hw.gpus}; try another --gpus"
                )
            best = min(preds, key=lambda p: p.peak_gib)
            more = smallest_fitting_world(cfg, hw, args.mamba_scan)
            fix = (
                f"{more} GPUs would fit (hybridtron plan ... --gpus {more})"
                if more
                else "no GPU count up to 16x fits; shrink the model or the sequence"
            )
            print(
                f"hybridtron plan: no layout fits {hw.gpus} x {hw.memory_gib:g} GiB: the "
                f"smallest peak is {best.peak_gib:.1f} GiB ({best.candidate.label()}); {fix}",
                file=sys.stderr,
            )
            return 1
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from arch.registry import UsageError
    from launch.cluster import render_command

    if args.cluster_command != "render":
        raise UsageError("usage: hybridtron cluster render KIND --nodes N --gpus-per-node G ...")
    kind, nodes, gpus, out = args.kind, args.nodes, args.gpus_per_node, args.output
    print(render_command(kind, args.args, nodes, gpus, out), end="" if not out else "\n")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.ray_job import submit

    return submit(args.args, args.address, args.num_workers, args.gpus_per_worker, args.no_wait)


def cmd_job(args: argparse.Namespace) -> int:
    from launch.ray_job import job_command

    return job_command(args.command, args.job_id, args.address, getattr(args, "follow", False))


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "prepare-data": cmd_prepare_data,
    "train-tokenizer": cmd_train_tokenizer,
    "merge-pc": cmd_merge_pc,
    "export": cmd_export,
    "import-hf": cmd_import_hf,
    "export-hf": cmd_export_hf,
    "checkpoint": cmd_checkpoint,
    "registry": cmd_registry,
    "plan": cmd_plan,
    "cluster": cmd_cluster,
    "submit": cmd_submit,
    "status": cmd_job,
    "logs": cmd_job,
    "stop": cmd_job,
}

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
