"""Platform storage: per-user workspaces, job directories and the model registry's root.

Layer: platform (files). The server's data directory holds::

    <root>/workspaces/<user key>/...   files users upload (PUT /api/files/...)
    <root>/cache/<user key>/...        a user's data.cache.disk directories
    <root>/jobs/<job id>/job.log       what the job process printed
    <root>/jobs/<job id>/run/          the job's run directory (its artifacts)
    <root>/models/                     the model registry

Every user-supplied path goes through :meth:`Storage.resolve` (or
:func:`check_relpath`) and cannot leave its root: absolute paths, ``..``,
``.``, empty parts, backslashes, NUL and control characters, over-long names
and symlinks that point outside are all :class:`~mlaas.errors.PathError`.
User names become directory names through :meth:`Storage.user_key` (a hash
plus a sanitised form), so an OIDC ``sub`` with any characters is safe.

Uploads are streamed to a temporary file next to their target and renamed
into place when complete, so a reader never sees half a file and a refused
upload (quota, bad path, a dropped connection) leaves nothing behind.
Nothing here knows about users' rights: routes call
:func:`mlaas.platform.authz.authorize` first.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from mlaas.errors import NotFound, PathError, QuotaExceeded

__all__ = ["Storage", "Upload", "check_relpath", "resolve_spec_paths", "MAX_PART_BYTES",
           "MAX_PATH_CHARS", "REMOTE_SCHEMES"]

MAX_PART_BYTES = 255
"""Longest file or directory name (UTF-8 bytes), as most file systems allow."""

MAX_PATH_CHARS = 1024
"""Longest workspace path; the files table's ``path`` column has this width."""

REMOTE_SCHEMES = ("root://", "https://", "http://")
"""URLs that pass through a spec unchanged (the data layer reads them itself)."""

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 1 << 20


def check_relpath(relpath: str, *, field_path: str | None = None) -> tuple[str, ...]:
    """Check a workspace path and return its parts.

    Args:
        relpath (str): ``/``-separated, relative (``data/sig.root``).
        field_path (str or None): the spec field the path came from, for the message.

    Raises :class:`PathError` naming the path and what is wrong with it.
    """

    def bad(why: str) -> PathError:
        return PathError(f"path {relpath!r} {why}", path=relpath, field_path=field_path)

    if not isinstance(relpath, str):
        raise PathError(f"path {relpath!r} is not a string", field_path=field_path)
    if relpath == "":
        raise bad("is empty")
    if "\x00" in relpath:
        raise bad("contains a NUL character")
    if "\\" in relpath:
        raise bad("contains a backslash; separate directories with '/'")
    if _CONTROL_RE.search(relpath):
        raise bad("contains a control character")
    if relpath.startswith("/"):
        raise bad("is absolute; give a path relative to your workspace")
    if relpath.startswith("~"):
        raise bad("starts with '~'; give a path relative to your workspace")
    if len(relpath) > MAX_PATH_CHARS:
        raise bad(f"is longer than {MAX_PATH_CHARS} characters")
    parts = tuple(relpath.split("/"))
    for part in parts:
        if part == "":
            raise bad("has an empty part ('//' or a trailing '/')")
        if part in (".", ".."):
            raise bad(f"contains {part!r}; paths cannot leave or re-enter their directory")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
            raise bad(f"has a part longer than {MAX_PART_BYTES} bytes")
    return parts


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


class Upload:
    """One file being written: chunks go to a temporary file, :meth:`commit` renames it.

    Made by :meth:`Storage.open_upload`; use it as a context manager so an
    exception (or a refused quota) removes the temporary file. Async routes
    call :meth:`write` from a worker thread (``run_in_threadpool``).
    """

    def __init__(self, target: Path, relpath: str, *, room: int, quota_bytes: int) -> None:
        self.target = target
        self.relpath = relpath
        self.room = room
        self.quota_bytes = quota_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=target.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._done = False

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; :class:`QuotaExceeded` (and nothing kept) once past the room left."""
        if self._done:
            raise RuntimeError(f"upload of {self.relpath!r} is already finished")
        self.size += len(chunk)
        if self.size > self.room:
            self.abort()
            raise QuotaExceeded(
                f"uploading {self.relpath!r} would exceed the workspace quota of "
                f"{self.quota_bytes} bytes ({max(self.room, 0)} bytes left)",
                path=self.relpath, quota_bytes=self.quota_bytes)
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self) -> tuple[int, str]:
        """Move the complete file into place; returns ``(size, sha256 hex)``."""
        if self._done:
            raise RuntimeError(f"upload of {self.relpath!r} is already finished")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.target)
        except IsADirectoryError as exc:
            self.abort()
            raise PathError(f"path {self.relpath!r} is a directory in your workspace",
                            path=self.relpath) from exc
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        self._done = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._done:
            self.abort()


class Storage:
    """The server's file area (see the module docstring for the layout).

    Args:
        root (Path): the data directory's storage root; created if missing.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    @property
    def models_dir(self) -> Path:
        """Where the model registry keeps its bundles (created)."""
        path = self.root / "models"
        path.mkdir(exist_ok=True)
        return path

    @staticmethod
    def user_key(user: str) -> str:
        """The directory name of ``user``: 16 hex digits of its SHA-256, then a safe form.

        The hash keeps different users apart even when their sanitised forms
        agree (``a/b`` and ``a_b``); the readable tail helps an admin.
        """
        if not isinstance(user, str) or not user:
            raise PathError(f"user name {user!r} is empty; cannot make a workspace for it")
        digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        safe = _UNSAFE_RE.sub("_", user).lstrip(".")[:48]
        return f"{digest}-{safe}" if safe else digest

    def workspace(self, user: str) -> Path:
        """``user``'s workspace directory (created)."""
        path = self.root / "workspaces" / self.user_key(user)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cache_dir(self, user: str) -> Path:
        """Where ``user``'s ``data.cache.disk`` directories live (created); kept across jobs."""
        path = self.root / "cache" / self.user_key(user)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolve(self, user: str, relpath: str, *, field_path: str | None = None) -> Path:
        """The absolute path of workspace path ``relpath`` of ``user``.

        Raises :class:`PathError` for malformed paths (:func:`check_relpath`)
        and for paths that leave the workspace through a symlink. The path
        need not exist.
        """
        return _within(self.workspace(user), relpath, field_path=field_path)

    def job_dir(self, job_id: str) -> Path:
        """The job's own directory (created): its log and run directory live here."""
        if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
            raise PathError(f"job id {job_id!r} is not a valid id", job_id=job_id)
        path = self.root / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_dir(self, job_id: str) -> Path:
        """The job's run directory, ``job_dir/run`` (created): everything in it is an artifact."""
        path = self.job_dir(job_id) / "run"
        path.mkdir(exist_ok=True)
        return path

    def log_path(self, job_id: str) -> Path:
        """The job's log file, ``job_dir/job.log`` (the directory is created, not the file)."""
        return self.job_dir(job_id) / "job.log"

    # -- workspace files ------------------------------------------------------

    def open_upload(self, user: str, relpath: str, *, quota_bytes: int,
                    used_bytes: int) -> Upload:
        """Start writing workspace file ``relpath``; see :meth:`write_file`."""
        target = self.resolve(user, relpath)
        room = quota_bytes - used_bytes
        if target.is_dir():
            raise PathError(f"path {relpath!r} is a directory in your workspace", path=relpath)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise PathError(f"path {relpath!r} goes through a file as if it were a directory",
                            path=relpath) from exc
        return Upload(target, relpath, room=room, quota_bytes=quota_bytes)

    def write_file(self, user: str, relpath: str, chunks: Iterable[bytes] | bytes, *,
                   quota_bytes: int, used_bytes: int) -> tuple[int, str]:
        """Write (or replace) a workspace file from bytes or a stream of chunks.

        Args:
            quota_bytes (int): the user's workspace quota.
            used_bytes (int): bytes the user's other files take (the store's
                ``used_bytes`` minus the size of the file being replaced).

        Returns ``(size, sha256 hex)``. :class:`QuotaExceeded` as soon as the
        bytes pass ``quota_bytes - used_bytes``; then nothing is left behind
        and an existing file of that name is unchanged.
        """
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            data = bytes(chunks)
            chunks = (data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK))
        with self.open_upload(user, relpath, quota_bytes=quota_bytes,
                              used_bytes=used_bytes) as upload:
            for chunk in chunks:
                upload.write(chunk)
            return upload.commit()

    def delete_file(self, user: str, relpath: str) -> None:
        """Remove a workspace file and the directories it leaves empty."""
        workspace = self.workspace(user)
        target = _within(workspace, relpath)
        try:
            target.unlink()
        except FileNotFoundError as exc:
            raise NotFound(f"no file named {relpath!r}") from exc
        except IsADirectoryError as exc:
            raise PathError(f"path {relpath!r} is a directory in your workspace",
                            path=relpath) from exc
        parent = target.parent
        while parent != workspace and _inside(parent, workspace):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _within(root: Path, relpath: str, *, field_path: str | None = None) -> Path:
    parts = check_relpath(relpath, field_path=field_path)
    path = root.joinpath(*parts)
    real_root = root.resolve()
    if not _inside(path.resolve(), real_root):
        raise PathError(f"path {relpath!r} leaves its directory through a symbolic link",
                        path=relpath, field_path=field_path)
    return path


def resolve_spec_paths(spec: dict[str, Any], storage: Storage, user: str) -> dict[str, Any]:
    """A copy of a pipeline spec with its local paths made absolute in ``user``'s workspace.

    Args:
        spec (dict): the pipeline as a mapping (as submitted, or
            ``Pipeline.model_dump()``); it is not changed.
        storage (Storage): platform storage.
        user (str): whose workspace the paths are relative to.

    - ``data.sources[i].files[j]`` (names and globs) and ``model.file`` are
      workspace paths; ``root://``, ``https://`` and ``http://`` URLs pass
      through, and so do logical names ``/store/...`` when ``data.redirector``
      is set. Other absolute paths, ``..``, ``~`` and other URL schemes are
      refused with :class:`PathError` naming the field
      (``data.sources[0].files[1]``).
    - ``data.cache.disk`` (or ``data.cache.path`` with ``kind: disk``) is a
      name under the user's cache directory (:meth:`Storage.cache_dir`), not
      the workspace: a disk cache is keyed by the data, so jobs of the same
      user that read the same data share it, and it does not count against
      the workspace quota. Absolute paths and ``..`` are refused there too.

    Whether the files exist is not checked here; the job reports a missing file.
    """
    out = copy.deepcopy(spec)
    data = out.get("data")
    if isinstance(data, dict):
        logical = bool(data.get("redirector"))
        sources = data.get("sources")
        if isinstance(sources, list):
            for i, source in enumerate(sources):
                files = source.get("files") if isinstance(source, dict) else None
                if not isinstance(files, list):
                    continue
                for j, name in enumerate(files):
                    field = f"data.sources[{i}].files[{j}]"
                    files[j] = _spec_path(name, storage, user, field, logical=logical)
        cache = data.get("cache")
        if isinstance(cache, dict):
            key = "disk" if "disk" in cache else ("path" if cache.get("kind") == "disk" else None)
            if key is not None and isinstance(cache.get(key), str):
                cache[key] = str(_within(storage.cache_dir(user), cache[key],
                                         field_path=f"data.cache.{key}"))
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("file"), str):
        model["file"] = _spec_path(model["file"], storage, user, "model.file", logical=False)
    return out


def _spec_path(name: Any, storage: Storage, user: str, field: str, *, logical: bool) -> Any:
    if not isinstance(name, str):
        return name  # spec.load reports the type
    if name.startswith(REMOTE_SCHEMES):
        return name
    if logical and name.startswith("/store/"):
        return name
    if "://" in name:
        raise PathError(f"{name!r} uses a URL scheme the server does not read; use root://, "
                        "https:// or a path in your workspace", path=name, field_path=field)
    return str(storage.resolve(user, name, field_path=field))
