"""The Ray executor on a real Ray cluster on 127.0.0.1, with real job processes.

The tests start their own cluster: a head node and a worker node named
``gpu-1`` that advertises two devices of the flavor ``test-gpu`` as Ray
custom resources (there is no GPU here; the flavor is configured, and what
is checked is the ``CUDA_VISIBLE_DEVICES`` value the job process really
sees). Each node is ``python -m mlaas.platform.raynode`` in its own session,
with Ray's session directory under a temporary directory of this run; a
third node (``victim``) joins during a test and is killed with SIGKILL,
itself and every process under it (raylet, workers, the job), as a machine
that dies. Everything started here is stopped here; no other Ray process on
the machine is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from job_pipelines import ENV_MODEL, SLOW_MODEL, make_data, model_file, pipeline, \
    progress_epoch, wait_for, write_job
from mlaas.errors import Conflict, PlatformError
from mlaas.platform.executors import Exited, Launch
from mlaas.platform.executors.base import Executor
from mlaas.platform.nodes import node_resources
from mlaas.platform.raynode import keep_ray_on_loopback

pytestmark = pytest.mark.slow  # a Ray cluster takes ~10 s to start; the jobs a few s each

keep_ray_on_loopback()  # before ray is imported by anything in this process
ray = pytest.importorskip("ray", reason="the Ray executor tests need the 'ray' extra "
                          "(pip install 'mlaas[ray]')")

from mlaas.platform.executors.ray_executor import (  # noqa: E402
    NodeLost,
    RayExecutor,
    map_ray_errors,
)

# Ray notices a dead node after period x threshold (default 3 s x 5); the tests wait less.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500",
                      "RAY_health_check_timeout_ms": "500",
                      "RAY_health_check_failure_threshold": "4",
                      "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayNode:
    """One node of the test cluster: a ``mlaas.platform.raynode`` process and its tree."""

    def __init__(self, log: Path, argv: list[str]) -> None:
        self.log = log
        env = {**os.environ, **FAST_HEALTH_CHECKS}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *argv], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        wait_for(self._up, 90, f"the Ray node of {log.name} to start")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Ray node exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
        text = self.log.read_text()
        return "Ray node up" in text or "is up in the Ray cluster" in text

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the node and everything under it at once: a machine that dies."""
        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)

    def stop(self) -> None:
        """SIGTERM (the node stops its processes), then SIGKILL whatever is left."""
        procs = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, RayNode] = {}

    def start(self, name: str, *, head: bool = False, cpus: int = 1,
              flavors: dict[str, int] | None = None) -> RayNode:
        role = ["--head", "--port", str(self.port)] if head else ["--address", self.address]
        args = [*role, "--num-cpus", str(cpus), "--temp-dir", str(self.root / "ray"),
                "--resources", json.dumps(node_resources(name, flavors or {}))]
        node = RayNode(self.root / f"{name}.log", ["mlaas.platform.raynode", *args])
        self.nodes[name] = node
        return node

    def join(self, name: str, *, cpus: int, flavors: list[str]) -> RayNode:
        """A worker joining through ``mlaas node join`` (as ``python -m mlaas.cli_node``)."""
        args = ["node", "join", self.address, "--name", name, "--cpus", str(cpus),
                "--temp-dir", str(self.root / "ray")]
        for flavor in flavors:
            args += ["--flavor", flavor]
        node = RayNode(self.root / f"{name}.log", ["mlaas.cli_node", *args])
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.nodes[name].stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="mlaas-ray-", dir="/tmp"))  # short: socket paths
    c = Cluster(root)
    try:
        c.start("head", head=True, cpus=1)
        c.start("gpu-1", cpus=2, flavors={"test-gpu": 2})
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform")


@pytest.fixture(scope="module")
def data(storage: Path) -> Path:
    return make_data(storage)


@pytest.fixture(scope="module")
def executor(cluster: Cluster, storage: Path) -> Iterator[RayExecutor]:
    ex = RayExecutor(address=cluster.address, storage_root=storage, poll_wait_s=0.5)
    wait_for(lambda: {"head", "gpu-1"} <= {n.name for n in ex.nodes()}, 60, "both nodes")
    yield ex
    ex.shutdown(grace_s=1.0)


def _until_exited(ex: RayExecutor, ids: set[str], timeout: float = 180) -> dict[str, Exited]:
    done: dict[str, Exited] = {}
    deadline = time.monotonic() + timeout
    while set(done) != ids:
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {sorted(ids - set(done))} not reported after {timeout} s")
        for exited in ex.poll():
            assert exited.job_id not in done, f"{exited.job_id} reported twice"
            done[exited.job_id] = exited
        time.sleep(0.1)
    return done


def _slow_job(root: Path, data: Path, name: str, epochs: int, sleep: float = 0.02) -> Path:
    model = model_file(root, SLOW_MODEL, f"slow_{name}", SLEEP=sleep)
    return write_job(root / "jobs" / name, pipeline(data, epochs=epochs, model=model,
                                                    batch_size=128))


def _under(pid: int, node: RayNode) -> bool:
    """Whether process ``pid`` runs under ``node``'s process tree."""
    return pid in {p.pid for p in node.tree()}


# -- the cluster and its nodes -------------------------------------------------------------


def test_the_ray_executor_is_an_executor(executor: RayExecutor) -> None:
    assert isinstance(executor, Executor)


def test_nodes_carry_names_and_flavors(executor: RayExecutor) -> None:
    nodes = {n.name: n for n in executor.nodes()}
    assert set(nodes) == {"head", "gpu-1"}
    assert dict(nodes["gpu-1"].flavors) == {"test-gpu": 2} and nodes["gpu-1"].cpus == 2
    assert dict(nodes["head"].flavors) == {} and nodes["head"].cpus == 1
    assert all(n.address == "127.0.0.1" and n.alive for n in nodes.values())
    sched = nodes["gpu-1"].to_scheduler_node()
    assert sched.name == "gpu-1" and dict(sched.gpus) == {"test-gpu": 2}
    cap = executor.capacity()
    assert (cap["cpus"], cap["gpus"]) == (3, 2)
    assert cap["devices"] == ["gpu-1/test-gpu/0", "gpu-1/test-gpu/1"]


def test_every_ray_server_listens_on_loopback_only(cluster: Cluster) -> None:
    pids = {p.pid for node in cluster.nodes.values() for p in node.tree()}
    listening = [c for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "found no listening socket of the test cluster"
    bad = [(c.laddr.ip, c.laddr.port) for c in listening
           if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert bad == []


# -- running jobs where they are put --------------------------------------------------------


def test_jobs_run_on_the_chosen_node_with_the_chosen_devices(
        executor: RayExecutor, cluster: Cluster, storage: Path, data: Path) -> None:
    on_gpu = write_job(storage / "jobs" / "env-gpu",
                       pipeline(data, model=model_file(storage, ENV_MODEL, "envmodel")))
    on_head = write_job(storage / "jobs" / "env-head",
                        pipeline(data, model=model_file(storage, ENV_MODEL, "envmodel")))
    assert executor.start(Launch("env-gpu", on_gpu, gpus=1), node="gpu-1",
                          devices={"test-gpu": (1,)}) == ["1"]
    assert executor.start(Launch("env-head", on_head), node="head") == []
    assert executor.node_of("env-gpu") == "gpu-1" and executor.node_of("env-head") == "head"
    done = _until_exited(executor, {"env-gpu", "env-head"})
    for job_id, job_dir, node, cuda in (("env-gpu", on_gpu, "gpu-1", "1"),
                                        ("env-head", on_head, "head", "")):
        assert done[job_id].exit_code in (1, 2), done[job_id].log_tail
        env = json.loads((job_dir / "env.json").read_text())
        assert env["CUDA_VISIBLE_DEVICES"] == cuda
        assert env["MLAAS_JOB_ID"] == job_id and env["HOME"] == str(job_dir)
        assert not any(k.startswith("RAY_") for k in env), "Ray's settings leak into the job"
        # the job's parent, the node agent, runs under that node's processes
        assert _under(int(env["MLAAS_JOB_PARENT_PID"]), cluster.nodes[node])
    assert executor.running() == set()


def test_a_job_succeeds_on_the_node_it_was_given(executor: RayExecutor, storage: Path,
                                                  data: Path) -> None:
    job = write_job(storage / "jobs" / "ok", pipeline(data, epochs=2))
    executor.start(Launch("ok", job), node="gpu-1")
    exited = _until_exited(executor, {"ok"})["ok"]
    assert exited.exit_code == 0, exited.log_tail
    assert exited.reason == "exited with code 0" and exited.devices == []
    assert json.loads((job / "exit.json").read_text())["exit_code"] == 0
    assert [h["epoch"] for h in json.loads((job / "run" / "history.json").read_text())] == [1, 2]


def test_terminate_preempts_and_bad_starts_are_refused(
        executor: RayExecutor, storage: Path, data: Path, tmp_path: Path) -> None:
    job = _slow_job(storage, data, "slow", epochs=50)
    assert executor.start(Launch("slow", job, gpus=1), node="gpu-1",
                          devices={"test-gpu": [0]}) == ["0"]
    wait_for(lambda: progress_epoch(job) >= 1, 120, "the first epoch")
    assert executor.running() == {"slow"}
    free = executor.free()
    assert free["nodes"]["gpu-1"] == {"cpus": 1.0, "flavors": {"test-gpu": 1}}
    assert free["devices"] == ["gpu-1/test-gpu/1"]

    other = write_job(storage / "jobs" / "other", pipeline(data))
    refused = [
        (dict(node="gpu-1", devices={"test-gpu": [0]}), Conflict, "device 0 of flavor 'test-gpu'"
                                                                  " on node 'gpu-1' is held"),
        (dict(node="gpu-1", devices={"test-gpu": [2]}), Conflict, "no device 2 of flavor"),
        (dict(node="gpu-1", devices={"nvidia-a100": [0]}), Conflict,
         "no devices of flavor 'nvidia-a100' \\(it has: test-gpu\\)"),
        (dict(node="nope"), Conflict, "node 'nope' is not in the Ray cluster .* gpu-1, head"),
        (dict(node="head", devices={"test-gpu": [0]}), Conflict, "node 'head' has no devices"),
    ]
    for kwargs, error, message in refused:
        with pytest.raises(error, match=message):
            executor.start(Launch("other", other), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="asks for 2 CPUs on node 'gpu-1', 1 of 2 free"):
        executor.start(Launch("other", other, cpus=2), node="gpu-1")
    with pytest.raises(Conflict, match="'slow' is already running on node 'gpu-1'"):
        executor.start(Launch("slow", job), node="head")
    with pytest.raises(ValueError, match="asks for 0 CPUs"):
        executor.start(Launch("other", other, cpus=0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        executor.start(Launch("other", storage / "jobs" / "missing"))
    outside = write_job(tmp_path / "outside", pipeline(data))
    with pytest.raises(PlatformError, match="not under platform storage"):
        executor.start(Launch("other", outside))
    assert executor.running() == {"slow"}

    executor.terminate("slow", grace_s=0.1, kill=False)
    exited = _until_exited(executor, {"slow"})["slow"]
    assert exited.exit_code == 75, exited.log_tail
    assert exited.reason == ("terminated on request; exited with code 75 "
                             "(preempted: checkpoint written)")
    assert exited.devices == ["0"]
    assert (job / "run" / "checkpoint.pt").is_file()
    assert json.loads((job / "exit.json").read_text())["exit_code"] == 75
    assert 1 <= progress_epoch(job) < 50
    executor.terminate("slow", grace_s=0.1)  # finished: ignored
    executor.terminate("never-started", grace_s=0.1)


def test_a_lost_node_requeues_its_job_which_resumes_on_another_node(
        executor: RayExecutor, cluster: Cluster, storage: Path, data: Path) -> None:
    # a node joining (mlaas node join) shows up in nodes() and in the capacity
    assert executor.capacity()["gpus"] == 2
    victim = cluster.join("victim", cpus=1, flavors=["test-gpu=1"])
    wait_for(lambda: "victim" in {n.name for n in executor.nodes()}, 60, "the new node")
    assert dict({n.name: n for n in executor.nodes()}["victim"].flavors) == {"test-gpu": 1}
    assert executor.capacity()["gpus"] == 3

    epochs = 12
    job = _slow_job(storage, data, "moved", epochs=epochs, sleep=0.04)
    assert executor.start(Launch("moved", job, gpus=1), node="victim",
                          devices={"test-gpu": [0]}) == ["0"]
    wait_for(lambda: progress_epoch(job) >= 2, 120, "two epochs on the victim node")
    pid = executor.pid("moved")
    assert pid is not None and _under(pid, victim)
    victim.kill()

    lost = _until_exited(executor, {"moved"}, timeout=90)["moved"]
    assert (lost.exit_code, lost.reason, lost.devices) == (None, "node lost: victim", ["0"])
    assert "node lost: victim" in (job / "job.log").read_text()
    assert "victim" not in {n.name for n in executor.nodes()}
    dead = {n.name: n for n in executor.nodes(include_dead=True)}
    assert dead["victim"].alive is False
    assert (job / "run" / "checkpoint.pt").is_file()
    done_before = progress_epoch(job)
    assert 2 <= done_before < epochs
    with pytest.raises(Conflict, match="node 'victim' is not in the Ray cluster"):
        executor.start(Launch("moved", job), node="victim")

    # the manager requeues it; admitted again elsewhere, it resumes from its checkpoint
    executor.start(Launch("moved", job, gpus=1), node="gpu-1", devices={"test-gpu": [1]})
    again = _until_exited(executor, {"moved"})["moved"]
    assert again.exit_code == 0, again.log_tail
    log = (job / "job.log").read_text()
    assert log.count("[mlaas] starting ") == 1 and "[mlaas] resuming from" in log
    history = json.loads((job / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))


# -- errors and connection -----------------------------------------------------------------


def test_foreign_errors_are_mapped(executor: RayExecutor) -> None:
    exc = ray.exceptions
    cases = [
        (exc.ActorDiedError(), NodeLost, "node lost: n1 \\(ActorDiedError during x\\)"),
        (exc.ActorUnavailableError("gone", None), NodeLost, "ActorUnavailableError"),
        (exc.GetTimeoutError("slow"), PlatformError, "x on node 'n1' did not answer in time"),
        (exc.RaySystemError("boom"), PlatformError, "x on node 'n1' failed: RaySystemError"),
    ]
    for raised, wanted, message in cases:
        with pytest.raises(wanted, match=message):
            with map_ray_errors("n1", "x"):
                raise raised
    # a task error gives back the exception the agent raised
    with pytest.raises(Conflict, match="held"):
        with map_ray_errors("n1", "x"):
            try:
                raise Conflict("device held")
            except Conflict as inner:
                raise exc.RayTaskError("start", "tb", inner) from inner


def test_bad_addresses_are_refused(executor: RayExecutor, storage: Path) -> None:
    with pytest.raises(PlatformError, match="Ray address 'nowhere' is not host:port"):
        RayExecutor(address="nowhere", storage_root=storage)
    with pytest.raises(PlatformError, match="cannot connect to the Ray cluster at "
                       r"'127\.0\.0\.1:\d+': .*refused; is its head node running\?"):
        RayExecutor(address=f"127.0.0.1:{_free_port()}", storage_root=storage)
    with socket.create_server(("127.0.0.1", 0)) as other:  # something listening elsewhere
        port = other.getsockname()[1]
        with pytest.raises(PlatformError, match="already connected to the Ray cluster at"):
            RayExecutor(address=f"127.0.0.1:{port}", storage_root=storage)


def test_shutdown_stops_every_job(executor: RayExecutor, cluster: Cluster, storage: Path,
                                  data: Path) -> None:
    # a second executor on the same connection (the first one keeps it open)
    ex = RayExecutor(address=cluster.address, storage_root=storage, poll_wait_s=0.5)
    job = _slow_job(storage, data, "last", epochs=50)
    ex.start(Launch("last", job), node="gpu-1")
    wait_for(lambda: "[mlaas] starting" in (job / "job.log").read_text(), 120,
             "the job process to take over its SIGTERM handling")
    pid = ex.pid("last")
    assert pid is not None and _under(pid, cluster.nodes["gpu-1"])
    ended = ex.shutdown(grace_s=20.0)
    assert [(e.job_id, e.exit_code) for e in ended] == [("last", 75)], ended
    assert ex.running() == set()
    wait_for(lambda: not psutil.pid_exists(pid), 30, "the job process to be gone")
    assert ray.is_initialized(), "a shared connection must stay open"
    with pytest.raises(PlatformError, match="shut down"):
        ex.start(Launch("again", job))
