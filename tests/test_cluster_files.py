"""clusters/: each template renders for 1 and 4 nodes with nothing left to fill, parses, and has
what its tool needs (sbatch + bash, KubeRay RayJob, Ray's cluster launcher schema)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from conftest import REPO, run_cli

from arch.registry import ConfigError, UsageError
from launch.cluster import PLACEHOLDER, TEMPLATES, render, render_command
from launch.config import load_config

GPUS = 8
RECIPE = "jamba_125m"  # global batch 256 of micro-batches of 8: fits 8 to 32 GPUs
NCCL = ["NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_IB_TIMEOUT", "CUDA_DEVICE_MAX_CONNECTIONS"]


def rendered(kind: str, nodes: int, *overrides: str) -> str:
    cluster = [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={GPUS}"]
    cfg = load_config(RECIPE, [*overrides, *cluster], world_size=nodes * GPUS)
    text = render(kind, cfg, RECIPE, list(overrides))
    assert "{{" not in text and "}}" not in text, PLACEHOLDER.findall(text)
    return text


def test_every_template_exists_and_documents_itself():
    for kind, name in TEMPLATES.items():
        head = (REPO / "clusters" / name).read_text().splitlines()[:20]
        comments = "\n".join(line for line in head if line.startswith("#"))
        assert "What to edit" in comments and "Run" in comments, name
        assert f"hybridtron cluster render {kind}" in comments, name
    readme = (REPO / "clusters" / "README.md").read_text()
    assert all(name in readme for name in TEMPLATES.values())


@pytest.mark.parametrize("nodes", [1, 4])
def test_slurm_script(nodes, tmp_path):
    text = rendered("slurm", nodes, "trainer.max_steps=2000")
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, re.M)
    for option in (f"--nodes={nodes}", f"--gpus-per-node={GPUS}", "--ntasks-per-node=1",
                   "--exclusive"):  # fmt: skip
        assert option in sbatch
    for name in NCCL:
        assert re.search(rf"^export {name}=\S+$", text, re.M), name
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN" in text
    assert "ray start --head" in text and 'ray start --address="$head_ip:$ray_port"' in text
    job = next(line for line in text.splitlines() if line.startswith("hybridtron submit"))
    assert job.startswith(f"hybridtron submit {RECIPE} trainer.max_steps=2000 ")
    assert job.endswith(" &")  # in the background: the script passes SIGTERM on to it
    assert "--signal=B:TERM@180" in sbatch and 'trap \'kill -TERM "$job_pid"' in text
    assert '--address "http://${head_ip}:${dashboard_port}"' in job
    assert f"--num-workers {nodes * GPUS} --gpus-per-worker 1" in job


@pytest.mark.parametrize("nodes", [1, 4])
def test_kuberay_rayjob(nodes):
    job = yaml.safe_load(rendered("kuberay", nodes, "cluster.env.NCCL_DEBUG=INFO"))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"] == "hybridtron"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("hybridtron submit ")
    assert f"--num-workers {nodes * GPUS}" in spec["entrypoint"]
    assert "cluster." not in spec["entrypoint"]  # cluster.* shape the files, not the job
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == nodes - 1
    worker = workers["template"]["spec"]["containers"][0]
    for container in head, worker:
        assert container["image"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == GPUS
        env = {e["name"]: e["value"] for e in container["env"]}
        assert set(NCCL) <= set(env) and env["NCCL_DEBUG"] == "INFO"
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["dashboard"] == 8265


@pytest.mark.parametrize(
    "store",
    [
        ("launch.storage=s3://bkt/runs", "cluster.storage_endpoint=http://minio:9000"),
        ("trainer.checkpoint_dir=s3://bkt/exp", "cluster.storage_secret=team-s3"),
    ],
)
def test_kuberay_rayjob_with_an_object_store_needs_no_shared_volume(store):
    """Checkpoints in a store: every pod gets the Secret's AWS_* variables (envFrom) and the
    endpoint, no volume but /dev/shm, the job carries the storage setting; without a store
    the render has none of it."""
    text = rendered("kuberay", 4, *store)
    job = yaml.safe_load(text)
    assert store[0] in job["spec"]["entrypoint"]
    secret = "team-s3" if "cluster.storage_secret=team-s3" in store else "hybridtron-s3"
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]]
    for pod in pods:
        spec = pod["template"]["spec"]
        (container,) = spec["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": secret}}]
        env = {e["name"]: e["value"] for e in container["env"]}
        if "minio" in store[1]:
            assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert [v["name"] for v in spec["volumes"]] == ["dshm"]  # no shared volume
        assert all("persistentVolumeClaim" not in v for v in spec["volumes"])
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/dev/shm"]
    assert f"kubectl create secret generic {secret}" in text
    plain = yaml.safe_load(rendered("kuberay", 4))["spec"]["rayClusterSpec"]
    for pod in plain["headGroupSpec"], plain["workerGroupSpecs"][0]:
        container = pod["template"]["spec"]["containers"][0]
        assert "envFrom" not in container
        assert "AWS_ENDPOINT_URL" not in {e["name"] for e in container["env"]}
    with pytest.raises(ConfigError, match="cluster.storage_endpoint"):
        rendered("kuberay", 1, store[0], "cluster.storage_endpoint=minio:9000")


@pytest.mark.parametrize("nodes", [1, 4])
def test_ray_cluster_launcher(nodes):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(rendered("ray-launcher", nodes))
    assert config["cluster_name"] == "hybridtron"
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == nodes - 1
    assert config["min_workers"] == config["max_workers"] == nodes - 1
    head, worker = config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]
    assert "ray start --head" in head and "ray start --address=$RAY_HEAD_IP:6379" in worker
    for command in head, worker:
        assert "NCCL_SOCKET_IFNAME=ib0" in command and "RAY_AUTH_MODE=token" in command
    validate_config(prepare_config(config))  # what `ray up` checks before it starts anything


def test_launcher_addresses_and_cluster_checks(tmp_path):
    ips = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    text = rendered(
        "ray-launcher", 4, "cluster.head_ip=10.0.0.1", f"cluster.worker_ips=[{','.join(ips)}]"
    )
    assert yaml.safe_load(text)["provider"]["worker_ips"] == ips
    with pytest.raises(ConfigError, match="cluster.worker_ips"):
        rendered("ray-launcher", 4, "cluster.worker_ips=[10.0.0.2]")
    with pytest.raises(ConfigError, match="cluster.job_name"):
        rendered("kuberay", 1, "cluster.job_name=My_Job")
    with pytest.raises(UsageError, match="--nodes must be at least 1"):
        render_command("slurm", [], nodes=0, gpus_per_node=GPUS)
    with pytest.raises(UsageError, match="unknown cluster kind 'pbs'"):
        render_command("pbs", [], nodes=1)
    with pytest.raises(ConfigError, match="trainer.global_batch_size"):  # 256 over 64 ranks
        render_command("slurm", [RECIPE], nodes=8, gpus_per_node=GPUS)
    out = tmp_path / "job.sbatch"
    assert "wrote" in render_command("slurm", [RECIPE], nodes=2, gpus_per_node=4, output=str(out))
    assert "#SBATCH --gpus-per-node=4" in out.read_text()


def test_cli_render_and_bad_kind(tmp_path):
    ok = run_cli("cluster", "render", "slurm", "--nodes", "2", "--gpus-per-node", "8", RECIPE)
    assert ok.returncode == 0, ok.stderr
    assert "#SBATCH --nodes=2" in ok.stdout and "--num-workers 16" in ok.stdout
    bad = run_cli("cluster", "render", "pbs", "--nodes", "2")
    assert bad.returncode == 2 and not bad.stdout
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip() == (
        "hybridtron cluster: error: unknown cluster kind 'pbs'; kinds: slurm, kuberay, ray-launcher"
    )
