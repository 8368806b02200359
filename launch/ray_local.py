"""The embedded Ray instance of `hybridtron submit` (no --address) listens on 127.0.0.1 only.

Left alone, Ray 2.60 turns a node address of 127.0.0.1 into the machine's outward address and
binds GCS, raylet, driver, worker and agent gRPC servers to every interface, its metrics exporters
to 0.0.0.0; and torch's TCPStore, which rank 0 hosts for the process group, binds every interface
whatever MASTER_ADDR says. Here: Ray's own laptop setting keeps the node address at 127.0.0.1
(every Ray server then binds to it), and rank 0's store listens on a socket bound to MASTER_ADDR.
tests/test_ray_launch.py lists the listening sockets of a running job's process tree.

Ray picks free ports for most of its servers, but three are fixed: the dashboard agent's HTTP
port (52365), the autoscaler's and the dashboard's metrics ports (44217, 44227). A second
instance on the machine (another `hybridtron submit`, a `ray start`) then finds them taken: its
agent retries and runs without HTTP, its metrics servers don't start and the dashboard's address
in the GCS names the other instance's. :func:`free_fixed_ports` gives each a free port instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1 stays 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",  # a private instance reports nothing
}


def loopback_only() -> None:
    """Before `ray.init`: every server of the instance binds 127.0.0.1 (children inherit it)."""
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported already: it read the variable then
        constants.ENABLE_RAY_CLUSTER = False


# Ray's fixed ports that its child processes read from the environment (ray.autoscaler's and
# ray.dashboard's constants).
FIXED_PORT_ENV = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
# Ray's default ports (GCS, client, dashboard, agent, metrics): a `ray start` wants them.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 44217, 44227, 52365})


def free_port(host: str = "127.0.0.1", taken: frozenset[int] = frozenset()) -> int:
    """A port free on ``host`` now, none of Ray's defaults nor of ``taken``."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS | taken:
            return port


@contextlib.contextmanager
def free_fixed_ports() -> Iterator[dict[str, int]]:
    """Around `ray.init` of the embedded instance: a free port for each of Ray's fixed ones
    (the metrics ports through their environment variables, which the processes Ray starts
    inherit; the dashboard agent's through Ray's node parameters); the ports chosen."""
    ports: dict[str, int] = {}
    for name in (*FIXED_PORT_ENV, "dashboard_agent_listen_port"):
        ports[name] = free_port(taken=frozenset(ports.values()))
    agent_port = ports.pop("dashboard_agent_listen_port")
    saved = {name: os.environ.get(name) for name in FIXED_PORT_ENV}
    os.environ.update({name: str(port) for name, port in ports.items()})
    try:
        try:
            import ray._private.parameter as parameter

            original = parameter.RayParams
        except (ImportError, AttributeError):  # Ray's internals moved: its default port stays
            yield ports
            return

        class RayParams(original):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("dashboard_agent_listen_port", agent_port)
                super().__init__(*args, **kwargs)

        parameter.RayParams = RayParams
        try:
            yield {**ports, "dashboard_agent_listen_port": agent_port}
        finally:
            parameter.RayParams = original
    finally:  # the processes that read them have started
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_torch_config(**kwargs):
    """A Ray Train TorchConfig whose workers host the process group's store on MASTER_ADDR (a
    loopback address here) instead of every interface; the stock one if Ray's internals moved."""
    from ray.train.torch import TorchConfig

    try:
        from ray.train.torch.config import _TorchBackend
    except ImportError:
        return TorchConfig(**kwargs)

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(bind_store_to_master_addr)
            super().on_start(worker_group, backend_config)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig(**kwargs)


def bind_store_to_master_addr() -> None:
    """In a worker, before the process group: rank 0 creates its TCPStore on a socket bound to
    MASTER_ADDR when that is a loopback address (torch's own server binds every interface)."""
    import importlib

    from torch.distributed import TCPStore

    # the module (`import torch.distributed.rendezvous as r` gives the function of that name)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = getattr(rendezvous, "_create_c10d_store", None)
    if original is None or getattr(original, "loopback", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or not is_loopback(hostname):
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        listener = socket.create_server((hostname, port), family=family, backlog=128)
        return TCPStore(hostname, port, world_size, True, timeout, multi_tenant=True,
                        master_listen_fd=listener.detach(), use_libuv=use_libuv)  # fmt: skip

    create_store.loopback = True
    rendezvous._create_c10d_store = create_store
