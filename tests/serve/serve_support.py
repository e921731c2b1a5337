"""Helpers of the serving tests: bundle archives with an edited spec, apps under uvicorn,
Prometheus text as samples."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from servers import running  # noqa: F401  - the serving tests import it from here


def with_spec(archive: bytes, **changes: Any) -> bytes:
    """``archive`` (a bundle .tar.gz) repacked with spec.json's top-level keys changed;
    a value of None removes the key."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as src, \
            tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
            if data is not None and member.name.rsplit("/", 1)[-1] == "spec.json":
                spec = json.loads(data)
                for key, value in changes.items():
                    if value is None:
                        spec.pop(key, None)
                    else:
                        spec[key] = value
                data = json.dumps(spec).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


Labels = tuple[tuple[str, str], ...]


def samples(text: str, name: str) -> dict[Labels, float]:
    """The Prometheus samples called ``name`` in ``text``, keyed by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


