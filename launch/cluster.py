"""Cluster files for multi-node runs: the `cluster:` config section and the templates' renderer.

The templates in clusters/ (Slurm batch script, KubeRay RayJob, Ray cluster launcher) hold
``{{name}}`` placeholders; :func:`render` fills them from a job config, so that
``hybridtron cluster render KIND --nodes N --gpus-per-node G [CONFIG] [key=value ...]`` prints a
file that starts a Ray cluster and runs ``hybridtron submit`` on it. A placeholder alone on its
line takes a multi-line value, each line indented like the placeholder.

Every node is a GPU node, the Ray head included: ``nodes`` nodes of ``gpus_per_node`` GPUs make
one Ray Train worker per GPU (``--num-workers nodes x gpus_per_node --gpus-per-worker 1``).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from arch.registry import ConfigError, UsageError

if TYPE_CHECKING:
    from launch.config import JobConfig

CLUSTERS_DIR = Path(__file__).resolve().parent.parent / "clusters"
TEMPLATES = {
    "slurm": "slurm.sbatch",
    "kuberay": "kuberay-rayjob.yaml",
    "ray-launcher": "ray-cluster.yaml",
}
RAY_VERSION = "2.60.0"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def default_env() -> dict[str, str]:
    """NCCL over InfiniBand; edit NCCL_IB_HCA / NCCL_SOCKET_IFNAME to your fabric."""
    return {
        "NCCL_IB_HCA": "mlx5",  # RDMA devices NCCL may use (`ibv_devices`); prefix match
        "NCCL_SOCKET_IFNAME": "ib0",  # interface for NCCL's bootstrap sockets (`ip -br link`)
        "NCCL_IB_TIMEOUT": "22",  # IB verbs timeout exponent: 4.096 us x 2^22 ~ 17 s
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # keeps TP/SP compute-communication overlap in order
        "NCCL_DEBUG": "WARN",  # INFO prints the transport NCCL picked (IB vs socket)
    }


@dataclass
class ClusterConfig:
    """Where a multi-node run goes: `hybridtron cluster render` fills clusters/ from this."""

    nodes: int = 1  # GPU nodes, the Ray head included (--nodes N)
    gpus_per_node: int = 8  # --gpus-per-node G; one Ray Train worker per GPU
    cpus_per_node: int = 32  # CPUs Ray may schedule on a node (Slurm --cpus-per-task, pod cpu)
    memory: str = "256Gi"  # memory per pod (KubeRay requests and limits)
    job_name: str = "hybridtron"  # Slurm job, RayJob and launcher cluster name
    partition: str = ""  # Slurm partition ("" = the cluster's default)
    account: str = ""  # Slurm account ("" = your default)
    time_limit: str = "24:00:00"  # Slurm --time
    image: str = f"rayproject/ray:{RAY_VERSION}-py311-gpu"  # KubeRay image: must have hybridtron
    namespace: str = "default"  # Kubernetes namespace of the RayJob
    ray_port: int = 6379  # GCS port of the Ray head
    dashboard_port: int = 8265  # dashboard / Jobs API port: hybridtron submit --address
    env: dict[str, str] = field(default_factory=default_env)  # set on every node and worker
    storage: str = ""  # shared path every node sees for the run directory ("" = trainer.run_dir)
    # With checkpoints in an object store (launch.storage / trainer.checkpoint_dir = s3://...):
    # the Kubernetes Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally
    # AWS_DEFAULT_REGION, AWS_ENDPOINT_URL) every pod gets as environment variables (KubeRay).
    storage_secret: str = "hybridtron-s3"
    storage_endpoint: str = ""  # an S3-compatible store's URL (AWS_ENDPOINT_URL); "" = AWS
    setup: str = "source .venv/bin/activate"  # shell line that activates hybridtron on a node
    head_ip: str = ""  # ray-launcher: the head's address ("" = a placeholder to edit)
    worker_ips: list[str] = field(default_factory=list)  # ray-launcher: nodes - 1 addresses
    ssh_user: str = "ubuntu"  # ray-launcher: ssh user on every node


def validate_cluster_config(c: ClusterConfig) -> None:
    for key, value in (("nodes", c.nodes), ("gpus_per_node", c.gpus_per_node),
                       ("cpus_per_node", c.cpus_per_node)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"cluster.{key}", f"must be at least 1, got {value}")
    for key, value in (("ray_port", c.ray_port), ("dashboard_port", c.dashboard_port)):
        if not 0 < value < 65536:
            raise ConfigError(f"cluster.{key}", f"must be a TCP port, got {value}")
    if not _K8S_NAME.fullmatch(c.job_name) or len(c.job_name) > 47:
        raise ConfigError(
            "cluster.job_name",
            f"{c.job_name!r} must be lower-case letters, digits and '-' (a Kubernetes name, "
            "at most 47 characters)",
        )
    if not _K8S_NAME.fullmatch(c.storage_secret) or len(c.storage_secret) > 253:
        raise ConfigError(
            "cluster.storage_secret",
            f"{c.storage_secret!r} must be a Kubernetes Secret name (lower-case letters, digits "
            "and '-')",
        )
    if c.storage_endpoint and not re.fullmatch(r"https?://\S+", c.storage_endpoint):
        raise ConfigError(
            "cluster.storage_endpoint",
            f"{c.storage_endpoint!r} must be an http(s):// URL (the S3-compatible store's)",
        )
    for name in c.env:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"cluster.env.{name}", "is not a valid environment variable name")
    if c.worker_ips and len(c.worker_ips) != c.nodes - 1:
        raise ConfigError(
            "cluster.worker_ips",
            f"has {len(c.worker_ips)} addresses for {c.nodes} nodes; give nodes - 1 "
            f"({c.nodes - 1}), the head being cluster.head_ip",
        )


def job_command(cfg: JobConfig, config: str | None, overrides: list[str], address: str) -> str:
    """The `hybridtron submit` line a cluster file runs; ``address`` is pasted unquoted, so that
    it may hold a shell variable."""
    c = cfg.cluster
    args = [a for a in overrides if not a.startswith("cluster.")]
    if c.storage:
        args.append(f"trainer.run_dir={c.storage}")
    words = ["hybridtron", "submit", *([config] if config else []), *args]
    return (
        f"{shlex.join(words)} --address {address} "
        f"--num-workers {c.nodes * c.gpus_per_node} --gpus-per-worker 1"
    )


def _q(value: object) -> str:
    """A YAML scalar: JSON's double-quoted strings are valid YAML."""
    return json.dumps(value)


def _common(cfg: JobConfig) -> dict[str, object]:
    c = cfg.cluster
    return {
        "nodes": c.nodes,
        "workers": c.nodes - 1,
        "gpus_per_node": c.gpus_per_node,
        "cpus_per_node": c.cpus_per_node,
        "num_workers": c.nodes * c.gpus_per_node,
        "ray_port": c.ray_port,
        "dashboard_port": c.dashboard_port,
        "ray_version": RAY_VERSION,
    }


def _slurm_values(cfg: JobConfig, config: str | None, overrides: list[str]) -> dict[str, object]:
    c = cfg.cluster
    sbatch = [f"#SBATCH --{k}={v}" for k, v in (("partition", c.partition),
                                                ("account", c.account)) if v]  # fmt: skip
    exports = [f"export {k}={shlex.quote(v)}" for k, v in c.env.items()]
    return {
        "job_name": c.job_name,
        "time_limit": c.time_limit,
        "sbatch_options": "\n".join(sbatch) or "# (cluster.partition / cluster.account: unset)",
        "setup": c.setup or ":  # (cluster.setup: unset)",
        "env_exports": "\n".join(exports) or ":  # (cluster.env: empty)",
        "job_command": job_command(cfg, config, overrides, '"http://${head_ip}:${dashboard_port}"'),
    }


def object_store(cfg: JobConfig) -> str:
    """The s3:// URL the run's checkpoints go to ("" = none: they stay in trainer.run_dir)."""
    where = cfg.trainer.checkpoint_dir or ""
    return where if where.startswith("s3://") else ""


SHARED_VOLUME_NOTE = """\
#   - checkpoints: trainer.run_dir must be on a volume every pod mounts (add it under volumes /
#     volumeMounts, then cluster.storage=<its mount path>)"""

OBJECT_STORE_NOTE = """\
#   - checkpoints: in the object store {url}
#     (each pod keeps its run directory on its own disk: no shared volume). Every pod reads
#     the store's credentials from the Secret {secret} (cluster.storage_secret), made once:
#       kubectl create secret generic {secret} -n {namespace} \\
#         --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...
#     (add AWS_DEFAULT_REGION, or AWS_ENDPOINT_URL for an S3-compatible store, as keys there
#     or as cluster.storage_endpoint)"""


def _kuberay_values(cfg: JobConfig, config: str | None, overrides: list[str]) -> dict[str, object]:
    c = cfg.cluster
    env = [f"- name: {k}\n  value: {_q(v)}" for k, v in c.env.items()]
    address = f"http://127.0.0.1:{c.dashboard_port}"  # the entrypoint runs on the head pod
    url = object_store(cfg)
    env_from, note = "", SHARED_VOLUME_NOTE
    if url:  # every pod (Ray Train workers inherit the pod's environment) reaches the store
        env_from = f"envFrom:\n  - secretRef:\n      name: {_q(c.storage_secret)}"
        note = OBJECT_STORE_NOTE.format(url=url, secret=c.storage_secret, namespace=c.namespace)
        if c.storage_endpoint:
            env.append(f"- name: AWS_ENDPOINT_URL\n  value: {_q(c.storage_endpoint)}")
    return {
        "job_name": c.job_name,
        "namespace": _q(c.namespace),
        "image": _q(c.image),
        "memory": _q(c.memory),
        "container_env": "\n".join(env) or "[]",
        "env_from": env_from,
        "storage_note": note,
        "entrypoint": _q(job_command(cfg, config, overrides, address)),
    }


def _launcher_values(cfg: JobConfig, config: str | None, overrides: list[str]) -> dict[str, object]:
    c = cfg.cluster
    workers = c.worker_ips or [f"<worker-{i}-ip>" for i in range(1, c.nodes)]
    head = c.head_ip or "<head-ip>"
    address = f"http://{head}:{c.dashboard_port}"
    return {
        "job_name": c.job_name,
        "head_ip": _q(head),
        "worker_ips": "\n".join(f"- {_q(ip)}" for ip in workers) or "[]",
        "ssh_user": _q(c.ssh_user),
        "setup_check": _q(f"{c.setup or 'true'} && ray --version"),
        "setup_line": c.setup or "true",
        "env_assignments": " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items()),
        "job_command": job_command(cfg, config, overrides, shlex.quote(address)),
    }


VALUES = {"slurm": _slurm_values, "kuberay": _kuberay_values, "ray-launcher": _launcher_values}


def fill(template: str, values: dict[str, object]) -> str:
    """Replace every ``{{name}}``; one alone on its line indents each line of its value."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{{{name}}}}} has no value")
        return str(values[name])

    lines = []
    for line in template.splitlines(keepends=True):
        alone = PLACEHOLDER.fullmatch(line.strip())
        if alone:
            indent = line[: len(line) - len(line.lstrip())]
            text = value(alone)
            lines.append("".join(f"{indent}{row}\n" for row in text.splitlines()))
        else:
            lines.append(PLACEHOLDER.sub(value, line))
    return "".join(lines)


def render(kind: str, cfg: JobConfig, config: str | None = None, overrides: list[str] = ()) -> str:
    """The cluster file ``kind`` (slurm, kuberay, ray-launcher) filled from ``cfg``; ``config``
    and ``overrides`` are what the job's ``hybridtron submit`` line passes on."""
    if kind not in TEMPLATES:
        raise UsageError(f"unknown cluster kind {kind!r}; kinds: {', '.join(TEMPLATES)}")
    validate_cluster_config(cfg.cluster)
    template = (CLUSTERS_DIR / TEMPLATES[kind]).read_text()
    values = {**_common(cfg), **VALUES[kind](cfg, config, list(overrides))}
    return fill(template, values)


def _cluster_section(config: str | None, overrides: list[str]) -> ClusterConfig | None:
    """The ``cluster:`` section alone (recipe + cluster.* overrides), to size the world the
    full config is validated for; None where it does not load (load_config then says why)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from launch.config import _load_recipe, parse_override

    conf = OmegaConf.structured(ClusterConfig)
    try:
        recipe = _load_recipe(config) if config else {}
        if "cluster" in recipe:
            conf = OmegaConf.merge(conf, recipe["cluster"])
        for item in overrides:
            key, layer = parse_override(item)
            if key.startswith("cluster."):
                conf = OmegaConf.merge(conf, layer["cluster"])
        section = OmegaConf.to_object(conf)
    except OmegaConfBaseException:
        return None
    assert isinstance(section, ClusterConfig)
    return section


def render_command(
    kind: str,
    args: list[str],
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    output: str | None = None,
) -> str:
    """`hybridtron cluster render`: load the run config (so cluster.* overrides apply) for the
    cluster's world (one rank per GPU), render, and write ``output``; returns what to print."""
    from launch.config import load_config

    if kind not in TEMPLATES:
        raise UsageError(f"unknown cluster kind {kind!r}; kinds: {', '.join(TEMPLATES)}")
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    config, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
    flags = [f"cluster.nodes={nodes}"] if nodes is not None else []
    if gpus_per_node is not None:
        flags.append(f"cluster.gpus_per_node={gpus_per_node}")
    section = _cluster_section(config, [*overrides, *flags])
    world = None
    if section is not None:
        validate_cluster_config(section)
        world = section.nodes * section.gpus_per_node
    cfg = load_config(config, [*overrides, *flags], world_size=world)
    text = render(kind, cfg, config, overrides)
    if not output:
        return text
    Path(output).write_text(text)
    if kind == "slurm":
        Path(output).chmod(0o755)
    c = cfg.cluster
    return f"wrote {output}: {kind}, {c.nodes} node(s) x {c.gpus_per_node} GPU(s)"
