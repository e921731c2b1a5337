"""The farm API in-process: queues (read by all, replaced by admins), nodes, scaling.

Layer: platform (HTTP). The whole platform app with a real SQLite store and
the local executor (one node: 2 ``cpu`` slots and one device of the fake
flavor ``test-gpu``; there is no GPU here, the device id is only a slot name).
Users are told apart by the ``X-User`` header (:class:`platform_support.HeaderUsers`):
alice (group ``cms``), bob (``atlas``), root (admin, ``ops``). No job process
runs here: submissions that must wait are cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlaas.errors import ConfigError
from mlaas.platform.app import create_platform_app
from mlaas.platform.config import PlatformConfig, load_config
from platform_support import AS_ALICE, AS_BOB, AS_ROOT, USERS, HeaderUsers, TestClient

QUEUES = [
    {"name": "cms-q", "group": "cms", "cohort": "farm",
     "quotas": {"test-gpu": {"nominal": 1}, "cpu": {"nominal": 1, "borrowing_limit": 1}},
     "priority_classes": {"high": 100}},
    {"name": "atlas-q", "group": "atlas", "cohort": "farm",
     "quotas": {"test-gpu": {"nominal": 0}, "cpu": {"nominal": 1}}},
]


def _config(data_dir: Path, **extra: Any) -> PlatformConfig:
    return PlatformConfig(data_dir=data_dir, cpus=2, gpu_devices=["0"], gpu_flavor="test-gpu",
                          poll_interval=60, queues=QUEUES, **extra)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    app = create_platform_app(_config(tmp_path / "data"), authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _spec(**resources: Any) -> dict[str, Any]:
    return {"name": "farm-model", "data": {"sources": [{"files": ["data/none.root"]}],
                                           "features": ["x"], "label": "y"},
            "resources": resources}


def test_everyone_reads_queues_admins_see_job_ids(api: TestClient) -> None:
    r = api.get("/api/queues", headers=AS_BOB)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"] == "fair"
    by_name = {q["name"]: q for q in body["queues"]}
    assert set(by_name) == {"cms-q", "atlas-q"}
    assert by_name["atlas-q"]["mine"] is True and by_name["cms-q"]["mine"] is False
    assert by_name["cms-q"]["quotas"]["test-gpu"] == {"nominal": 1, "borrowing_limit": None}
    assert by_name["atlas-q"]["quotas"]["cpu"]["nominal"] == 1
    assert by_name["cms-q"]["pending_jobs"] is None  # counts only for non-admins
    admin = {q["name"]: q for q in api.get("/api/queues", headers=AS_ROOT).json()["queues"]}
    assert admin["cms-q"]["pending_jobs"] == [] and admin["cms-q"]["mine"] is True
    assert api.get("/api/queues").status_code == 401


def test_nodes_show_flavors_capacity_and_free(api: TestClient) -> None:
    r = api.get("/api/nodes", headers=AS_ALICE)
    assert r.status_code == 200, r.text
    [node] = r.json()["nodes"]
    assert node["name"] == "local" and r.json()["executor"] == "local"
    assert node["flavors"] == {"cpu": {"capacity": 2, "free": 2},
                               "test-gpu": {"capacity": 1, "free": 1}}
    assert node["running_jobs"] is None
    assert api.get("/api/nodes", headers=AS_ROOT).json()["nodes"][0]["running_jobs"] == []


def test_queue_membership_priority_classes_and_flavors_at_submit(api: TestClient) -> None:
    r = api.post("/api/jobs", json={"name": "x", "spec": _spec(queue="cms-q")}, headers=AS_BOB)
    assert r.status_code == 403, r.text
    assert r.json()["field_path"] == "resources.queue" and "cms-q" in r.json()["message"]
    r = api.post("/api/jobs", json={"name": "x", "spec": _spec(queue="nope")}, headers=AS_BOB)
    assert r.status_code == 422 and r.json()["problems"][0][0] == "resources.queue"
    r = api.post("/api/jobs", json={"name": "x", "spec": _spec(priority="urgent")},
                 headers=AS_ALICE)
    assert r.status_code == 422 and r.json()["problems"][0][0] == "resources.priority"
    r = api.post("/api/jobs", json={"name": "x", "spec": _spec(gpus={"nvidia-a100": 1})},
                 headers=AS_ALICE)
    assert r.status_code == 422 and r.json()["problems"][0][0] == "resources.gpus"
    r = api.post("/api/jobs", json={"name": "x", "spec": _spec(gpus={"test-gpu": 1},
                                                              priority="high")},
                 headers=AS_ALICE)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["queue"] == "cms-q" and job["priority"] == 100  # the group's queue by default
    assert job["resources"] == {"gpus": {"test-gpu": 1}}
    admin = api.post("/api/jobs", json={"name": "y", "spec": _spec(queue="atlas-q")},
                     headers=AS_ROOT)
    assert admin.status_code == 201 and admin.json()["queue"] == "atlas-q"  # admins: any queue
    for j in (job, admin.json()):
        api.post(f"/api/jobs/{j['id']}/cancel", headers=AS_ROOT)


def test_scaling_reports_demand_no_node_can_meet(api: TestClient) -> None:
    r = api.get("/api/scaling", headers=AS_ALICE)
    assert r.status_code == 200, r.text
    idle = r.json()
    assert idle["pending"] == {} and idle["idle_nodes"] == ["local"]
    assert idle["drainable_nodes"] == ["local"] and idle["capacity"] == {"cpu": 2, "test-gpu": 1}
    try:
        manager = api.app.state.platform.manager  # type: ignore[attr-defined]
        with manager._lock:  # hold the local node's one device with a fake running job
            from mlaas.platform.scheduler import Workload

            snap = manager.snapshot
            snap.add_pending(Workload("holder", "atlas-q", "carol", {"cpu": 1, "test-gpu": 1}, 0.0))
            snap.start("holder", "local", {"cpu": (0,), "test-gpu": (0,)}, 0.0)
            snap.add_pending(Workload("waiter", "cms-q", "dave", {"cpu": 1, "test-gpu": 1}, 1.0))
            snap.add_pending(Workload("huge", "cms-q", "dave", {"cpu": 8}, 2.0))
        busy = api.get("/api/scaling", headers=AS_ALICE).json()
        assert busy["pending"] == {"cpu": 9, "test-gpu": 1}
        assert busy["waiting_jobs"] == 1
        assert [u["job_id"] for u in busy["unplaceable"]] == ["huge"]
        assert busy["idle_nodes"] == [] and busy["drainable_nodes"] == []
    finally:
        with manager._lock:
            for jid in ("waiter", "huge"):
                manager.snapshot.remove_pending(jid)
            manager.snapshot.stop("holder", 1.0)


def test_put_queues_is_for_admins_validated_and_kept_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    new = [{"name": "everyone", "group": "*", "quotas": {"test-gpu": {"nominal": 1}}}]
    app = create_platform_app(_config(data_dir), authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as api:
        r = api.put("/api/queues", json={"queues": new}, headers=AS_ALICE)
        assert r.status_code == 403, r.text
        bad = [{"name": "x", "group": "g", "quotas": {"nvidia-h100": {"nominal": 1}}},
               {"name": "x", "group": "g", "quotas": {"cpu": {"nominal": -1}}, "colour": 1}]
        r = api.put("/api/queues", json={"queues": bad}, headers=AS_ROOT)
        assert r.status_code == 422, r.text
        paths = {p for p, _ in r.json()["problems"]}
        assert {"queues.1.quotas.cpu.nominal", "queues.1.colour"} <= paths
        r = api.put("/api/queues", json={"queues": bad[:1] * 2}, headers=AS_ROOT)
        assert {p for p, _ in r.json()["problems"]} == {"queues.0.quotas.nvidia-h100",
                                                       "queues.1.name",
                                                       "queues.1.quotas.nvidia-h100"}
        # a queue with a waiting job cannot go: a fake job holds the one device (in the
        # snapshot only), so alice's job waits
        manager = api.app.state.platform.manager  # type: ignore[attr-defined]
        from mlaas.platform.scheduler import Workload

        with manager._lock:
            manager.snapshot.add_pending(Workload("holder", "cms-q", "carol",
                                                  {"cpu": 1, "test-gpu": 1}, 0.0))
            manager.snapshot.start("holder", "local", {"cpu": (0,), "test-gpu": (0,)}, 0.0)
        job = api.post("/api/jobs", json={"name": "w", "spec": _spec(gpus={"test-gpu": 1})},
                       headers=AS_ALICE).json()
        manager.tick()
        assert api.get(f"/api/jobs/{job['id']}", headers=AS_ALICE).json()["state"] == "queued"
        r = api.put("/api/queues", json={"queues": new}, headers=AS_ROOT)
        assert r.status_code == 409 and "cms-q (2 job(s))" in r.json()["message"], r.text
        api.post(f"/api/jobs/{job['id']}/cancel", headers=AS_ALICE)
        with manager._lock:
            manager.snapshot.stop("holder", 1.0)
        r = api.put("/api/queues", json={"queues": new}, headers=AS_ROOT)
        assert r.status_code == 200, r.text
        assert [q["name"] for q in r.json()["queues"]] == ["everyone"]
        assert r.json()["queues"][0]["mine"] is True
    saved = json.loads((data_dir / "queues.json").read_text())
    assert saved["queues"][0]["name"] == "everyone"
    app = create_platform_app(_config(data_dir), authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as api:  # a restart keeps them
        names = [q["name"] for q in api.get("/api/queues", headers=AS_BOB).json()["queues"]]
        assert names == ["everyone"]


def test_default_config_is_one_unlimited_queue_for_everybody(tmp_path: Path) -> None:
    config = PlatformConfig(data_dir=tmp_path / "d", cpus=1, poll_interval=60)
    app = create_platform_app(config, authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as api:
        [q] = api.get("/api/queues", headers=AS_BOB).json()["queues"]
        assert q["name"] == "default" and q["group"] == "*" and q["strategy"] == "StrictFIFO"
        assert all(v["nominal"] is None for v in q["quotas"].values())  # unlimited


@pytest.mark.parametrize("settings, path", [
    ({"queues": [{"name": "a", "group": "g", "quotas": {"nvidia-x": {"nominal": 1}}}]},
     "queues.0.quotas.nvidia-x"),
    ({"queues": [{"name": "a", "group": "g"}, {"name": "a", "group": "h"}]}, "queues.1.name"),
    ({"queues": [{"name": "Bad Name", "group": "g"}]}, "queues.0.name"),
    ({"queues": [{"name": "a", "group": "g", "strategy": "LIFO"}]}, "queues.0.strategy"),
    ({"queues": [{"name": "a", "group": "g", "quotas": {"cpu": {"nominal": 1,
                                                                "borrowing_limit": -2}}}]},
     "queues.0.quotas.cpu.borrowing_limit"),
    ({"flavors": ["cpu"]}, "flavors.0.name"),
    ({"scheduler": {"policy": "lottery"}}, "scheduler.policy"),
    ({"scheduler": {"half_life_s": 0}}, "scheduler.half_life_s"),
    ({"executor": "ray"}, "executor"),  # the message names ray_address
    ({"gpu_flavor": "NVIDIA T4"}, "gpu_flavor"),
])
def test_bad_farm_settings_name_the_field(settings: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**settings)
    assert path in [p for p, _ in info.value.problems], info.value


def test_farm_settings_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("flavors: [nvidia-a100, {name: nvidia-a100-mig-1g.10gb, parent: "
                    "nvidia-a100}]\ngpu_flavor: nvidia-t4\nscheduler: {policy: quota, "
                    "half_life_s: 3600, reclaim: true}\nqueues:\n  - {name: a, group: /cms, "
                    "quotas: {nvidia-a100: {nominal: 2, borrowing_limit: 1}}}\n")
    config = load_config(path)
    assert config.known_flavors == {"cpu", "nvidia-t4", "nvidia-a100",
                                    "nvidia-a100-mig-1g.10gb"}
    policy = config.scheduler.policy_config()
    assert policy.name == "quota" and policy.half_life_s == 3600 and policy.reclaim is True
    assert config.queues[0].quotas["nvidia-a100"].borrowing_limit == 1
