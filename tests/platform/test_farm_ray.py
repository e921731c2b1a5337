"""The manager with the Ray executor on a real 127.0.0.1 cluster: the scheduler places jobs
on the nodes Ray reports, a node joining starts a waiting job, a node lost requeues it.

Layer: platform (manager + scheduler + Ray executor + real job processes). The
cluster is the one of :mod:`test_executor_ray` (its ``Cluster`` helper): a head
(1 CPU, no devices) and ``gpu-1`` (2 CPUs, two devices of the fake flavor
``test-gpu``; no GPU here, the devices are slot names), a flavor the manager
is not configured with (the default queue takes it when the node appears). A third node ``victim``
(one ``test-gpu``) joins through ``mlaas node join`` mid-test and is killed
with SIGKILL, as a machine that dies.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from job_pipelines import SLOW_MODEL, make_data, model_file, pipeline, wait_for

from mlaas.platform.app import create_platform_app
from mlaas.platform.config import PlatformConfig
from mlaas.platform.manager import JobManager
from mlaas.platform.principal import Principal
from mlaas.platform.records import JobState
from mlaas.platform.storage import Storage
from mlaas.serve.registry import Registry
from platform_support import TestClient

pytestmark = pytest.mark.slow

ray_tests = pytest.importorskip("test_executor_ray", reason="needs the Ray executor tests' "
                                "cluster helper and the 'ray' extra")
from mlaas.platform.executors.ray_executor import RayExecutor  # noqa: E402

ALICE = Principal(user="alice", groups=("cms",))


@pytest.fixture
def cluster() -> Iterator[object]:
    root = Path(tempfile.mkdtemp(prefix="mlaas-farm-ray-", dir="/tmp"))  # short socket paths
    c = ray_tests.Cluster(root)
    try:
        c.start("head", head=True, cpus=1)
        c.start("gpu-1", cpus=2, flavors={"test-gpu": 2})
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_nodes_joining_and_leaving_drive_the_scheduler(cluster: object, tmp_path: Path,
                                                       sqlite_store: object) -> None:
    storage = Storage(tmp_path / "platform")
    data = make_data(tmp_path / "platform" / "inputs")
    executor = RayExecutor(address=cluster.address, storage_root=storage.root,  # type: ignore[attr-defined]
                           poll_wait_s=0.5)
    manager = JobManager(sqlite_store, storage, executor, Registry(storage.models_dir),
                         poll_interval=0.2, grace_s=10)  # test-gpu: not configured
    try:
        wait_for(lambda: manager.tick() or {"head", "gpu-1"} <= {
            n["name"] for n in manager.nodes_view()}, 60, "both nodes in the snapshot")
        nodes = {n["name"]: n for n in manager.nodes_view()}
        assert nodes["gpu-1"]["flavors"]["test-gpu"] == {"capacity": 2, "free": 2}
        assert "test-gpu" not in nodes["head"]["flavors"]
        # a flavor no one configured, offered by a node: the default queue takes it
        [default] = manager.queues_view()
        assert default["quotas"]["test-gpu"] == {"nominal": None, "borrowing_limit": None}
        manager.start()

        def slow(name: str, epochs: int, sleep: float) -> dict[str, object]:
            return pipeline(data, epochs=epochs, batch_size=128, name=name,
                            model=model_file(tmp_path, SLOW_MODEL, f"slow_{name}", SLEEP=sleep))

        big = manager.submit(principal=ALICE, name="big", spec=slow("big", 4, 0.03),
                             resources={"gpus": {"test-gpu": 2}})
        wait_for(lambda: manager.store.get_job(big.id).state is JobState.RUNNING, 60, "big")
        assert manager.store.get_job(big.id).node == "gpu-1"  # the only node with two
        small = manager.submit(principal=ALICE, name="small", spec=slow("small", 8, 0.04),
                               resources={"gpus": {"test-gpu": 1}})
        wait_for(lambda: manager.scaling_view()["pending"].get("test-gpu") == 1, 30,
                 "the demand for one more test-gpu")
        assert manager.store.get_job(small.id).state is JobState.QUEUED

        victim = cluster.join("victim", cpus=1, flavors=["test-gpu=1"])  # type: ignore[attr-defined]
        wait_for(lambda: manager.store.get_job(small.id).state is JobState.RUNNING, 90,
                 "the waiting job to start on the node that joined")
        assert manager.store.get_job(small.id).node == "victim"
        small_dir = storage.job_dir(small.id)
        wait_for(lambda: (small_dir / "run" / "checkpoint.pt").is_file(), 120,
                 "small's first checkpoint on victim")
        victim.kill()

        done = manager.wait(small.id, timeout=300)
        assert done.state is JobState.SUCCEEDED, done.reason
        assert done.attempts == 2 and done.node == "gpu-1"  # resumed on the other node
        log = (small_dir / "job.log").read_text()
        assert "node lost: victim" in log and "resuming from" in log, log
        history = json.loads((small_dir / "run" / "history.json").read_text())
        assert [h["epoch"] for h in history] == list(range(1, 9))
        assert manager.wait(big.id, timeout=120).state is JobState.SUCCEEDED
        assert "victim" not in {n["name"] for n in manager.nodes_view()}

        # the server with executor: ray (mlaas server --executor ray --ray-address ADDR)
        config = PlatformConfig(data_dir=tmp_path / "server", executor="ray",
                                ray_address=cluster.address,  # type: ignore[attr-defined]
                                poll_interval=0.2)
        with TestClient(create_platform_app(config)) as api:
            wait_for(lambda: {"head", "gpu-1"} <= {
                n["name"] for n in api.get("/api/nodes").json()["nodes"]}, 60,
                "the server's nodes")
            body = api.get("/api/nodes").json()
            assert body["executor"] == "ray"
            gpu1 = next(n for n in body["nodes"] if n["name"] == "gpu-1")
            assert gpu1["flavors"]["test-gpu"]["capacity"] == 2
    finally:
        manager.stop(terminate_jobs=True, timeout=30)
