"""HTTP routes of the per-user workspace: upload, list, download and delete files.

Layer: platform (HTTP wiring only). Bytes go through
:class:`mlaas.platform.storage.Storage`, metadata through the store, and
every access through :func:`mlaas.platform.authz.authorize` (a personal
token's scope, ``read`` or ``submit``, is checked for every route in one place,
:mod:`mlaas.platform.auth.policy`). Files are
private to their owner; admins may read (and, as authz allows, delete) any
user's file by adding ``?owner=<user>``. Anyone else asking for another
user's file gets 404, exactly as for a file that does not exist.

=======  =========================  =============================================
method   path                       answer
=======  =========================  =============================================
PUT      /api/files/{path}          raw body; 201 ``FileOut`` (replaces a file)
GET      /api/files                 ``{"files": [FileOut, ...]}`` sorted by path
GET      /api/files/{path}          the bytes, ``application/octet-stream``
DELETE   /api/files/{path}          ``{"deleted": path}``
=======  =========================  =============================================

``FileOut = {"path", "size", "sha256", "updated_at"}``. GET and DELETE take
``?owner=`` (default: the caller). Uploads are streamed to disk, never held
in memory; the byte quota per user (``config.workspace_quota_bytes``,
default 1 GiB) answers 413 as soon as it is passed, or at once when the
declared ``Content-Length`` does not fit. Two uploads of one user racing
each other can together pass the quota by at most one file.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from mlaas.errors import NotFound, QuotaExceeded
from mlaas.platform.authz import authorize, can_read
from mlaas.platform.deps import Ctx, CurrentPrincipal
from mlaas.platform.records import FileRecord
from mlaas.platform.storage import check_relpath

__all__ = ["files_router", "FileOut", "FileList", "DEFAULT_QUOTA_BYTES"]

DEFAULT_QUOTA_BYTES = 1 << 30
"""Workspace quota when the config does not set ``workspace_quota_bytes``."""

_BUFFER = 1 << 20  # bytes gathered from the request before one write in a worker thread


class FileOut(BaseModel):
    """One workspace file as the API shows it."""

    path: str
    size: int
    sha256: str
    updated_at: datetime

    @classmethod
    def of(cls, record: FileRecord) -> FileOut:
        return cls(path=record.path, size=record.size, sha256=record.sha256,
                   updated_at=record.updated_at)


class FileList(BaseModel):
    files: list[FileOut]


class Deleted(BaseModel):
    deleted: str


def _quota(ctx: Any) -> int:
    return int(getattr(ctx.config, "workspace_quota_bytes", DEFAULT_QUOTA_BYTES))


def _existing(store: Any, owner: str, path: str) -> FileRecord | None:
    try:
        return store.get_file(owner, path)  # type: ignore[no-any-return]
    except NotFound:
        return None


def files_router() -> APIRouter:
    """The workspace routes under ``/api/files``; they need ``Ctx`` and ``CurrentPrincipal``."""
    router = APIRouter(prefix="/api/files", tags=["files"])

    @router.get("", response_model=FileList)
    def list_files(ctx: Ctx, principal: CurrentPrincipal, owner: str | None = None) -> FileList:
        """The caller's files (or ``owner``'s, as far as the caller may read them)."""
        records = ctx.store.list_files(owner or principal.user)
        return FileList(files=[FileOut.of(r) for r in records if can_read(principal, r)])

    @router.put("/{path:path}", status_code=201, response_model=FileOut)
    async def put_file(path: str, request: Request, ctx: Ctx,
                       principal: CurrentPrincipal) -> FileOut:
        """Upload the raw body as workspace file ``path`` of the caller (replacing it)."""
        check_relpath(path)
        owner = principal.user
        existing = await run_in_threadpool(_existing, ctx.store, owner, path)
        if existing is not None:
            authorize(principal, "write", existing, kind="file", name=path)
        quota = _quota(ctx)
        used = await run_in_threadpool(ctx.store.used_bytes, owner)
        used -= existing.size if existing is not None else 0
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > quota - used:
            raise QuotaExceeded(
                f"uploading {path!r} ({int(declared)} bytes) would exceed the workspace quota "
                f"of {quota} bytes ({max(quota - used, 0)} bytes left)",
                path=path, quota_bytes=quota)
        upload = await run_in_threadpool(partial(ctx.storage.open_upload, owner, path,
                                                 quota_bytes=quota, used_bytes=used))
        with upload:
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                if len(buffer) >= _BUFFER:
                    await run_in_threadpool(upload.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await run_in_threadpool(upload.write, bytes(buffer))
            size, sha256 = await run_in_threadpool(upload.commit)
        record = await run_in_threadpool(partial(
            ctx.store.put_file, owner=owner, group=principal.primary_group, path=path,
            size=size, sha256=sha256))
        return FileOut.of(record)

    @router.get("/{path:path}", response_class=FileResponse,
                responses={200: {"content": {"application/octet-stream": {}}}})
    def get_file(path: str, ctx: Ctx, principal: CurrentPrincipal,
                 owner: str | None = None) -> FileResponse:
        """The bytes of workspace file ``path``."""
        check_relpath(path)
        who = owner or principal.user
        record = ctx.store.get_file(who, path)
        authorize(principal, "read", record, kind="file", name=path)
        full = ctx.storage.resolve(who, path)
        if not full.is_file():
            raise NotFound(f"no file named {path!r}")
        return FileResponse(full, media_type="application/octet-stream",
                            filename=PurePosixPath(path).name)

    @router.delete("/{path:path}", response_model=Deleted)
    def delete_file(path: str, ctx: Ctx, principal: CurrentPrincipal,
                    owner: str | None = None) -> Deleted:
        """Remove workspace file ``path`` (bytes and metadata)."""
        check_relpath(path)
        who = owner or principal.user
        record = ctx.store.get_file(who, path)
        authorize(principal, "write", record, kind="file", name=path)
        try:
            ctx.storage.delete_file(who, path)
        except NotFound:
            pass  # bytes already gone; the metadata goes too
        ctx.store.delete_file(who, path)
        return Deleted(deleted=path)

    return router
