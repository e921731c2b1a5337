"""``mlaas server`` in multi-user mode as a real process: flags, proxy spoofing, no leaked secrets.

One server process (``python -m mlaas.cli server``) on 127.0.0.1 with every
auth flag: ``--oidc-issuer`` (the real test issuer on 127.0.0.1),
``--oidc-audience``, ``--admin-group``, ``--trust-proxy-from`` (an address
no test client has), ``--rate-limit``, and ``--db`` pointing at a fresh
PostgreSQL schema through a URL that carries a password (the test server
uses trust authentication, so any password connects). Requests are real
HTTP; ``mlaas token ...`` runs as a real CLI process. At the end the
server's whole log and every error body are searched for the password and
each token that was sent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from platform_support import wait_for
from servers import HOST, free_port
from sqlalchemy.engine import make_url
from support.oidc_issuer import OidcIssuer

pytestmark = [pytest.mark.slow, pytest.mark.network]

AUD = "mlaas-server"
PROXY = "10.1.2.3"
DB_PASSWORD = "pw-Db-9f3kQ2-never-logged"


class AuthServer:
    """``mlaas server`` with auth flags; output (stdout and stderr) in ``log``."""

    def __init__(self, tmp: Path, db_url: str, issuer: str) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = tmp / "server.log"
        self.argv = [sys.executable, "-m", "mlaas.cli", "server", "--data-dir", str(tmp / "data"),
                     "--host", HOST, "--port", str(self.port), "--cpus", "1", "--db", db_url,
                     "--oidc-issuer", issuer, "--oidc-audience", AUD, "--admin-group", "/admins",
                     "--trust-proxy-from", f"{PROXY}/32", "--rate-limit", "1000"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AuthServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            return False

        wait_for(up, timeout=90, what="the server to answer /healthz")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(audience=AUD) as iss:
        iss.add_user("alice", "pw", sub="alice", wlcg_groups=["/cms"], lifetime_s=3600)
        yield iss


def _cli(server: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLAAS_TOKEN", "MLAAS_SERVER")}
    env["MLAAS_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "mlaas.cli", "token", *args, "--server", server],
                          env=env, capture_output=True, text=True, timeout=120)


def test_multi_user_server_process(tmp_path: Path, pg_url: str, issuer: OidcIssuer) -> None:
    db_url = make_url(pg_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    login = issuer.password_token("alice", "pw")
    sent: list[str] = [DB_PASSWORD, login]  # every secret that must never show up
    bodies: list[str] = []
    with AuthServer(tmp_path, db_url, issuer.url) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        started = srv.log.read_text()
        assert "multi-user mode" in started and "single-user mode" not in started
        assert "inference" in started and "1000/min" in started  # the rate limit, said once

        # 1. Spoofed proxy headers: the peer is the socket's address (uvicorn runs with
        # proxy_headers=False), so naming the trusted proxy in X-Forwarded-For does nothing.
        spoof = {"X-Forwarded-User": "mallory", "X-Forwarded-Groups": "/admins"}
        for via in ({"X-Forwarded-For": PROXY}, {"Forwarded": f"for={PROXY}"},
                    {"X-Real-IP": PROXY}, {}):
            r = c.get("/api/jobs", headers={**spoof, **via})
            assert r.status_code == 401, (via, r.text)
            assert r.headers["www-authenticate"] == 'Bearer realm="mlaas"'
            bodies.append(r.text)

        # 2. A real login works; a personal token is made with the CLI and printed once
        as_alice = {"Authorization": f"Bearer {login}"}
        assert c.get("/api/jobs", headers=as_alice).status_code == 200
        made = _cli(srv.url, login, "create", "--name", "ci", "--scope", "read")
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        sent.append(secret)
        assert secret.startswith("mlaas_") and secret not in made.stderr
        as_token = {"Authorization": f"Bearer {secret}"}
        assert c.get("/api/jobs", headers=as_token).status_code == 200
        r = c.post("/api/jobs", json={"name": "x", "spec": {}}, headers=as_token)
        assert r.status_code == 403 and "'submit' scope" in r.json()["message"]
        bodies.append(r.text)
        listed = _cli(srv.url, login, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert secret not in listed.stdout and '"ci"' in listed.stdout
        token_id = c.get("/api/tokens", headers=as_alice).json()["tokens"][0]["id"]
        # a token cannot mint tokens (the CLI shows the server's error, not the token)
        refused = _cli(srv.url, secret, "create", "--name", "more", "--scope", "read")
        assert refused.returncode == 1 and "Forbidden" in refused.stderr
        assert secret not in refused.stderr + refused.stdout
        revoked = _cli(srv.url, login, "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        again = _cli(srv.url, login, "revoke", token_id)  # bad input: the server's errors
        assert again.returncode == 1 and again.stderr.startswith("NotFound: no API token")
        wrong = _cli(srv.url, login, "create", "--name", "x", "--scope", "admin")
        assert wrong.returncode == 1 and wrong.stderr.startswith("SpecError: token scopes")
        r = c.get("/api/jobs", headers=as_token)
        assert r.status_code == 401 and "revoked" in r.json()["message"]
        bodies.append(r.text)

        # 3. Bad credentials of every shape: refused, and never echoed
        forged = login[: login.rindex(".") + 1] + "AAAA" + login[login.rindex(".") + 5:]
        bad = {"Bearer not-a-jwt-Sx9q2Lm": "not-a-jwt-Sx9q2Lm",
               f"Bearer {forged}": forged,
               "Bearer mlaas_" + "Q" * 43: "mlaas_" + "Q" * 43,
               "Bearer mlaas_short-Zk3": "mlaas_short-Zk3",
               "bare-secret-Pq7Wz": "bare-secret-Pq7Wz",
               "Basic YWxpY2U6aHVudGVyMg==": "YWxpY2U6aHVudGVyMg=="}
        for header, value in bad.items():
            sent.append(value)
            for method, path, body in (("GET", "/api/jobs", None),
                                       ("POST", "/v2/models/m/infer", {"inputs": []}),
                                       ("POST", "/json", {"model": "m", "keys": ["a"],
                                                          "values": [1.0]})):
                r = c.request(method, path, headers={"Authorization": header}, json=body)
                assert r.status_code == 401, (header, path, r.text)
                bodies.append(r.text + str(r.headers))
    log = srv.log.read_text()
    assert "GET /api/jobs" in log  # the access log is there, and was searched
    for value in sent:
        assert value not in log, f"a secret ({value[:8]}...) is in the server log"
        for body in bodies:
            assert value not in body, f"a secret ({value[:8]}...) is in an error answer"


def test_a_failed_start_does_not_print_the_database_password(tmp_path: Path) -> None:
    """The database URL appears in start-up errors with its password as ``***``."""
    port = free_port()  # nothing listens there: the connection is refused at once
    url = f"postgresql://postgres:{DB_PASSWORD}@{HOST}:{port}/mlaas"
    done = subprocess.run([sys.executable, "-m", "mlaas.cli", "server", "--data-dir",
                           str(tmp_path), "--host", HOST, "--port", str(free_port()),
                           "--db", url], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"postgres:***@{HOST}:{port}" in output and "Connection refused" in output
    assert DB_PASSWORD not in output


def test_token_create_needs_a_name_and_a_scope() -> None:
    from typer.testing import CliRunner

    from mlaas.cli import app as cli

    runner = CliRunner()
    for args, missing in ((["--name", "ci"], "--scope"), (["--scope", "read"], "--name")):
        result = runner.invoke(cli, ["token", "create", *args, "--server", "http://127.0.0.1:9"])
        assert result.exit_code == 2 and missing in result.output, result.output
