"""What of a Ray job's output reaches the user, and the failure line (no Ray started here)."""

from __future__ import annotations

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
