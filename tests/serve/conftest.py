"""Fixtures for the serving tests: one small real bundle, trained once per session."""

from __future__ import annotations

from typing import Any

import pytest

from mlaas.data import synth
from mlaas.train.run import run


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bundle from a 1-epoch MLP on synthetic data: ``archive`` (path), ``bytes``,
    ``dir`` (the bundle directory) and ``rows`` / ``columns`` (events to score)."""
    tmp = tmp_path_factory.mktemp("serve-bundle")
    files = synth.generate(tmp / "data", 2000, seed=1)["files"]
    spec = {
        "data": {
            "sources": [{"files": [files["signal"]], "label": 1},
                        {"files": [files["background"]], "label": 0}],
            "derived": {"HT": "sum(Jet_pt)"},
            "cut": "MET_pt > 5",
            "features": ["MET_pt", "HT", {"branch": "Jet_pt", "max_len": 4}],
        },
        "model": {"builtin": "mlp", "hidden": [8]},
        "train": {"epochs": 1, "batch_size": 512},
    }
    result = run(spec, tmp / "run", progress=False)
    archive = tmp / "run" / "bundle.tar.gz"
    assert archive.exists()
    rows: list[dict[str, Any]] = [
        {"MET_pt": 20.5, "Jet_pt": [50.0, 31.0, 12.5]},
        {"MET_pt": 2.0, "Jet_pt": [40.0]},  # fails the cut -> null
        {"MET_pt": 80.0, "Jet_pt": []},
        {"MET_pt": 7.5, "Jet_pt": [90.0, 80.0, 70.0, 60.0, 50.0, 40.0]},
        {"MET_pt": 33, "Jet_pt": [25], "extra": "ignored"},
    ]
    columns = {"MET_pt": [r["MET_pt"] for r in rows], "Jet_pt": [r["Jet_pt"] for r in rows]}
    return {"archive": archive, "bytes": archive.read_bytes(), "dir": result.bundle,
            "rows": rows, "columns": columns}
