"""mlaas.client without a server: error mapping, request building, upload rewriting, download safety.

These tests drive :class:`mlaas.client.Client` through ``httpx.MockTransport``
(the transport layer: requests are recorded and answered by a function), so
they check what the client sends and how it reads answers. The same client
against the real server is tested in ``tests/test_cli_client.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import httpx
import pytest
import yaml

from mlaas import errors
from mlaas.client import Client, ServerUnreachable, WaitTimeout, error_from_response
from mlaas.errors import (
    Conflict,
    Forbidden,
    MlaasError,
    NotFound,
    PathError,
    PlatformError,
    QuotaExceeded,
    RateLimited,
    SpecError,
    Unauthorized,
)

from servers import free_port

URL = "http://127.0.0.1:9"

Handler = Callable[[httpx.Request], httpx.Response]


def client_with(handler: Handler, **kwargs: Any) -> Client:
    return Client(URL, transport=httpx.MockTransport(handler), **kwargs)


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)
    return handler


# ------------------------------------------------------------------ error mapping


def test_not_found_is_rebuilt_with_its_context() -> None:
    body = {"error": "NotFound", "message": "no job named 'abc'", "job_id": "abc"}
    with client_with(answer(404, body)) as c, pytest.raises(NotFound) as info:
        c.job("abc")
    exc = info.value
    assert type(exc) is NotFound and isinstance(exc, KeyError)
    assert exc.job_id == "abc" and exc.status_code == 404  # type: ignore[attr-defined]
    assert str(exc) == "no job named 'abc'\nfor job abc"


def test_spec_error_keeps_every_problem() -> None:
    body = {"error": "SpecError", "message": "invalid pipeline spec",
            "problems": [["data.sources", "Field required"], ["train.epochs", "too big"]]}
    with client_with(answer(422, body)) as c, pytest.raises(SpecError) as info:
        c.submit({"data": {}}, name="x")
    assert info.value.problems == [("data.sources", "Field required"), ("train.epochs", "too big")]
    assert "  train.epochs: too big" in str(info.value)


def test_model_not_found_is_caught_as_not_found_and_as_model_not_found() -> None:
    body = {"error": "ModelNotFound", "message": "no model named 'higgs'"}
    with client_with(answer(404, body)) as c, pytest.raises(NotFound) as info:
        c.predict("higgs", [{}])
    assert type(info.value).__name__ == "ModelNotFound"
    local = getattr(errors, "ModelNotFound", None)
    if local is not None:  # mlaas.errors holds the serving errors once issue 5 lands
        assert isinstance(info.value, local)
    assert str(info.value) == "no model named 'higgs'"


@pytest.mark.parametrize("status,name,family", [
    (401, "Unauthorized", Unauthorized),
    (403, "Forbidden", errors.Forbidden),
    (409, "Conflict", Conflict),
    (413, "QuotaExceeded", QuotaExceeded),
    (400, "PathError", PathError),
    (404, "HTTPError", NotFound),           # an unknown route
    (400, "BadRequest", ValueError),
    (500, "InternalServerError", PlatformError),
    (503, "SomethingNew", PlatformError),   # a class this client does not know
])
def test_each_error_class_lands_in_its_family(status: int, name: str, family: type) -> None:
    body = {"error": name, "message": "went wrong"}
    with client_with(answer(status, body)) as c, pytest.raises(MlaasError) as info:
        c.jobs()
    assert isinstance(info.value, family)
    assert type(info.value).__name__ == name
    assert info.value.message.startswith("went wrong")


def test_rate_limited_reads_retry_after_header() -> None:
    handler = answer(429, {"error": "RateLimited", "message": "slow down"}, {"Retry-After": "7"})
    with client_with(handler) as c, pytest.raises(RateLimited) as info:
        c.jobs()
    assert info.value.retry_after == 7  # type: ignore[attr-defined]


def test_a_non_json_error_still_becomes_an_mlaas_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")
    with client_with(handler) as c, pytest.raises(PlatformError) as info:
        c.models()
    assert type(info.value).__name__ == "HTTPError"
    assert "HTTP 502" in str(info.value) and "Bad Gateway" in str(info.value)


def test_context_keys_cannot_overwrite_exception_internals() -> None:
    response = httpx.Response(409, json={"error": "Conflict", "message": "done already",
                                         "args": "x", "with_traceback": 1, "job_id": "j1"},
                              request=httpx.Request("POST", URL + "/api/jobs/j1/cancel"))
    exc = error_from_response(response)
    assert isinstance(exc, Conflict) and exc.job_id == "j1"  # type: ignore[attr-defined]
    assert callable(exc.with_traceback)


def test_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=5) as c, pytest.raises(ServerUnreachable) as info:
        c.jobs()
    assert isinstance(info.value, OSError) and isinstance(info.value, PlatformError)
    assert url in str(info.value) and "mlaas server" in str(info.value)


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.ReadTimeout("slow"),
    httpx.RemoteProtocolError("closed"), httpx.ReadError("reset"), httpx.WriteError("pipe"),
])
def test_every_transport_failure_becomes_server_unreachable(exc: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc
    with client_with(handler) as c:
        for call in (c.jobs, lambda: list(c.logs("j1", follow=True, reconnect=0)),
                     lambda: c.upload_file("a.txt", b"x")):
            with pytest.raises(ServerUnreachable) as info:
                call()
            assert URL in str(info.value) and info.value.__cause__ is exc


def test_a_server_url_without_scheme_is_refused() -> None:
    with pytest.raises(PathError, match="must start with http"):
        Client("127.0.0.1:8080")


# ------------------------------------------------------------------ requests and tokens


def test_token_from_environment_is_sent_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"error": "Unauthorized", "message": "bad token"})

    monkeypatch.setenv("MLAAS_TOKEN", "s3cret-token")
    c = client_with(handler)
    with c, pytest.raises(Unauthorized) as info:
        c.jobs(state="running", mine=True, limit=5)
    assert seen[0].headers["Authorization"] == "Bearer s3cret-token"
    assert dict(seen[0].url.params) == {"state": "running", "mine": "true", "limit": "5"}
    assert "s3cret" not in repr(c) and "s3cret" not in str(info.value)


def test_no_token_sends_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLAAS_TOKEN", raising=False)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"models": []})

    with client_with(handler) as c:
        assert c.models() == []
    assert "Authorization" not in seen[0].headers


def test_predict_sends_events_version_and_alias() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"model": "m", "version": 2, "outputs": [0.25, None]})

    with client_with(handler) as c:
        assert c.predict("m", [{"MET_pt": 1.0}, {}], version=2) == [0.25, None]
        c.predict("m", {"MET_pt": [1.0]}, alias="production")
    assert seen[0].url.path == "/api/models/m/predict"
    assert dict(seen[0].url.params) == {"version": "2"}
    assert json.loads(seen[0].content) == [{"MET_pt": 1.0}, {}]
    assert dict(seen[1].url.params) == {"alias": "production"}


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "", "a\\b"])
def test_workspace_paths_that_leave_the_workspace_are_refused_before_sending(bad: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")
    with client_with(handler) as c, pytest.raises(PathError):
        c.upload_file(bad, b"x")


def test_logs_follow_streams_text_across_split_characters() -> None:
    seen: list[httpx.Request] = []
    text = "epoch 1 loss=0.5 ✓\nepoch 2 done\n".encode()
    cut = text.index("✓".encode()) + 1  # inside the 3-byte character

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "state": "succeeded"})
        seen.append(request)
        return httpx.Response(200, content=iter([text[:cut], text[cut:]]),
                              headers={"Content-Type": "text/plain"})

    with client_with(handler) as c:
        pieces = list(c.logs("j1", follow=True, offset=10))
    assert "".join(pieces) == text.decode()
    assert dict(seen[0].url.params) == {"follow": "true", "offset": "10"}


def test_logs_follow_resumes_after_a_dropped_connection_and_a_restart() -> None:
    parts = [b"line one\n", b"line two\n", b"line three\n"]
    offsets: list[int] = []
    states = iter(["running", "succeeded"])

    def broken(first: bytes) -> Iterator[bytes]:
        yield first
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "state": next(states)})
        offsets.append(int(request.url.params["offset"]))
        if len(offsets) == 1:   # the server dies mid-stream
            return httpx.Response(200, content=broken(parts[0]))
        if len(offsets) == 2:   # a clean end while the job still runs (graceful restart)
            return httpx.Response(200, content=iter([parts[1]]))
        return httpx.Response(200, content=iter([parts[2]]))

    with client_with(handler) as c:
        text = "".join(c.logs("j1", follow=True, reconnect=5))
    assert text == b"".join(parts).decode()
    assert offsets == [0, len(parts[0]), len(parts[0]) + len(parts[1])]


def test_logs_without_follow_do_not_retry() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadError("reset")

    with client_with(handler) as c, pytest.raises(ServerUnreachable):
        list(c.logs("j1"))
    assert len(calls) == 1


def test_wait_returns_the_final_job_and_times_out() -> None:
    states = iter(["queued", "running", "succeeded"])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "j1", "state": next(states, "succeeded")})

    with client_with(handler) as c:
        assert c.wait("j1", poll=0.0)["state"] == "succeeded"
    with client_with(answer(200, {"id": "j2", "state": "running"})) as c, \
            pytest.raises(WaitTimeout) as info:
        c.wait("j2", timeout=0.0, poll=0.0)
    assert info.value.job_id == "j2" and isinstance(info.value, TimeoutError)  # type: ignore[attr-defined]


def test_wait_polls_through_a_restart_but_not_forever() -> None:
    answers = iter([httpx.ConnectError("refused"), "running", httpx.ConnectError("refused"),
                    "succeeded"])

    def handler(request: httpx.Request) -> httpx.Response:
        item = next(answers)
        if isinstance(item, Exception):
            raise item
        return httpx.Response(200, json={"id": "j1", "state": item})

    with client_with(handler) as c:
        assert c.wait("j1", poll=0.0, reconnect=5)["state"] == "succeeded"

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with client_with(down) as c, pytest.raises(ServerUnreachable):
        c.wait("j1", poll=0.01, reconnect=0.05)


# ------------------------------------------------------------------ submit: upload and rewrite


class FakeWorkspace:
    """Records uploads and the submitted job, answering like the contract says."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.jobs: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "PUT" and path.startswith("/api/files/"):
            name = path.removeprefix("/api/files/")
            self.files[name] = request.read()
            self.puts.append(name)
            return httpx.Response(201, json={"path": name, "size": len(self.files[name]),
                                             "sha256": hashlib.sha256(self.files[name]).hexdigest()})
        if request.method == "GET" and path == "/api/files":
            return httpx.Response(200, json={"files": [
                {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                for p, b in self.files.items()]})
        if request.method == "POST" and path == "/api/jobs":
            body = json.loads(request.content)
            self.jobs.append(body)
            return httpx.Response(201, json={"id": f"j{len(self.jobs)}", "name": body["name"],
                                             "state": "queued"})
        return httpx.Response(404, json={"error": "HTTPError", "message": "Not Found"})


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def test_submit_uploads_local_files_and_rewrites_the_spec(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    files = {"data/sig_1.root": b"signal one", "data/sig_2.root": b"signal two",
             "data/bkg.root": b"background", "net.py": b"def build(n, spec): ..."}
    for rel, content in files.items():
        (tmp_path / rel).write_bytes(content)
    spec = {
        "name": "higgs",
        "data": {"sources": [
            {"files": ["data/sig_*.root"], "label": 1},
            {"files": [str(tmp_path / "data/bkg.root"), "root://eos:1094//store/b.root",
                       "shared/already_uploaded.root"], "label": 0},
        ], "features": ["MET_pt"]},
        "model": {"file": "net.py"},
    }
    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    fake = FakeWorkspace()
    with client_with(fake) as c:
        job = c.submit(spec_path)
        again = c.submit(spec_path, name="second")
    assert job["id"] == "j1" and again["name"] == "second"
    sent = fake.jobs[0]
    assert sent["name"] == "higgs"
    sources = sent["spec"]["data"]["sources"]
    want = [f"submit/{sha16(b'signal one')}/sig_1.root", f"submit/{sha16(b'signal two')}/sig_2.root"]
    assert sources[0]["files"] == want
    assert sources[1]["files"] == [f"submit/{sha16(b'background')}/bkg.root",
                                   "root://eos:1094//store/b.root", "shared/already_uploaded.root"]
    assert sent["spec"]["model"]["file"] == f"submit/{sha16(files['net.py'])}/net.py"
    for rel, content in files.items():
        assert fake.files[f"submit/{sha16(content)}/{Path(rel).name}"] == content
    assert len(fake.puts) == 4  # the second submit found every file already there
    assert fake.jobs[1]["spec"] == sent["spec"]
    assert yaml.safe_load(spec_path.read_text()) == spec  # the local spec is left alone


def test_submit_without_upload_sends_the_spec_unchanged(tmp_path: Path) -> None:
    (tmp_path / "a.root").write_bytes(b"x")
    spec = {"data": {"sources": [{"files": ["a.root"], "label": 1}], "features": ["x"]}}
    fake = FakeWorkspace()
    spec_path = tmp_path / "mine.json"
    spec_path.write_text(json.dumps(spec))
    with client_with(fake) as c:
        c.submit(spec_path, upload_workspace_files=False)
    assert fake.puts == [] and fake.jobs == [{"name": "mine", "spec": spec}]


def test_submit_of_a_malformed_spec_leaves_validation_to_the_server(tmp_path: Path) -> None:
    fake = FakeWorkspace()
    with client_with(fake) as c:
        c.submit({"data": {"sources": "nope"}, "model": ["x"]}, name="odd")
    assert fake.jobs[0]["spec"] == {"data": {"sources": "nope"}, "model": ["x"]}


@pytest.mark.parametrize("content,match", [("[1, 2]", "mapping at the top"),
                                           ("a: [1,", "is not valid yaml")])
def test_submit_of_an_unreadable_spec_file_is_a_spec_error(tmp_path: Path, content: str,
                                                           match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with client_with(FakeWorkspace()) as c, pytest.raises(SpecError, match=match) as info:
        c.submit(path)
    assert info.value.file_path == str(path)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ download: paths stay inside


def artifacts_server(listing: list[str], contents: dict[str, bytes]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/artifacts"):
            return httpx.Response(200, json={"artifacts": [{"path": p, "size": 1} for p in listing]})
        rel = path.split("/artifacts/", 1)[1]
        if rel in contents:
            return httpx.Response(200, content=contents[rel])
        return httpx.Response(404, json={"error": "NotFound", "message": f"no artifact {rel!r}"})
    return handler


def test_download_writes_every_artifact(tmp_path: Path) -> None:
    contents = {"metrics.json": b"{}", "bundle/model.onnx": b"onnx", "plots/roc.png": b"png"}
    with client_with(artifacts_server(list(contents), contents)) as c:
        written = c.download("j1", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(contents)
    for rel, data in contents.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    assert not list((tmp_path / "out").rglob("*.part"))


@pytest.mark.parametrize("evil", ["../escape.txt", "/etc/passwd", "bundle/../../escape.txt", ""])
def test_download_refuses_paths_that_leave_the_directory(tmp_path: Path, evil: str) -> None:
    contents = {"metrics.json": b"{}", evil: b"bad"}
    dest = tmp_path / "out"
    with client_with(artifacts_server(["metrics.json", evil], contents)) as c, \
            pytest.raises(PathError) as info:
        c.download("j1", dest)
    assert info.value.job_id == "j1"  # type: ignore[attr-defined]
    assert not (tmp_path / "escape.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # nothing written before the check


def test_download_of_a_missing_artifact_leaves_no_partial_file(tmp_path: Path) -> None:
    with client_with(artifacts_server(["gone.json"], {})) as c, pytest.raises(NotFound):
        c.download("j1", tmp_path)
    assert list(tmp_path.rglob("*")) == []


# ------------------------------------------------------------------ sharing: visibility


def test_set_model_visibility_sends_the_value_and_returns_the_answer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"name": "m/x", "owner": "alice", "group": "/cms",
                                         "visibility": "group:/cms"})

    with client_with(handler) as c:
        got = c.set_model_visibility("m/x", "group:/cms")
        c.model_visibility("m/x")
    assert got["visibility"] == "group:/cms"
    assert (seen[0].method, seen[0].url.raw_path) == ("PUT", b"/api/models/m%2Fx/visibility")
    assert json.loads(seen[0].content) == {"visibility": "group:/cms"}
    assert (seen[1].method, seen[1].url.raw_path) == ("GET", b"/api/models/m%2Fx/visibility")


@pytest.mark.parametrize("status, body, family", [
    (422, {"error": "SpecError", "message": "visibility 'x' is not valid",
           "problems": [["visibility", "'x' is not one of ..."]]}, SpecError),
    (403, {"error": "Forbidden", "message": "visibility 'group:/atlas': you are not a member",
           "field": "visibility"}, Forbidden),
])
def test_set_model_visibility_refusals_come_back_as_mlaas_errors(
        status: int, body: dict[str, Any], family: type) -> None:
    with client_with(answer(status, body)) as c, pytest.raises(family) as info:
        c.set_model_visibility("m", "x")
    if family is SpecError:
        assert info.value.problems == [("visibility", "'x' is not one of ...")]
    else:
        assert info.value.field == "visibility"


def test_submit_sends_visibility_only_when_given(tmp_path: Path) -> None:
    fake = FakeWorkspace()
    with client_with(fake) as c:
        c.submit({"name": "a"}, upload_workspace_files=False)
        c.submit({"name": "b"}, upload_workspace_files=False, visibility="public")
    assert "visibility" not in fake.jobs[0]
    assert fake.jobs[1]["visibility"] == "public"
