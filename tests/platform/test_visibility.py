"""Sharing jobs and models: ``private``, ``group:<name>``, ``public``, through the whole app.

The platform app runs with real principals told apart by ``X-User``
(:class:`platform_support.HeaderUsers`): alice (group ``cms``) owns
everything; carl is in ``atlas`` and ``cms`` (``cms`` is not his first
group: membership, not the primary group, decides); bob is only in
``atlas``; root is an admin. One real training job of alice's, submitted
``group:cms``, registers the model the inference tests use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlaas.errors import Forbidden, SpecError
from mlaas.platform.app import create_platform_app
from mlaas.platform.config import PlatformConfig
from mlaas.platform.principal import ADMIN_ROLE, Principal
from mlaas.platform.visibility import format_visibility, parse_visibility
from platform_support import EVENTS, HeaderUsers, TestClient, make_data, pipeline, wait_for

pytestmark = pytest.mark.slow

ALICE = Principal(user="alice", groups=("cms",))
CARL = Principal(user="carl", groups=("atlas", "cms"))
BOB = Principal(user="bob", groups=("atlas",))
ROOT = Principal(user="root", groups=("ops",), roles=frozenset({ADMIN_ROLE}))
USERS = {p.user: p for p in (ALICE, CARL, BOB, ROOT)}
AS = {name: {"X-User": name} for name in USERS}
MODEL = "shared-higgs"
BAD = ["", "secret", "PUBLIC", "group", "group:", "groups:cms", "group:a b", "group:" + "x" * 256,
       "private:cms"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, bytes]]:
    """The app, alice's finished ``group:cms`` job (registering ``MODEL``) and its bundle."""
    tmp = tmp_path_factory.mktemp("visibility")
    files = make_data(tmp / "inputs")
    config = PlatformConfig(data_dir=tmp / "data", cpus=1, poll_interval=0.1, grace_s=5)
    app = create_platform_app(config, authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as client:
        for label, path in files.items():
            r = client.put(f"/api/files/data/{label}.root", content=path.read_bytes(),
                           headers=AS["alice"])
            assert r.status_code == 201, r.text
        r = client.post("/api/jobs", json={"name": "shared", "spec": pipeline(name=MODEL),
                                           "visibility": "group:cms"}, headers=AS["alice"])
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["visibility"] == "group:cms" and job["group"] == "cms"

        def final() -> dict[str, Any] | None:
            got = client.get(f"/api/jobs/{job['id']}", headers=AS["alice"]).json()
            return got if got["state"] in ("succeeded", "failed", "cancelled") else None

        done = wait_for(final, what=f"job {job['id']} to finish")
        assert done["state"] == "succeeded", client.get(f"/api/jobs/{job['id']}/logs",
                                                        headers=AS["alice"]).text[-2000:]
        bundle = client.get(f"/api/jobs/{job['id']}/artifacts/bundle.tar.gz",
                            headers=AS["alice"])
        assert bundle.status_code == 200
        yield client, job["id"], bundle.content


def _dead_spec() -> dict[str, Any]:
    """A pipeline that fails at once (nobody listens on port 9): jobs that need not train."""
    spec = pipeline()
    for source in spec["data"]["sources"]:
        source["files"] = ["root://127.0.0.1:9//nothing.root"]
    return spec


def _upload(client: TestClient, name: str, bundle: bytes) -> None:
    r = client.post(f"/api/models/{name}", content=bundle, headers=AS["alice"])
    assert r.status_code == 201, r.text


# -- the syntax ----------------------------------------------------------------------------

def test_parse_visibility_forms() -> None:
    assert parse_visibility("private", ALICE) == ("private", None)
    assert parse_visibility(" public ", ALICE) == ("public", None)
    assert parse_visibility("group:cms", CARL) == ("group", "cms")
    assert parse_visibility("group:/cms/higgs", ROOT) == ("group", "/cms/higgs")  # admin: any
    assert format_visibility("group", "/cms") == "group:/cms"
    assert format_visibility("public", "/cms") == "public"


@pytest.mark.parametrize("text", BAD + [None, 3, ["public"]])
def test_parse_visibility_refuses_malformed_text(text: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_visibility(text, ROOT)
    assert [p for p, _ in info.value.problems] == ["visibility"]


def test_parse_visibility_refuses_a_group_the_caller_is_not_in() -> None:
    with pytest.raises(Forbidden, match="not a member of group 'atlas'") as info:
        parse_visibility("group:atlas", ALICE)
    assert info.value.to_dict()["field"] == "visibility"


# -- jobs ----------------------------------------------------------------------------------

def test_group_job_is_readable_by_members_only(world: tuple[TestClient, str, bytes]) -> None:
    client, job_id, _ = world
    for route in ("", "/logs", "/metrics", "/artifacts", "/artifacts/metrics.json"):
        assert client.get(f"/api/jobs/{job_id}{route}", headers=AS["carl"]).status_code == 200
        r = client.get(f"/api/jobs/{job_id}{route}", headers=AS["bob"])
        assert r.status_code == 404 and "alice" not in r.text
    assert "epoch" in client.get(f"/api/jobs/{job_id}/logs", headers=AS["carl"]).text.lower()
    assert job_id in {j["id"] for j in client.get("/api/jobs", headers=AS["carl"]).json()["jobs"]}
    assert job_id not in {j["id"] for j in
                          client.get("/api/jobs", headers=AS["bob"]).json()["jobs"]}
    r = client.post(f"/api/jobs/{job_id}/cancel", headers=AS["carl"])
    assert r.status_code == 403, r.text  # a member reads it but may not change it
    assert client.post(f"/api/jobs/{job_id}/cancel", headers=AS["bob"]).status_code == 404


def test_jobs_are_private_by_default(world: tuple[TestClient, str, bytes]) -> None:
    client, _, _ = world
    r = client.post("/api/jobs", json={"name": "mine", "spec": _dead_spec()},
                    headers=AS["alice"])
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["visibility"] == "private"
    assert client.get(f"/api/jobs/{job['id']}", headers=AS["carl"]).status_code == 404


def test_public_yaml_job_is_readable_by_everyone_but_not_cancellable(
        world: tuple[TestClient, str, bytes]) -> None:
    client, _, _ = world
    body = yaml.safe_dump(_dead_spec()).encode()
    r = client.post("/api/jobs?name=open&visibility=public", content=body,
                    headers={**AS["alice"], "Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["visibility"] == "public"
    assert client.get(f"/api/jobs/{job['id']}", headers=AS["bob"]).status_code == 200
    assert client.post(f"/api/jobs/{job['id']}/cancel", headers=AS["bob"]).status_code == 403
    assert client.get(f"/api/jobs/{job['id']}", headers={}).status_code == 401


@pytest.mark.parametrize("text", BAD + [7])
def test_job_with_malformed_visibility_is_422_naming_the_field(
        world: tuple[TestClient, str, bytes], text: Any) -> None:
    client, _, _ = world
    before = len(client.get("/api/jobs", headers=AS["alice"]).json()["jobs"])
    r = client.post("/api/jobs", json={"name": "bad", "spec": _dead_spec(), "visibility": text},
                    headers=AS["alice"])
    assert r.status_code == 422, r.text
    assert [p for p, _ in r.json()["problems"]] == ["visibility"]
    assert len(client.get("/api/jobs", headers=AS["alice"]).json()["jobs"]) == before


def test_job_shared_with_a_group_the_caller_is_not_in_is_refused(
        world: tuple[TestClient, str, bytes]) -> None:
    client, _, _ = world
    before = len(client.get("/api/jobs", headers=AS["alice"]).json()["jobs"])
    r = client.post("/api/jobs", json={"name": "x", "spec": _dead_spec(),
                                       "visibility": "group:atlas"}, headers=AS["alice"])
    assert r.status_code == 403, r.text
    assert r.json()["field"] == "visibility" and "atlas" in r.json()["message"]
    r = client.post("/api/jobs?name=y&visibility=group:atlas",
                    content=yaml.safe_dump(_dead_spec()),
                    headers={**AS["alice"], "Content-Type": "application/yaml"})
    assert r.status_code == 403, r.text
    assert len(client.get("/api/jobs", headers=AS["alice"]).json()["jobs"]) == before


# -- models --------------------------------------------------------------------------------

def test_a_jobs_new_model_gets_the_jobs_visibility(world: tuple[TestClient, str, bytes]) -> None:
    client, _, _ = world
    r = client.get(f"/api/models/{MODEL}/visibility", headers=AS["carl"])
    assert r.status_code == 200, r.text
    assert r.json() == {"name": MODEL, "owner": "alice", "group": "cms",
                        "visibility": "group:cms"}
    assert client.get(f"/api/models/{MODEL}/visibility", headers=AS["bob"]).status_code == 404


def test_group_model_predicts_for_members_and_stays_unwritable(
        world: tuple[TestClient, str, bytes]) -> None:
    client, _, _ = world
    r = client.post(f"/api/models/{MODEL}/predict", json=EVENTS, headers=AS["carl"])
    assert r.status_code == 200, r.text
    r = client.post(f"/api/models/{MODEL}/predict", json=EVENTS, headers=AS["bob"])
    assert r.status_code == 404 and "alice" not in r.text
    for method, path, kw in (
            ("DELETE", f"/api/models/{MODEL}/versions/1", {}),
            ("PUT", f"/api/models/{MODEL}/aliases/carls", {"json": {"version": 1}}),
            ("PUT", f"/api/models/{MODEL}/visibility", {"json": {"visibility": "public"}}),
            ("DELETE", f"/delete/{MODEL}", {})):
        r = client.request(method, path, headers=AS["carl"], **kw)
        assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text}"
        r = client.request(method, path, headers=AS["bob"], **kw)
        assert r.status_code == 404, f"{method} {path}: {r.status_code} {r.text}"
    assert client.get(f"/api/models/{MODEL}", headers=AS["carl"]).json()["versions"]


def test_public_model_is_readable_by_every_user_then_private_again(
        world: tuple[TestClient, str, bytes]) -> None:
    client, _, bundle = world
    _upload(client, "open-model", bundle)
    assert client.get("/api/models/open-model", headers=AS["bob"]).status_code == 404
    r = client.put("/api/models/open-model/visibility", json={"visibility": "public"},
                   headers=AS["alice"])
    assert r.status_code == 200, r.text
    assert r.json()["visibility"] == "public"
    assert client.get("/api/models/open-model", headers=AS["bob"]).status_code == 200
    assert "open-model" in [m["name"] for m in client.get("/models", headers=AS["bob"]).json()]
    r = client.post("/api/models/open-model/predict", json=EVENTS, headers=AS["bob"])
    assert r.status_code == 200, r.text
    r = client.delete("/api/models/open-model/versions/1", headers=AS["bob"])
    assert r.status_code == 403, r.text
    assert client.get("/api/models/open-model", headers={}).status_code == 401
    r = client.put("/api/models/open-model/visibility", json={"visibility": "private"},
                   headers=AS["alice"])
    assert r.status_code == 200 and r.json()["visibility"] == "private"
    assert client.get("/api/models/open-model", headers=AS["bob"]).status_code == 404


def test_group_share_needs_membership_except_for_admins(
        world: tuple[TestClient, str, bytes]) -> None:
    client, _, bundle = world
    _upload(client, "atlas-share", bundle)
    r = client.put("/api/models/atlas-share/visibility", json={"visibility": "group:atlas"},
                   headers=AS["alice"])
    assert r.status_code == 403, r.text
    assert r.json()["field"] == "visibility"
    assert client.get("/api/models/atlas-share", headers=AS["bob"]).status_code == 404
    r = client.put("/api/models/atlas-share/visibility", json={"visibility": "group:atlas"},
                   headers=AS["root"])
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "atlas-share", "owner": "alice", "group": "atlas",
                        "visibility": "group:atlas"}
    assert client.get("/api/models/atlas-share", headers=AS["bob"]).status_code == 200
    r = client.post("/api/models/atlas-share/predict", json=EVENTS, headers=AS["bob"])
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("text", BAD)
def test_model_with_malformed_visibility_is_422_naming_the_field(
        world: tuple[TestClient, str, bytes], text: str) -> None:
    client, _, _ = world
    r = client.put(f"/api/models/{MODEL}/visibility", json={"visibility": text},
                   headers=AS["alice"])
    assert r.status_code == 422, r.text
    assert [p for p, _ in r.json()["problems"]] == ["visibility"]
    got = client.get(f"/api/models/{MODEL}/visibility", headers=AS["alice"]).json()
    assert got["visibility"] == "group:cms"  # unchanged


@pytest.mark.parametrize("body", [{}, {"visibility": 3}, {"visibility": "public", "extra": 1}])
def test_model_visibility_body_must_be_one_string_field(
        world: tuple[TestClient, str, bytes], body: dict[str, Any]) -> None:
    client, _, _ = world
    r = client.put(f"/api/models/{MODEL}/visibility", json=body, headers=AS["alice"])
    assert r.status_code == 400, r.text
    assert any(p[0].startswith("body") for p in r.json()["problems"])


def test_visibility_of_a_missing_model_is_404(world: tuple[TestClient, str, bytes]) -> None:
    client, _, _ = world
    for who in ("alice", "root"):
        r = client.put("/api/models/nobody-has-this/visibility", json={"visibility": "public"},
                       headers=AS[who])
        assert r.status_code == 404, r.text
        assert client.get("/api/models/nobody-has-this/visibility",
                          headers=AS[who]).status_code == 404


# -- the CLI against a real server process ------------------------------------------------

@pytest.mark.network
def test_cli_share_and_submit_visibility(world: tuple[TestClient, str, bytes],
                                         tmp_path: Path) -> None:
    """``mlaas share`` and ``mlaas submit --visibility`` over real HTTP (a single-user
    ``mlaas server``: the local user is an admin, so any group may be named)."""
    import httpx
    from typer.testing import CliRunner

    from mlaas import cli
    from mlaas._local_server import LocalServer

    _, _, bundle = world
    spec_path = tmp_path / "dead.yaml"
    spec_path.write_text(yaml.safe_dump({**_dead_spec(), "name": "cli-dead"}))
    with LocalServer(tmp_path / "server", log=tmp_path / "server.log",
                     args=["--cpus", "1"]) as server:
        env = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb", "MLAAS_SERVER": server.url}
        r = httpx.post(f"{server.url}/api/models/cli-model", content=bundle, timeout=30)
        assert r.status_code == 201, r.text

        def mlaas(*args: str) -> Any:
            return CliRunner().invoke(cli.app, list(args), env=env)

        shared = mlaas("share", "cli-model", "group:/cms/higgs")
        assert shared.exit_code == 0, shared.output
        assert "model cli-model: group:/cms/higgs" in shared.stdout
        with server.client() as c:
            assert c.model_visibility("cli-model")["group"] == "/cms/higgs"
        bad = mlaas("share", "cli-model", "everyone")
        assert isinstance(bad.exception, SpecError)  # shown by mlaas.cli.main as a message
        assert [p for p, _ in bad.exception.problems] == ["visibility"]
        submitted = mlaas("submit", str(spec_path), "--visibility", "public")
        assert submitted.exit_code == 0, submitted.output + server.log_tail()
        job_id = submitted.stdout.splitlines()[0].strip()
        with server.client() as c:
            assert c.job(job_id)["visibility"] == "public"
