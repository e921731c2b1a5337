"""Small real pipelines for the job tests (executor, job process, manager).

Each is a pipeline spec dict on synthetic ROOT files (``mlaas.data.synth``),
small enough that a job process finishes in a few seconds. The user model
files are real files a job imports; they make a job slow (to interrupt it
mid-training), ignore SIGTERM (to test SIGKILL), or write the environment
they see (to test scrubbing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlaas.data import synth

SLOW_MODEL = '''
import time
import torch
from torch import nn


class Slow(nn.Module):
    """An MLP that sleeps a little per batch, so a job runs long enough to interrupt."""

    def __init__(self, n_features):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            time.sleep(SLEEP)
        return self.net(x)


def build(n_features, spec):
    return Slow(n_features)
'''

STUBBORN_MODEL = '''
import signal
import time
import torch
from torch import nn


class Stubborn(nn.Module):
    """Ignores SIGTERM from its first batch on, and sleeps: only SIGKILL stops it."""

    def __init__(self, n_features):
        super().__init__()
        self.net = nn.Linear(n_features, 1)

    def forward(self, x):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("stubborn.started", "w").close()
        time.sleep(0.2)
        return self.net(x)


def build(n_features, spec):
    return Stubborn(n_features)
'''

ENV_MODEL = '''
import json
import os
from pathlib import Path
from torch import nn


def build(n_features, spec):
    Path(os.environ["HOME"], "env.json").write_text(json.dumps(dict(os.environ)))
    raise RuntimeError("env written; this job stops here on purpose")
'''


def make_data(root: Path, events: int = 2000) -> Path:
    """Signal and background ROOT files under ``root/data``; returns that directory."""
    data = root / "data"
    synth.generate(data, events, seed=5)
    return data


def pipeline(data: Path, *, epochs: int = 2, model: dict[str, Any] | None = None,
             batch_size: int = 256, name: str = "jobtest") -> dict[str, Any]:
    """A binary-classification pipeline on the files in ``data`` (absolute paths)."""
    return {
        "name": name,
        "data": {
            "sources": [{"name": "signal", "files": [str(data / "signal.root")], "label": 1},
                        {"name": "background", "files": [str(data / "background.root")],
                         "label": 0}],
            "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 2, "sort_by": "Jet_pt"}],
            "step_size": 5000,
        },
        "model": model or {"builtin": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "batch_size": batch_size, "seed": 3},
    }


def model_file(root: Path, source: str, name: str, **consts: Any) -> dict[str, Any]:
    """Write a user model file (with module constants) and return the spec's ``model``."""
    path = root / f"{name}.py"
    header = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    path.write_text(header + source)
    return {"file": str(path)}


def write_job(job_dir: Path, spec: dict[str, Any]) -> Path:
    """A job directory with its pipeline.json, as the manager writes it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "pipeline.json").write_text(json.dumps(spec))
    return job_dir


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def progress_epoch(job_dir: Path) -> int:
    """The epoch of the job's last progress report (0 before the first)."""
    try:
        return int(json.loads((job_dir / "progress.json").read_text()).get("epoch") or 0)
    except (OSError, ValueError):
        return 0
