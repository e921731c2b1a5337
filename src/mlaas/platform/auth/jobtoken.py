"""Identity reaches the data: hand the user's token to XRootD inside a job.

Layer: platform (authentication, job side). When the server is configured
to, a job that reads ``root://`` sources gets the submitting user's bearer
token through WLCG bearer token discovery: XRootD's token client (``ztn``)
and other WLCG tools look at ``BEARER_TOKEN``, then the file named by
``BEARER_TOKEN_FILE``, then ``$XDG_RUNTIME_DIR/bt_u<uid>`` and
``/tmp/bt_u<uid>``. We use ``BEARER_TOKEN_FILE``: the token sits in a
0600 file inside the job directory instead of in the environment, where
``/proc/<pid>/environ`` and child processes would carry it. Trade-offs are
in ``docs/auth.md``.

The file lives in ``<job_dir>/.secrets/``, a 0700 directory; whatever
serves job artifacts must serve the run directory, not ``job_dir`` itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlaas.errors import PathError, Unauthorized

__all__ = ["job_token_env", "remove_job_token", "TOKEN_DIR", "TOKEN_FILE"]

TOKEN_DIR = ".secrets"
TOKEN_FILE = "bearer_token"
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


def job_token_env(token: str | None, job_dir: Path) -> dict[str, str]:
    """Write ``token`` for a job and return the environment that points at it.

    Args:
        token (str or None): the user's bearer token; None gives ``{}`` (no
            token handed on, XRootD uses whatever else the node has).
        job_dir (Path): the job's directory; it must exist and not be a symlink.

    Returns ``{"BEARER_TOKEN_FILE": "<job_dir>/.secrets/bearer_token"}``.
    The file is written atomically with mode 0600 (a resumed job gets the
    fresh token of its new start), and the token is checked to be a
    single-line RFC 6750 token so it cannot smuggle extra lines into the file.
    """
    if token is None:
        return {}
    if not token or not set(token) <= _TOKEN_CHARS:
        raise Unauthorized("bearer token for the job is empty or has characters a "
                           "bearer token cannot have (RFC 6750 b64token)")
    job_dir = Path(job_dir)
    if job_dir.is_symlink() or not job_dir.is_dir():
        raise PathError(f"job directory {str(job_dir)!r} does not exist or is a symlink",
                        file_path=str(job_dir))
    secrets_dir = job_dir / TOKEN_DIR
    try:
        secrets_dir.mkdir(mode=0o700)
    except FileExistsError:
        if secrets_dir.is_symlink() or not secrets_dir.is_dir():
            raise PathError(f"{str(secrets_dir)!r} exists and is not a directory",
                            file_path=str(secrets_dir)) from None
    os.chmod(secrets_dir, 0o700)
    fd, tmp = tempfile.mkstemp(dir=secrets_dir, prefix=".tmp-")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, secrets_dir / TOKEN_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"BEARER_TOKEN_FILE": str((secrets_dir / TOKEN_FILE).resolve())}


def remove_job_token(job_dir: Path) -> None:
    """Delete the job's token file (call when the job reaches a final state)."""
    (Path(job_dir) / TOKEN_DIR / TOKEN_FILE).unlink(missing_ok=True)
