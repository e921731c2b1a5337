"""job_token_env: the user's bearer token handed to a job through BEARER_TOKEN_FILE."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlaas.errors import PathError, Unauthorized
from mlaas.platform.auth.jobtoken import job_token_env, remove_job_token

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"


def test_writes_a_0600_file_and_points_at_it(tmp_path: Path) -> None:
    env = job_token_env(TOKEN, tmp_path)
    assert set(env) == {"BEARER_TOKEN_FILE"}
    path = Path(env["BEARER_TOKEN_FILE"])
    assert path.parent == (tmp_path / ".secrets").resolve()
    assert path.read_text() == TOKEN + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "BEARER_TOKEN" not in env  # never the token itself in the environment
    assert [p.name for p in path.parent.iterdir()] == ["bearer_token"]  # no temp files left


def test_a_child_process_reads_it_the_wlcg_way(tmp_path: Path) -> None:
    """What an XRootD client does: read the file named by BEARER_TOKEN_FILE, strip it."""
    env = {**os.environ, **job_token_env(TOKEN, tmp_path)}
    env.pop("BEARER_TOKEN", None)
    out = subprocess.run([sys.executable, "-c",
                          "import os; print(open(os.environ['BEARER_TOKEN_FILE']).read().strip())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == TOKEN


def test_a_resumed_job_gets_the_fresh_token(tmp_path: Path) -> None:
    job_token_env(TOKEN, tmp_path)
    env = job_token_env("fresh.token.value", tmp_path)
    assert Path(env["BEARER_TOKEN_FILE"]).read_text() == "fresh.token.value\n"
    remove_job_token(tmp_path)
    assert not Path(env["BEARER_TOKEN_FILE"]).exists()
    remove_job_token(tmp_path)  # twice is fine


def test_no_token_no_environment(tmp_path: Path) -> None:
    assert job_token_env(None, tmp_path) == {}
    assert not (tmp_path / ".secrets").exists()


@pytest.mark.parametrize("token", ["", "tok en", "abc\nBEARER=x", "tok\x00en", "é"])
def test_tokens_that_are_not_bearer_tokens(tmp_path: Path, token: str) -> None:
    with pytest.raises(Unauthorized, match="RFC 6750") as info:
        job_token_env(token, tmp_path)
    assert not token or token not in str(info.value)


def test_job_dir_must_exist_and_not_be_a_symlink(tmp_path: Path) -> None:
    with pytest.raises(PathError, match="does not exist"):
        job_token_env(TOKEN, tmp_path / "missing")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PathError, match="symlink"):
        job_token_env(TOKEN, tmp_path / "link")


def test_secrets_dir_replaced_by_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = tmp_path / "job"
    job.mkdir()
    (job / ".secrets").symlink_to(elsewhere)
    with pytest.raises(PathError, match="not a directory"):
        job_token_env(TOKEN, job)
    assert list(elsewhere.iterdir()) == []
