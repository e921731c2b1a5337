"""The Ray executor: jobs on the nodes of a Ray cluster, the elastic GPU pool.

Layer: platform (executors). Implements :class:`mlaas.platform.executors.base.Executor`
and adds node awareness (:meth:`RayExecutor.nodes`, ``start(..., node=,
devices=)``) so the manager can run each job where the scheduler's
:class:`~mlaas.platform.scheduler.Admit` put it.

How a job runs. On each node that runs jobs the executor keeps one *node
agent*, a Ray actor pinned to that node (``NodeAffinitySchedulingStrategy``,
``soft=False``, 0 CPUs: the policy does the accounting, not Ray). The agent
runs every job exactly as the local executor does (one
:class:`~mlaas.platform.executors.local.LocalExecutor` per job, given the
job's CPUs and exactly the devices chosen): ``python -m
mlaas.platform.jobrun JOB_DIR`` as a child process of the agent, with the
same environment scrubbing, log file, wall-time and memory limits, SIGTERM
(exit 75, checkpoint in ``JOB_DIR/run``) and SIGKILL after the grace period.
When the agent dies, the kernel sends its jobs SIGTERM (``PR_SET_PDEATHSIG``),
as for a server that dies under the local executor.

Storage. The job directory path is passed to the node, never copied: every
node must see platform storage at the same path (here the same machine; in
a real pool a shared file system, CephFS, NFS or EOS, mounted at the server's
``data_dir`` on every node). Checkpoints, logs and ``exit.json`` therefore
survive the node.

Node loss. :meth:`RayExecutor.poll` reports every job of a node that Ray
declares dead (or whose agent died) once, as ``Exited(exit_code=None,
reason="node lost: <node>")``; the manager requeues it, and a new start on
another node resumes from its last checkpoint (``jobrun`` waits on the job
lock if the old process still checkpoints somewhere).

Names. A node is named by its Ray resource ``mlaas-node:<name>`` and offers
``flavor:<flavor>`` = count (see :mod:`mlaas.platform.nodes`). Device
numbers ``0..n-1`` per flavor, as in the scheduler's ``Admit.devices``,
become ``CUDA_VISIBLE_DEVICES`` ids on the node through
:func:`mlaas.platform.nodes.device_table`.

Foreign errors are translated in one place, :func:`map_ray_errors`.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlaas.errors import Conflict, MlaasError, PlatformError
from mlaas.platform.executors.base import Exited, Launch, read_log_tail
from mlaas.platform.nodes import NodeInfo, read_node_resources

__all__ = ["RayExecutor", "NodeAgent", "NodeLost", "map_ray_errors", "NAMESPACE"]

NAMESPACE = "mlaas"
"""The Ray namespace the executor's driver and node agents live in."""

_GIB = 2**30


class NodeLost(Exception):
    """A node (or its agent) went away: internal, turned into ``Exited`` or ``Conflict``."""

    def __init__(self, node: str, detail: str) -> None:
        super().__init__(f"node lost: {node} ({detail})")
        self.node = node
        self.detail = detail


def _ray() -> Any:
    from mlaas.extras import ray

    return ray()


@contextlib.contextmanager
def map_ray_errors(node: str, what: str, *, job_id: str | None = None) -> Iterator[None]:
    """Turn Ray's exceptions into mlaas ones (or :class:`NodeLost`) while talking to a node.

    - a task error re-raises the exception the agent raised (``Conflict``,
      ``FileNotFoundError``, ...), so callers see the same errors as with the
      local executor;
    - actor or node death raises :class:`NodeLost` (the caller reports it);
    - a timeout raises :class:`PlatformError` naming the node and the call;
    - any other Ray error raises :class:`PlatformError`.
    """
    ray = _ray()
    exc_mod = ray.exceptions
    try:
        yield
    except exc_mod.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if isinstance(cause, (MlaasError, OSError, ValueError)):
            raise cause from None
        raise PlatformError(f"{what} on node {node!r} failed: {exc}", job_id=job_id) from exc
    except (exc_mod.ActorDiedError, exc_mod.ActorUnavailableError, exc_mod.NodeDiedError,
            exc_mod.RayActorError) as exc:
        raise NodeLost(node, f"{type(exc).__name__} during {what}") from exc
    except exc_mod.GetTimeoutError as exc:
        raise PlatformError(f"{what} on node {node!r} did not answer in time",
                            job_id=job_id) from exc
    except exc_mod.RayError as exc:
        raise PlatformError(f"{what} on node {node!r} failed: {type(exc).__name__}: {exc}",
                            job_id=job_id) from exc


_AGENT_CLASS: Any = None


def _agent_class() -> Any:
    """``ray.remote(NodeAgent)``, made once per process."""
    global _AGENT_CLASS
    if _AGENT_CLASS is None:
        _AGENT_CLASS = _ray().remote(NodeAgent)
    return _AGENT_CLASS


class NodeAgent:
    """Runs and watches the jobs of one node; lives there as a Ray actor.

    Args:
        node (str): the node's name (for messages).
        device_ids (dict): flavor -> ``CUDA_VISIBLE_DEVICES`` id of device ``0..n-1``
            (:func:`mlaas.platform.nodes.device_table`); None: detect on this node.
        flavors (dict): devices per flavor, to build the table when detecting.
        python (str or None): interpreter for ``mlaas.platform.jobrun`` (None: the
            agent's own, the one the node runs Ray with).
        pass_env, limit_grace_s: as for :class:`LocalExecutor`.
    """

    def __init__(self, node: str, flavors: Mapping[str, int], *,
                 device_ids: Mapping[str, Sequence[str]] | None = None,
                 python: str | None = None, pass_env: Sequence[str] = (),
                 limit_grace_s: float = 10.0) -> None:
        from mlaas.platform.nodes import detect_devices, device_table

        self.node = node
        self.table = ({k: list(v) for k, v in device_ids.items()} if device_ids is not None
                      else device_table(flavors, detect_devices()))
        self.python = python or sys.executable
        self.pass_env = tuple(pass_env)
        self.limit_grace_s = limit_grace_s
        self._jobs: dict[str, Any] = {}

    def ids(self) -> dict[str, list[str]]:
        """The device table (flavor -> ids), for the driver and the tests."""
        return {k: list(v) for k, v in self.table.items()}

    def start(self, launch: Launch, devices: Mapping[str, Sequence[int]]) -> list[str]:
        """Start the job with these device numbers per flavor; returns their ids."""
        from mlaas.platform.executors.local import LocalExecutor

        if launch.job_id in self._jobs:
            raise Conflict(f"job {launch.job_id!r} is already running on node {self.node!r}",
                           job_id=launch.job_id)
        ids: list[str] = []
        for flavor, numbers in sorted(devices.items()):
            table = self.table.get(flavor, [])
            for n in numbers:
                if not 0 <= n < len(table):
                    raise Conflict(f"node {self.node!r} has no device {n} of flavor {flavor!r} "
                                   f"({len(table)} there)", job_id=launch.job_id)
                ids.append(table[n])
        local = LocalExecutor(cpus=max(1, launch.cpus), gpu_devices=ids, python=self.python,
                              pass_env=self.pass_env, limit_grace_s=self.limit_grace_s)
        given = local.start(Launch(launch.job_id, Path(launch.job_dir), cpus=launch.cpus,
                                   memory_bytes=launch.memory_bytes, gpus=len(ids),
                                   max_time_s=launch.max_time_s, env=dict(launch.env),
                                   threads=launch.threads))
        self._jobs[launch.job_id] = local
        return given

    def terminate(self, job_id: str, grace_s: float, kill: bool) -> None:
        local = self._jobs.get(job_id)
        if local is not None:
            local.terminate(job_id, grace_s=grace_s, kill=kill)

    def poll(self) -> list[Exited]:
        ended: list[Exited] = []
        for job_id, local in list(self._jobs.items()):
            done = local.poll()
            if done:
                ended.extend(done)
                del self._jobs[job_id]
                local.shutdown(grace_s=0.0)  # only frees its spawner thread: the job ended
        return ended

    def running(self) -> list[str]:
        return sorted(self._jobs)

    def pid(self, job_id: str) -> int | None:
        local = self._jobs.get(job_id)
        return local.pid(job_id) if local is not None else None

    def shutdown(self, grace_s: float) -> list[Exited]:
        ended: list[Exited] = []
        for job_id, local in list(self._jobs.items()):
            ended.extend(local.shutdown(grace_s))
            del self._jobs[job_id]
        return ended


@dataclass
class _Job:
    launch: Launch
    node: str
    node_id: str
    devices: dict[str, tuple[int, ...]]
    ids: list[str]


@dataclass
class _Agent:
    node: str
    node_id: str
    handle: Any
    inflight: Any = None  # the ObjectRef of a poll not answered yet
    jobs: set[str] = field(default_factory=set)


class RayExecutor:
    """Jobs on the nodes of a Ray cluster, one node agent per node (see the module docstring).

    Args:
        address (str): the cluster's GCS, ``host:port`` (``127.0.0.1:6379``). A
            loopback address keeps every Ray address of this driver on 127.0.0.1.
        storage_root (Path): platform storage (``data_dir``); every job directory
            must be under it, and every node must see it at this same path.
        python (str or None): the interpreter nodes run jobs with (None: the one
            each node runs Ray with).
        pass_env (list of str): extra environment names passed to jobs (as local).
        limit_grace_s (float): SIGTERM to SIGKILL for a job over its wall time.
        call_timeout_s (float): the longest a start, or the shutdown, waits for a
            node agent (the first start on a node also starts its agent).
        poll_wait_s (float): the longest :meth:`poll` waits for agents' answers;
            a node that does not answer by then is asked again at the next poll.
        connect_timeout_s (float): how long to try reaching the head's GCS port before
            giving up with :class:`PlatformError` (``ray.init`` itself retries for minutes).
    """

    def __init__(self, *, address: str, storage_root: Path, python: str | None = None,
                 pass_env: Sequence[str] = (), limit_grace_s: float = 10.0,
                 call_timeout_s: float = 60.0, poll_wait_s: float = 1.0,
                 connect_timeout_s: float = 10.0) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.storage_root = Path(storage_root).resolve()
        self.python = python
        self.pass_env = tuple(pass_env)
        self.limit_grace_s = limit_grace_s
        self.call_timeout_s = call_timeout_s
        self.poll_wait_s = poll_wait_s
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._agents: dict[str, _Agent] = {}  # by node name
        self._names: dict[str, str] = {}  # Ray node id -> name, kept for dead nodes
        self._lost: list[Exited] = []  # found while starting/terminating; reported by poll
        self._closed = False
        self._connected_here = False
        self._connect()

    # -- connection -----------------------------------------------------------------

    def _connect(self) -> None:
        from mlaas.platform.raynode import is_loopback, keep_ray_on_loopback

        host = self.address.rpartition(":")[0].strip("[]")
        if not host or not self.address.rpartition(":")[2].isdigit():
            raise PlatformError(f"Ray address {self.address!r} is not host:port "
                                "(e.g. 127.0.0.1:6379)")
        if is_loopback(host):
            keep_ray_on_loopback()
        ray = _ray()
        # ray.init retries an unreachable GCS for minutes; a wrong address should fail now
        try:
            with socket.create_connection((host, int(self.address.rpartition(":")[2])),
                                          timeout=self.connect_timeout_s):
                pass
        except OSError as exc:
            raise PlatformError(f"cannot connect to the Ray cluster at {self.address!r}: "
                                f"{exc}; is its head node running?") from exc
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if current != self.address:
                raise PlatformError(f"this process is already connected to the Ray cluster at "
                                    f"{current!r}, not {self.address!r}")
            return
        try:
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                     logging_level="WARNING", include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PlatformError(f"cannot connect to the Ray cluster at {self.address!r}: "
                                f"{exc}") from exc
        self._connected_here = True

    # -- nodes ----------------------------------------------------------------------

    def nodes(self, *, include_dead: bool = False) -> list[NodeInfo]:
        """The cluster's nodes (alive ones unless ``include_dead``), sorted by name.

        A node's name and flavors come from its Ray resources
        (``mlaas-node:<name>``, ``flavor:<flavor>``); a node without a name
        resource is ``ray-<12 hex of its node id>``.
        """
        ray = _ray()
        try:
            raw = ray.nodes()
        except Exception as exc:  # GCS unreachable: a RaySystemError or a gRPC error
            raise PlatformError(f"cannot list the nodes of the Ray cluster at "
                                f"{self.address!r}: {exc}") from exc
        infos: dict[str, NodeInfo] = {}
        for n in raw:
            resources = n.get("Resources") or {}
            name, flavors = read_node_resources(resources)
            if name is not None:
                self._names[n["NodeID"]] = name
            else:  # Ray lists a dead node without its resources: the name it had
                name = self._names.get(n["NodeID"])
            info = NodeInfo(name or f"ray-{n['NodeID'][:12]}", n["NodeID"],
                            n.get("NodeManagerAddress", ""), bool(n.get("Alive")),
                            float(resources.get("CPU", 0.0)),
                            float(resources.get("memory", 0.0)) / _GIB, flavors)
            if not info.alive and not include_dead:
                continue
            old = infos.get(info.name)
            if old is None or (info.alive and not old.alive):  # a re-joined name: the live one
                infos[info.name] = info
        return [infos[k] for k in sorted(infos)]

    def _node(self, name: str) -> NodeInfo:
        alive = {n.name: n for n in self.nodes()}
        if name not in alive:
            raise Conflict(f"node {name!r} is not in the Ray cluster at {self.address!r} "
                           f"(nodes: {', '.join(sorted(alive)) or 'none'})")
        return alive[name]

    # -- capacity -------------------------------------------------------------------

    def _held(self, node: str) -> tuple[float, set[tuple[str, int]]]:
        cpus = 0.0
        held: set[tuple[str, int]] = set()
        for job in self._jobs.values():
            if job.node == node:
                cpus += job.launch.cpus
                held.update((f, i) for f, idx in job.devices.items() for i in idx)
        return cpus, held

    def _free_devices(self, info: NodeInfo) -> list[tuple[str, int]]:
        _, held = self._held(info.name)
        return [(f, i) for f, n in sorted(info.flavors.items()) for i in range(n)
                if (f, i) not in held]

    def capacity(self) -> dict[str, Any]:
        """``{"cpus", "gpus", "devices": ["<node>/<flavor>/<n>"], "nodes": {name: {...}}}``."""
        nodes = self.nodes()
        devices = [f"{n.name}/{f}/{i}" for n in nodes for f, c in sorted(n.flavors.items())
                   for i in range(c)]
        return {"cpus": int(sum(n.cpus for n in nodes)), "gpus": len(devices),
                "devices": devices,
                "nodes": {n.name: {"cpus": n.cpus, "flavors": dict(n.flavors)} for n in nodes}}

    def free(self) -> dict[str, Any]:
        """What running jobs do not hold, in the shape of :meth:`capacity`."""
        with self._lock:
            out: dict[str, Any] = {"cpus": 0, "gpus": 0, "devices": [], "nodes": {}}
            for n in self.nodes():
                cpus, _ = self._held(n.name)
                free = self._free_devices(n)
                out["cpus"] += int(n.cpus - cpus)
                out["devices"] += [f"{n.name}/{f}/{i}" for f, i in free]
                flavors: dict[str, int] = {}
                for f, _i in free:
                    flavors[f] = flavors.get(f, 0) + 1
                out["nodes"][n.name] = {"cpus": n.cpus - cpus, "flavors": flavors}
            out["gpus"] = len(out["devices"])
            return out

    def fits(self, launch: Launch) -> bool:
        """Whether some node has ``launch.cpus`` CPUs and ``launch.gpus`` devices free now."""
        with self._lock:
            return self._pick_node(launch) is not None

    def _pick_node(self, launch: Launch) -> NodeInfo | None:
        for n in self.nodes():
            cpus, _ = self._held(n.name)
            if n.cpus - cpus >= launch.cpus and len(self._free_devices(n)) >= launch.gpus:
                return n
        return None

    def running(self) -> set[str]:
        with self._lock:
            return set(self._jobs)

    def node_of(self, job_id: str) -> str | None:
        """The node a running job was started on (None if it is not running here)."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job.node if job is not None else None

    # -- starting -------------------------------------------------------------------

    def _agent(self, info: NodeInfo) -> _Agent:
        agent = self._agents.get(info.name)
        if agent is not None and agent.node_id == info.node_id:
            return agent
        if agent is not None:  # the name came back as a new Ray node: the old agent is gone
            self._drop_agent(agent, f"node {info.name!r} re-joined as a new Ray node")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = _agent_class().options(
            num_cpus=0, max_restarts=0, max_concurrency=1, namespace=NAMESPACE,
            scheduling_strategy=NodeAffinitySchedulingStrategy(info.node_id, soft=False))
        handle = actor.remote(info.name, dict(info.flavors), python=self.python,
                              pass_env=self.pass_env, limit_grace_s=self.limit_grace_s)
        agent = _Agent(info.name, info.node_id, handle)
        self._agents[info.name] = agent
        return agent

    def _drop_agent(self, agent: _Agent, reason: str) -> None:
        """Forget a node's agent; its jobs are reported lost at the next poll."""
        self._agents.pop(agent.node, None)
        for job_id in sorted(agent.jobs):
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._lost.append(self._lost_exit(job, reason))
        with contextlib.suppress(Exception):
            _ray().kill(agent.handle, no_restart=True)

    def _lost_exit(self, job: _Job, detail: str) -> Exited:
        log = Path(job.launch.job_dir) / "job.log"
        reason = f"node lost: {job.node}"
        with contextlib.suppress(OSError):
            with open(log, "ab") as fh:
                stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                fh.write(f"[mlaas] {stamp} job {job.launch.job_id} {reason} ({detail})\n"
                         .encode())
        return Exited(job.launch.job_id, None, reason, read_log_tail(log), devices=list(job.ids))

    def _check_job_dir(self, launch: Launch) -> Path:
        job_dir = Path(launch.job_dir).resolve()
        if not job_dir.is_relative_to(self.storage_root):
            raise PlatformError(f"job directory {str(job_dir)!r} of job {launch.job_id!r} is "
                                f"not under platform storage {str(self.storage_root)!r}, "
                                "which every node mounts", job_id=launch.job_id)
        if not job_dir.is_dir():
            raise FileNotFoundError(f"job directory {str(job_dir)!r} of job {launch.job_id!r} "
                                    "does not exist")
        return job_dir

    def start(self, launch: Launch, *, node: str | None = None,
              devices: Mapping[str, Sequence[int]] | None = None) -> list[str]:
        """Start the job on ``node`` with ``devices``; returns the device ids it was given.

        Args:
            launch: the job (its ``job_dir`` under ``storage_root``).
            node (str or None): the node's name (the scheduler's ``Admit.node``);
                None: the first node (by name) with room.
            devices (dict or None): device numbers per flavor on that node (the
                scheduler's ``Admit.devices``); None: the first ``launch.gpus``
                free devices of the node, in flavor-name order.

        Raises :class:`Conflict` when the job already runs, the node is not in
        the cluster (or is lost while starting), or the CPUs or devices are not
        free there; :class:`FileNotFoundError` for a missing job directory;
        :class:`PlatformError` when the node does not answer.
        """
        if self._closed:
            raise PlatformError("the Ray executor is shut down; cannot start job "
                                f"{launch.job_id!r}", job_id=launch.job_id)
        if launch.cpus < 1:
            raise ValueError(f"job {launch.job_id!r} asks for {launch.cpus} CPUs; at least 1")
        job_dir = self._check_job_dir(launch)
        with self._lock:
            if launch.job_id in self._jobs:
                raise Conflict(f"job {launch.job_id!r} is already running on node "
                               f"{self._jobs[launch.job_id].node!r}", job_id=launch.job_id)
            if node is None:
                info = self._pick_node(launch)
                if info is None:
                    raise Conflict(f"no node of the Ray cluster has {launch.cpus} CPU(s) and "
                                   f"{launch.gpus} device(s) free for job {launch.job_id!r}",
                                   job_id=launch.job_id)
            else:
                info = self._node(node)
            chosen = self._choose_devices(info, launch, devices)
            cpus, _ = self._held(info.name)
            if cpus + launch.cpus > info.cpus:
                raise Conflict(f"job {launch.job_id!r} asks for {launch.cpus} CPUs on node "
                               f"{info.name!r}, {info.cpus - cpus:g} of {info.cpus:g} free",
                               job_id=launch.job_id)
            agent = self._agent(info)
            ray = _ray()
            run = Launch(launch.job_id, job_dir, cpus=launch.cpus,
                         memory_bytes=launch.memory_bytes, gpus=launch.gpus,
                         max_time_s=launch.max_time_s, env=dict(launch.env),
                         threads=launch.threads)
            try:
                with map_ray_errors(info.name, "starting the job", job_id=launch.job_id):
                    ids = ray.get(agent.handle.start.remote(run, chosen),
                                  timeout=self.call_timeout_s)
            except NodeLost as exc:
                self._drop_agent(agent, exc.detail)
                raise Conflict(f"job {launch.job_id!r} cannot start: {exc}",
                               job_id=launch.job_id) from exc
            self._jobs[launch.job_id] = _Job(run, info.name, info.node_id, chosen, list(ids))
            agent.jobs.add(launch.job_id)
            return list(ids)

    def _choose_devices(self, info: NodeInfo, launch: Launch,
                        devices: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
        free = self._free_devices(info)
        if devices is None:
            if launch.gpus > len(free):
                raise Conflict(f"job {launch.job_id!r} asks for {launch.gpus} device(s) on node "
                               f"{info.name!r}, {len(free)} free", job_id=launch.job_id)
            chosen: dict[str, list[int]] = {}
            for f, i in free[:launch.gpus]:
                chosen.setdefault(f, []).append(i)
            return {f: tuple(v) for f, v in chosen.items()}
        out: dict[str, tuple[int, ...]] = {}
        free_set = set(free)
        for flavor, numbers in sorted(devices.items()):
            count = info.flavors.get(flavor, 0)
            if count == 0:
                raise Conflict(f"node {info.name!r} has no devices of flavor {flavor!r} "
                               f"(it has: {', '.join(sorted(info.flavors)) or 'none'})",
                               job_id=launch.job_id)
            for n in numbers:
                if not 0 <= int(n) < count:
                    raise Conflict(f"node {info.name!r} has no device {n} of flavor {flavor!r} "
                                   f"({count} there)", job_id=launch.job_id)
                if (flavor, int(n)) not in free_set:
                    raise Conflict(f"device {n} of flavor {flavor!r} on node {info.name!r} is "
                                   "held by another job", job_id=launch.job_id)
            out[flavor] = tuple(int(n) for n in numbers)
        return out

    # -- stopping -------------------------------------------------------------------

    def terminate(self, job_id: str, *, grace_s: float, kill: bool = True) -> None:
        """SIGTERM the job through its node's agent (SIGKILL after ``grace_s`` if ``kill``).

        Does not wait for the node; a node that is gone is reported by :meth:`poll`.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            agent = self._agents.get(job.node) if job is not None else None
            if job is None or agent is None:
                return
            agent.handle.terminate.remote(job_id, grace_s, kill)  # ordered before later polls

    # -- watching -------------------------------------------------------------------

    def poll(self) -> list[Exited]:
        """Jobs that ended, and jobs of nodes that were lost, each reported once.

        Waits at most ``poll_wait_s`` for the agents' answers.
        """
        ray = _ray()
        with self._lock:
            ended, self._lost = self._lost, []
            if not self._agents:
                return ended
            alive = {n.node_id for n in self.nodes()}
            for agent in list(self._agents.values()):
                if agent.node_id not in alive:
                    self._drop_agent(agent, "Ray declared the node dead")
            for agent in self._agents.values():
                if agent.inflight is None:
                    agent.inflight = agent.handle.poll.remote()
            refs = {agent.inflight: agent for agent in self._agents.values()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.poll_wait_s)
            for ref in ready:
                agent = refs[ref]
                agent.inflight = None
                try:
                    with map_ray_errors(agent.node, "polling the node's jobs"):
                        done: list[Exited] = ray.get(ref)
                except NodeLost as exc:
                    self._drop_agent(agent, exc.detail)
                    continue
                except PlatformError:
                    continue  # asked again at the next poll
                for exited in done:
                    if self._jobs.pop(exited.job_id, None) is not None:
                        agent.jobs.discard(exited.job_id)
                        ended.append(exited)
            ended.extend(self._lost)
            self._lost = []
            return ended

    def pid(self, job_id: str) -> int | None:
        """The job process's pid on its node (for tests and diagnostics), None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            agent = self._agents.get(job.node) if job is not None else None
        if agent is None:
            return None
        try:
            with map_ray_errors(agent.node, "asking for a pid"):
                result = _ray().get(agent.handle.pid.remote(job_id), timeout=self.call_timeout_s)
        except (NodeLost, PlatformError):
            return None
        return int(result) if result is not None else None

    def shutdown(self, grace_s: float) -> list[Exited]:
        """Terminate every job (SIGTERM, SIGKILL after ``grace_s``), wait, report them all.

        Stops the node agents and disconnects from Ray when this executor
        connected; the cluster itself keeps running.
        """
        self._closed = True
        ray = _ray()
        with self._lock:
            ended, self._lost = self._lost, []
            calls = {a.handle.shutdown.remote(grace_s): a for a in self._agents.values()}
            ready, _ = ray.wait(list(calls), num_returns=len(calls),
                                timeout=grace_s + self.call_timeout_s) if calls else ([], [])
            for ref in ready:
                agent = calls[ref]
                try:
                    with map_ray_errors(agent.node, "shutting the node's jobs down"):
                        for exited in ray.get(ref):
                            if self._jobs.pop(exited.job_id, None) is not None:
                                agent.jobs.discard(exited.job_id)
                                ended.append(exited)
                except (NodeLost, PlatformError) as exc:
                    self._drop_agent(agent, str(exc))
            for agent in list(self._agents.values()):
                self._drop_agent(agent, "the executor shut down before the node answered")
            ended.extend(self._lost)
            self._lost = []
        if self._connected_here:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._connected_here = False
        return ended

