"""One Ray node (head or worker) in this process, started through Ray's Python node API.

Layer: platform (the elastic pool). ``mlaas node join`` (:mod:`mlaas.cli_node`)
and the Ray tests start nodes through :func:`run_node`; the executor that
places jobs on them is :mod:`mlaas.platform.executors.ray_executor`.

Why not ``ray start``: Ray replaces a loopback node address with the
machine's outward IP (``ray._private.services.resolve_ip_for_localhost``), so
``ray start --node-ip-address 127.0.0.1`` binds its servers on the public
interface, and with Ray's single-machine switch
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) ``ray start --address`` refuses to
start a worker node at all. The node API (``ray._private.node.Node``, what
``ray start --block`` and ``ray.cluster_utils`` call underneath) takes the
address as given. For a loopback address this module also sets that switch,
so every process of the node (and its workers, which inherit the
environment) keeps to 127.0.0.1. With a real address it behaves as
``ray start --block``.

The node's processes (GCS on a head, raylet, agents, workers) die with this
process (Ray asks the kernel for it); :func:`run_node` blocks until SIGTERM or
SIGINT, then stops them. The module is pinned to Ray's private node API of the
version in the ``ray`` extra (``ray==2.60.0``).

``python -m mlaas.platform.raynode --head --port P ...`` starts a head node on
127.0.0.1 (the tests do so); workers join with ``mlaas node join ADDR``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlaas.errors import ConfigError, MlaasError, PlatformError

__all__ = ["NodeOptions", "LOOPBACK_SWITCH", "is_loopback", "keep_ray_on_loopback", "start_node",
           "run_node", "main"]

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch that makes it keep loopback addresses (read when ray is imported)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keep_ray_on_loopback() -> None:
    """Make Ray keep 127.0.0.1 as the node address instead of the machine's outward IP.

    Sets :data:`LOOPBACK_SWITCH` for this process and the processes it starts;
    when ``ray`` is already imported, its constant (read at call time by
    ``ray._private.services.get_node_ip_address``) is set too.
    """
    os.environ[LOOPBACK_SWITCH] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


@dataclass
class NodeOptions:
    """What one node offers and where it joins.

    Args:
        node_ip (str): the address the node's servers bind and advertise.
        address (str or None): ``host:port`` of the head's GCS to join; None for a head.
        port (int): the GCS port of a head node (ignored for workers).
        num_cpus (int or None): CPUs offered (None: Ray counts them).
        resources (dict): Ray custom resources (the flavors and the node name, see
            :func:`mlaas.platform.nodes.node_resources`).
        object_store_memory (int): bytes of the node's object store.
        temp_dir (Path or None): Ray's session and log directory root (None: Ray's default).
    """

    node_ip: str = "127.0.0.1"
    address: str | None = None
    port: int = 6379
    num_cpus: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    object_store_memory: int = 100_000_000
    temp_dir: Path | None = None

    @property
    def head(self) -> bool:
        return self.address is None


def start_node(options: NodeOptions) -> Any:
    """Start the node's processes and return Ray's ``Node`` (stop it with ``kill_all_processes``).

    Raises :class:`mlaas.errors.PlatformError` when Ray cannot start the node
    (a port in use, the head unreachable), naming the address.
    """
    if is_loopback(options.node_ip):
        keep_ray_on_loopback()
    from mlaas.extras import ray as import_ray

    import_ray()
    import ray._private.node as ray_node
    import ray._private.parameter as ray_parameter

    params: dict[str, Any] = dict(
        node_ip_address=options.node_ip, node_name=options.node_ip,
        num_cpus=options.num_cpus, resources=dict(options.resources),
        object_store_memory=options.object_store_memory,
        include_dashboard=False, dashboard_host=options.node_ip,
        temp_dir=str(options.temp_dir) if options.temp_dir is not None else None,
        min_worker_port=0, max_worker_port=0)
    if options.head:
        params.update(gcs_server_port=options.port, include_log_monitor=True,
                      no_monitor=True)  # no autoscaler: its fixed metrics port would clash
    else:
        params.update(gcs_address=options.address, node_manager_port=0,
                      include_log_monitor=False)
    ray_params = ray_parameter.RayParams(**params)
    where = (f"head node on {options.node_ip}:{options.port}" if options.head
             else f"worker node {options.node_ip} joining {options.address}")
    try:
        return ray_node.Node(ray_params, head=options.head, shutdown_at_exit=True,
                             spawn_reaper=True, connect_only=False)
    except Exception as exc:  # Ray raises plain Exception/RuntimeError/ConnectionError here
        raise PlatformError(f"cannot start the Ray {where}: {type(exc).__name__}: {exc}") from exc


def run_node(options: NodeOptions, *, ready: Any = None) -> int:
    """Start the node and block until SIGTERM or SIGINT; then stop its processes; returns 0.

    Args:
        options: the node.
        ready: called with the node's GCS address once it is up (the CLI prints it).
    """
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    node = start_node(options)
    try:
        if ready is not None:
            ready(node.gcs_address)
        while not stop.wait(1.0):
            dead = [p for p in node.dead_processes() if p[0] != "reaper"]
            if dead:
                names = ", ".join(sorted({name for name, _ in dead}))
                print(f"[mlaas] Ray processes of this node died ({names}); stopping the node",
                      file=sys.stderr, flush=True)
                break
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--resources {text!r} is not JSON: {exc}",
                          field_path="resources") from exc
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v >= 0 for k, v in value.items()):
        raise ConfigError(f"--resources {text!r} must be a JSON object of names to "
                          "non-negative numbers", field_path="resources")
    return {k: float(v) for k, v in value.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m mlaas.platform.raynode [--head --port P | --address A] ...``."""
    parser = argparse.ArgumentParser(prog="python -m mlaas.platform.raynode",
                                     description="Run one Ray node in the foreground.")
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start a head node (GCS)")
    role.add_argument("--address", help="host:port of the head to join")
    parser.add_argument("--port", type=int, default=6379, help="GCS port of a head")
    parser.add_argument("--node-ip-address", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--resources", default="{}", help="JSON: custom resources")
    parser.add_argument("--object-store-memory", type=int, default=100_000_000)
    parser.add_argument("--temp-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        options = NodeOptions(node_ip=args.node_ip_address, address=args.address,
                              port=args.port, num_cpus=args.num_cpus,
                              resources=_resources(args.resources),
                              object_store_memory=args.object_store_memory,
                              temp_dir=args.temp_dir)
        return run_node(options, ready=lambda gcs: print(f"[mlaas] Ray node up; cluster at {gcs}",
                                                         flush=True))
    except MlaasError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
