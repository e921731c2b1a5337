"""Fuzz every operation of the platform's OpenAPI schema with schemathesis: no 5xx, ever.

The app runs in-process (TestClient, so its lifespan opens a real SQLite
store, the job manager and the local executor); schemathesis generates
requests from ``/openapi.json`` (a bounded number per operation) and each
answer must be below 500. Generated specs do not validate, so no job runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from mlaas.platform.app import create_platform_app
from mlaas.platform.config import PlatformConfig
from platform_support import TestClient

MAX_EXAMPLES = 12
"""Requests per operation; enough to reach every parameter's edge cases in a few seconds."""


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("fuzz")
    app = create_platform_app(PlatformConfig(data_dir=data, cpus=1, max_body_bytes=1 << 20))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.put("/api/files/specs/a.yaml", content=b"name: a\n").status_code == 201
        yield c


def _send(client: TestClient, kwargs: dict[str, Any]) -> Any:
    """Send schemathesis' requests-style arguments through the httpx-based TestClient."""
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    data = kwargs.get("data")
    if isinstance(data, (str, bytes)):
        body["content"] = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    elif data is not None:
        body["data"] = data
    if kwargs.get("files"):
        body["files"] = kwargs["files"]
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items()
               if k.lower() not in ("content-length", "transfer-encoding")}
    return client.request(kwargs["method"], kwargs["url"], params=kwargs.get("params") or None,
                          headers=headers, cookies=kwargs.get("cookies") or None, **body)


@pytest.mark.slow
def test_no_operation_answers_5xx(client: TestClient) -> None:
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30  # jobs, files, models, TFaaS and KServe v2 routes
    failures: list[str] = []

    for operation in operations:
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            response = _send(client, kwargs)
            if response.status_code >= 500:
                failures.append(f"{operation.label} -> {response.status_code} "
                                f"{response.text[:200]!r}\n  {case.as_curl_command()}")
            assert "Traceback" not in response.text

        fuzz()

    assert not failures, "server errors:\n" + "\n".join(failures[:20])
