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

How it is wired (``auth.pass_token_to_jobs``): ``POST /api/jobs`` writes the
token with :func:`job_token_env` before the job can be admitted; the job
manager adds :func:`existing_token_env` to each start's environment; and
:class:`RemovesJobTokens`, the store the manager sees, deletes the file when
the job's state becomes final.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlaas.errors import NotFound, PathError, Unauthorized

__all__ = ["job_token_env", "remove_job_token", "existing_token_env", "RemovesJobTokens",
           "remove_tokens_of_final_jobs",
           "TOKEN_DIR", "TOKEN_FILE", "TOKEN_ENV"]

TOKEN_DIR = ".secrets"
TOKEN_FILE = "bearer_token"
TOKEN_ENV = "BEARER_TOKEN_FILE"
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
    return {TOKEN_ENV: str((secrets_dir / TOKEN_FILE).resolve())}


def remove_job_token(job_dir: Path) -> None:
    """Delete the job's token file (call when the job reaches a final state)."""
    (Path(job_dir) / TOKEN_DIR / TOKEN_FILE).unlink(missing_ok=True)


def existing_token_env(job_dir: Path) -> dict[str, str]:
    """``{"BEARER_TOKEN_FILE": path}`` if the job has a token file (a regular file, not a
    symlink), else ``{}``: what a start of the job adds to its environment."""
    path = Path(job_dir) / TOKEN_DIR / TOKEN_FILE
    if path.is_file() and not path.is_symlink() and not path.parent.is_symlink():
        return {TOKEN_ENV: str(path.resolve())}
    return {}


class RemovesJobTokens:
    """The job store as the job manager sees it: a transition to a final state also
    deletes the job's token file.

    Args:
        store: the platform store (every other method is passed through).
        job_dir (callable): job id -> the job's directory.

    Every state change of a job is a ``store.transition``, so this is the one
    place that sees a job become final, whichever path got it there (success,
    failure, cancel, a rejected start, recovery after a restart).
    """

    def __init__(self, store: Any, job_dir: Callable[[str], Path]) -> None:
        self._store = store
        self._job_dir = job_dir

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def transition(self, job_id: str, *args: Any, **kwargs: Any) -> Any:
        record = self._store.transition(job_id, *args, **kwargs)
        if record is not None and getattr(record, "final", False):
            remove_job_token(self._job_dir(job_id))
        return record


def remove_tokens_of_final_jobs(store: Any, jobs_root: Path) -> int:
    """Delete token files left behind by jobs that are final or unknown (at start-up).

    A server killed between a job's final transition and the file's removal
    would otherwise leave the token on disk; returns how many were removed.
    """
    removed = 0
    root = Path(jobs_root)
    if not root.is_dir():
        return 0
    for path in sorted(root.glob(f"*/{TOKEN_DIR}/{TOKEN_FILE}")):
        try:
            final = bool(store.get_job(path.parent.parent.name).final)
        except (NotFound, PathError):
            final = True
        if final:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
