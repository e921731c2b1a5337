"""`mlaas serve` under concurrent change: inference while versions come and go.

A real server (create_server under uvicorn on 127.0.0.1). Reader threads score
through every inference route while a writer thread uploads versions, moves
aliases and deletes versions (the one the alias points at included). Every
answer must be 200 or 404 (a version or alias deleted under the request),
never a 500; afterwards the registry on disk, the HTTP view of it and the
runtime agree. The load is bounded: a fixed number of changes, readers stop
with the writer.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mlaas.bundle import Bundle
from mlaas.serve.server import create_server
from serve_support import running

pytestmark = pytest.mark.network

ROUNDS = 8
READERS = 2
MAX_READS = 400  # per reader: the readers stop with the writer, or here


def _reads(trained: dict[str, Any], n_features: int) -> list[tuple[str, str, Any]]:
    """(method, path, JSON body) of each kind of read, over every inference route."""
    x = np.random.default_rng(2).normal(size=(3, n_features)).astype(np.float32)
    v2 = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                      "data": x.ravel().tolist()}]}
    rows = trained["rows"][:2]
    tfaas = {"keys": ["MET_pt", "Jet_pt"], "values": [20.0, [30.0]], "model": "m"}
    return [("POST", "/api/models/m/predict", rows),
            ("POST", "/api/models/m/predict?alias=production", rows),
            ("POST", "/api/models/m/predict?version={v}", rows),
            ("POST", "/v2/models/m/infer", v2),
            ("POST", "/v2/models/m/versions/{v}/infer", v2),
            ("GET", "/v2/models/m/versions/{v}/ready", None),
            ("POST", "/json", tfaas),
            ("GET", "/api/models/m", None)]


def test_issue4_inference_during_uploads_alias_changes_and_deletes(
        tmp_path: Path, trained: dict[str, Any]) -> None:
    app = create_server(tmp_path / "models", max_delay_ms=1.0, freeze_gc=False)
    n_features = len(Bundle.load(trained["dir"]).spec["feature_names"])
    reads = _reads(trained, n_features)
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    latest = [1]

    with running(app) as address:
        base = f"http://{address}"
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.post("/api/models/m", content=trained["bytes"]).status_code == 201

        def reader(k: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                for i in range(MAX_READS):
                    if done.is_set():
                        break
                    method, path, body = reads[(i + k) % len(reads)]
                    # the newest version, or one that may just have been deleted
                    path = path.format(v=max(1, latest[0] - i % 3))
                    r = c.request(method, path, json=body)
                    with lock:
                        statuses[path.split("?")[0], r.status_code] += 1
                        if r.status_code not in (200, 404):
                            failures.append(f"{method} {path}: {r.status_code} {r.text[:300]}")

        def writer() -> None:
            try:
                with httpx.Client(base_url=base, timeout=60) as c:
                    for i in range(ROUNDS):
                        r = c.post("/api/models/m", content=trained["bytes"])
                        assert r.status_code == 201, r.text
                        new = latest[0] = r.json()["version"]
                        r = c.put("/api/models/m/aliases/production", json={"version": new})
                        assert r.status_code == 200, r.text
                        versions = [v["version"] for v in c.get("/api/models/m").json()["versions"]]
                        if len(versions) > 2:
                            r = c.delete(f"/api/models/m/versions/{versions[0]}")
                            assert r.status_code == 200, r.text
                        if i % 2:  # the version the alias points at (its number comes back)
                            assert c.delete(f"/api/models/m/versions/{new}").status_code == 200
                            latest[0] = new - 1
            finally:
                done.set()

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
        assert sum(n for (_, status), n in statuses.items() if status == 200) > 0

        # the registry ends consistent: on disk, over HTTP, in the runtime
        with httpx.Client(base_url=base, timeout=60) as c:
            model = c.get("/api/models/m").json()
            versions = [v["version"] for v in model["versions"]]
            registry = app.state.registry
            assert versions == registry.versions("m") and versions
            assert set(model["aliases"].values()) <= set(versions)
            assert sorted(p.name for p in registry.root.iterdir() if p.name.startswith(".")) \
                == [".lock"]  # no staging or trash directories left
            for v in versions:
                assert c.post(f"/api/models/m/predict?version={v}",
                              json=trained["rows"]).status_code == 200
            r = c.post("/api/models/m/predict", json=trained["rows"])
            assert r.status_code == 200
            assert r.json()["version"] == model["aliases"].get("production", versions[-1])
            assert {v for name, v in app.state.runtime.held() if name == "m"} <= set(versions)
