"""Where a trained model came from: input files, spec, software, times and host.

Layer: train. The result goes into the bundle as ``provenance.json`` so a
model found later can be traced to the exact data and code that made it.
Local files are hashed (sha256, streamed in 1 MB blocks, never loaded whole);
remote files are named by URL only: hashing them would mean reading every
byte again over the network.
"""

from __future__ import annotations

import hashlib
import platform
import socket
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mlaas.data import sources
from mlaas.spec import Pipeline

__all__ = ["provenance", "sha256_file", "package_versions", "iso_utc"]

BLOCK = 1 << 20  # 1 MB
PACKAGES = ("mlaas", "numpy", "awkward", "uproot", "torch", "onnx", "onnxruntime")


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that decide a model's numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def iso_utc(timestamp: float) -> str:
    """A Unix time as ISO 8601 in UTC, e.g. ``2024-05-01T12:00:00.123456+00:00``."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


def _file_entry(info: Any) -> dict[str, Any]:
    url = info.ref.url
    entry: dict[str, Any] = {"url": url, "source": info.ref.source, "entries": info.entries}
    if sources.is_remote(url):
        entry["remote"] = True
        return entry
    path = Path(url)
    entry.update(remote=False, size=path.stat().st_size, sha256=sha256_file(path))
    return entry


def provenance(pipeline: Pipeline, dataset: Any, started: float, ended: float) -> dict[str, Any]:
    """The provenance record of one run.

    Args:
        pipeline (Pipeline): the spec the run used.
        dataset (RootDataset): any split of the run (its ``files`` are the inputs).
        started, ended (float): Unix times of the run's start and end.

    Returns a JSON-able dict: ``files`` (url, source, entries; size and sha256
    for local files), ``spec`` and ``spec_digest``, ``packages``, ``started``,
    ``ended`` (ISO 8601 UTC), ``duration_seconds`` and ``hostname``.
    """
    return {
        "files": [_file_entry(info) for info in dataset.files],
        "spec_digest": pipeline.digest(),
        "spec": pipeline.model_dump(mode="json"),
        "packages": package_versions(),
        "started": iso_utc(started),
        "ended": iso_utc(ended),
        "duration_seconds": round(float(ended - started), 3),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }
