"""What of a Ray job's output reaches the user, and the failure line (no Ray started here)."""

from __future__ import annotations

import os
import sys

from launch.ray_job import job_python
from launch.ray_output import OutputFilter, last_exception_line

WORKER = "\x1b[36m(RayTrainWorker pid=7)\x1b[0m "


def test_noise_is_dropped_and_the_trainer_output_kept():
    lines = [
        "\x1b[36m(PlacementGroupCleaner pid=3)\x1b[0m Failed to query Ray Train Controller actor "
        "state. State API may be temporarily unavailable. Continuing to monitor.",
        "\x1b[36m(TrainController pid=4)\x1b[0m Attempting to start training worker group",
        "\x1b[36m(TrainController pid=4)\x1b[0m [FailurePolicy] RETRY",
        "\x1b[36m(TrainController pid=4)\x1b[0m Traceback (most recent call last):",
        WORKER + "[resume] from run/checkpoints/step_00000002 at step 2",
        WORKER + "Error in training function:",
        WORKER + "Traceback (most recent call last):",
        WORKER + '  File "/work/main/trainer/loop.py", line 262, in fit',
        WORKER + "    out = module.train_step(micro_batches)",
        WORKER + "          ^^^^^^^^^^^^^^^^^^^^^^^^^",
        WORKER + "RuntimeError: Connection reset by peer",
        WORKER + "Done: step 12/12, train loss 4.8416",
        "Traceback (most recent call last):",  # the entrypoint's own, unprefixed
        '  File "<frozen runpy>", line 198, in _run_module_as_main',
        "ModuleNotFoundError: No module named 'torch'",
    ]
    shown = OutputFilter().lines(lines)
    assert shown == [
        "\x1b[36m(TrainController pid=4)\x1b[0m [FailurePolicy] RETRY",
        WORKER + "[resume] from run/checkpoints/step_00000002 at step 2",
        WORKER + "RuntimeError: Connection reset by peer",
        WORKER + "Done: step 12/12, train loss 4.8416",
        "ModuleNotFoundError: No module named 'torch'",
    ]


def test_last_exception_line_of_a_job_log():
    log = "\n".join([
        "Running entrypoint for job hybridtron-x: /usr/bin/python3 -m launch.ray_job run ...",
        "Traceback (most recent call last):",
        '  File "/tmp/ray/session/runtime_resources/launch/ray_job.py", line 28, in <module>',
        "    from arch.registry import UsageError, UserError",
        WORKER + "ray.exceptions.ActorDiedError: The actor died",
        "ModuleNotFoundError: No module named 'torch'",
        "",
    ])  # fmt: skip
    assert last_exception_line(log) == "ModuleNotFoundError: No module named 'torch'"
    assert last_exception_line(log.rsplit("ModuleNotFound", 1)[0]).startswith(
        "ray.exceptions.ActorDiedError: The actor died"
    )
    assert last_exception_line("step 3 loss 4.2\nDone: step 4/4") is None


def test_the_entrypoint_python(monkeypatch):
    monkeypatch.delenv("HYBRIDTRON_JOB_PYTHON", raising=False)
    assert job_python("http://127.0.0.1:8265") == sys.executable  # a head on this machine
    assert job_python("http://192.0.2.250:8265") == "python"  # another: its PATH decides
    monkeypatch.setenv("HYBRIDTRON_JOB_PYTHON", "/opt/venv/bin/python")
    assert job_python("http://192.0.2.250:8265") == "/opt/venv/bin/python"


def test_the_hints_of_a_ray_run_repeat_its_submit_command():
    """What rank 0 of a Ray run prints to resume / continue: the submit line as given (recipe,
    overrides in order, options), only the keys that must change replaced."""
    from launch.cli import rerun_commands
    from launch.config import load_config
    from launch.ray_job import submit_command

    overrides = ["trainer.max_steps=6", "model.pattern=*M*-", "trainer.stop_at_step=3"]
    command = submit_command(["tiny", *overrides], "http://head:8265", 4, 1)
    assert command == ["submit", "tiny", *overrides, "--num-workers", "4",
                       "--address", "http://head:8265", "--gpus-per-worker", "1"]  # fmt: skip
    cfg = load_config("tiny", overrides)
    resume, longer = rerun_commands(command, cfg)
    flags = "--address http://head:8265 --num-workers 4 --gpus-per-worker 1"
    assert resume == f"hybridtron submit tiny trainer.max_steps=6 'model.pattern=*M*-' {flags}"
    pinned = "optim.warmup_steps=5"  # the warm-up took the whole run (shortened to 5)
    assert longer == (
        f"hybridtron submit tiny trainer.max_steps=12 'model.pattern=*M*-' {pinned} {flags}"
    )


def test_a_recipe_the_worker_cannot_read_still_gives_hints():
    """A Ray worker on another machine may not see the recipe path typed at `submit`: the
    hints unset a key with `key=null` instead of failing the finished run."""
    from launch.cli import rerun_commands
    from launch.config import load_config

    cfg = load_config(None, ["trainer.stop_at_step=3"])
    command = ["submit", "/nowhere/recipe.yaml", "trainer.stop_at_step=3", "--num-workers", "2"]
    resume, _ = rerun_commands(command, cfg)
    assert resume == (
        "hybridtron submit /nowhere/recipe.yaml trainer.stop_at_step=null --num-workers 2"
    )


def test_workers_print_each_line_once():
    """Ray Train's print patch sends each printed line to the driver twice (its logger on
    stderr, and stdout): every job's workers run without it, whatever cluster.env says."""
    from launch.config import load_config
    from launch.ray_job import job_env

    cfg = load_config(None, ["cluster.env.RAY_TRAIN_ENABLE_PRINT_PATCH=1"])
    assert job_env(cfg)["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


def test_the_embedded_instance_takes_none_of_rays_fixed_ports(monkeypatch):
    """Ray's fixed ports (agent HTTP 52365, metrics 44217 / 44227) become free ports, so that
    two embedded `submit`s (or one and a `ray start`) run side by side; put back afterwards."""
    import socket

    import ray._private.parameter as parameter

    from launch.ray_local import RAY_DEFAULT_PORTS, free_fixed_ports

    monkeypatch.setenv("DASHBOARD_METRIC_PORT", "44227")
    monkeypatch.delenv("AUTOSCALER_METRIC_PORT", raising=False)
    with free_fixed_ports() as ports:
        params = parameter.RayParams(node_ip_address="127.0.0.1")
        assert params.dashboard_agent_listen_port == ports["dashboard_agent_listen_port"]
        assert parameter.RayParams(dashboard_agent_listen_port=7).dashboard_agent_listen_port == 7
        for name in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
            assert os.environ[name] == str(ports[name])
        assert len(set(ports.values())) == 3 and not set(ports.values()) & RAY_DEFAULT_PORTS
        for port in ports.values():  # free: a server can bind it
            with socket.create_server(("127.0.0.1", port)):
                pass
    assert parameter.RayParams().dashboard_agent_listen_port == 52365
    assert os.environ["DASHBOARD_METRIC_PORT"] == "44227"
    assert "AUTOSCALER_METRIC_PORT" not in os.environ
