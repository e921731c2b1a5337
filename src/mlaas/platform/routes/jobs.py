"""The jobs API: submit pipelines, watch them, read their logs, metrics and artifacts.

Layer: platform (HTTP wiring). Validation is :func:`mlaas.spec.load`, the
queue and the processes are :class:`mlaas.platform.manager.JobManager`,
durable state is the store; this module only translates HTTP. Every route
that touches a job reads it from the store and passes it through
:func:`mlaas.platform.authz.authorize` first, so a job the caller may not
read answers 404 exactly like a job that does not exist.

Routes (see ``docs/platform-api.md``)::

    POST /api/jobs                          JSON {"name", "spec", "visibility"}, or YAML
                                            with ?name=&visibility=
    GET  /api/jobs                          ?state=&name=&mine=&limit=
    GET  /api/jobs/{id}
    GET  /api/jobs/{id}/logs                ?offset=N&follow=true
    GET  /api/jobs/{id}/metrics
    POST /api/jobs/{id}/cancel
    GET  /api/jobs/{id}/artifacts
    GET  /api/jobs/{id}/artifacts/{path}
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from mlaas import spec as spec_module
from mlaas.errors import Conflict, NotFound, PathError, SpecError
from mlaas.platform.auth.jobtoken import job_token_env
from mlaas.platform.authz import authorize, can_read
from mlaas.platform.deps import Ctx, CurrentPrincipal, PlatformContext
from mlaas.platform.principal import Principal
from mlaas.platform.records import JobRecord, JobState
from mlaas.platform.storage import check_relpath, resolve_spec_paths
from mlaas.platform.visibility import format_visibility, parse_visibility
from mlaas.serve.registry import NAME_PATTERN

__all__ = ["jobs_router", "JobOut", "JobList", "job_out", "YAML_TYPES", "FOLLOW_POLL_S"]

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
FOLLOW_POLL_S = 0.25
"""How often a followed log is polled for new bytes and the job for a final state."""
FOLLOW_CHUNK = 1 << 20
"""Largest piece of a followed log sent at once."""

MAX_JOB_NAME = 128
_NAME = re.compile(NAME_PATTERN)
_HIDDEN_ARTIFACTS = ("checkpoint.pt",)


# -- schemas ------------------------------------------------------------------------------


class ProgressOut(BaseModel):
    phase: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    events_per_s: float | None = None
    metrics: dict[str, Any] = {}


class JobOut(BaseModel):
    id: str
    name: str
    owner: str
    group: str
    state: JobState
    model_name: str
    model_version: int | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int
    exit_code: int | None
    reason: str | None
    position: int | None
    progress: ProgressOut
    resources: dict[str, Any]
    priority: int
    queue: str | None
    visibility: str = "private"


class JobList(BaseModel):
    jobs: list[JobOut]


class HistoryOut(BaseModel):
    history: list[dict[str, Any]]


class ArtifactOut(BaseModel):
    path: str
    size: int


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]


class SubmitIn(BaseModel):
    """The JSON body of ``POST /api/jobs`` (documentation; the route parses it itself,
    since a YAML body is accepted too)."""

    name: str
    spec: dict[str, Any]
    visibility: str = "private"
    """``private`` (default), ``public`` or ``group:<name>`` (a group the caller is in)."""


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _typed(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` when it is one (ints for floats that are whole), else None:
    progress comes from the job process and must not break the answer."""
    if isinstance(value, bool):
        return None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int):
        return float(value)
    return value if isinstance(value, kind) else None


def job_out(job: JobRecord, position: int | None = None) -> dict[str, Any]:
    """The public JSON form of a job (``JobOut`` in docs/platform-api.md)."""
    progress = job.progress if isinstance(job.progress, dict) else {}
    metrics = progress.get("metrics")
    return {
        "id": job.id, "name": job.name, "owner": job.owner, "group": job.group,
        "state": job.state.value, "model_name": job.model_name,
        "model_version": job.model_version, "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "attempts": job.attempts, "exit_code": job.exit_code, "reason": job.reason,
        "position": position,
        "progress": {"phase": _typed(progress.get("phase"), str),
                     "epoch": _typed(progress.get("epoch"), int),
                     "epochs": _typed(progress.get("epochs"), int),
                     "events_per_s": _typed(progress.get("events_per_s"), float),
                     "metrics": metrics if isinstance(metrics, dict) else {}},
        "resources": dict(job.resources), "priority": job.priority, "queue": job.queue,
        "visibility": format_visibility(job.visibility, job.group),
    }


# -- helpers ------------------------------------------------------------------------------


def _readable_job(ctx: PlatformContext, principal: Principal, job_id: str,
                  action: str = "read") -> JobRecord:
    """The job, if the caller may ``action`` it (404 when missing or hidden)."""
    job: JobRecord = ctx.store.get_job(job_id)
    authorize(principal, action, job, kind="job", name=job_id)  # type: ignore[arg-type]
    return job


def _with_position(ctx: PlatformContext, job: JobRecord) -> dict[str, Any]:
    position = ctx.store.queue_position(job.id) if job.state == JobState.QUEUED else None
    return job_out(job, position)


def _parse_submission(body: bytes, content_type: str, query_name: str | None,
                      query_visibility: str | None = None
                      ) -> tuple[str, dict[str, Any], Any]:
    """``(name, raw spec, visibility)`` from a JSON ``{"name", "spec", "visibility"}`` or a
    YAML pipeline body (``visibility``: the body's, else ``?visibility=``, else None)."""
    visibility: Any = query_visibility
    media = content_type.split(";")[0].strip().lower()
    spec: Any
    if media in YAML_TYPES:
        try:
            raw = yaml.safe_load(body.decode("utf-8")) if body else None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SpecError(f"the request body is not valid YAML: {exc}",
                            [("(body)", "not valid YAML")]) from None
        if not isinstance(raw, dict):
            raise SpecError("the YAML body must be a pipeline mapping",
                            [("(body)", f"expected a mapping, got {type(raw).__name__}")])
        name = query_name or raw.get("name")
        spec = raw
    else:
        try:
            data = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise SpecError(f"the request body is not valid JSON: {exc}; send "
                            '{"name": ..., "spec": {...}} or a YAML pipeline with '
                            "Content-Type: application/yaml",
                            [("(body)", "not valid JSON")]) from None
        if not isinstance(data, dict):
            raise SpecError('the request body must be {"name": ..., "spec": {...}}',
                            [("(body)", f"expected an object, got {type(data).__name__}")])
        unknown = sorted(set(data) - {"name", "spec", "visibility"})
        if unknown:
            raise SpecError("unknown fields in the request body",
                            [(k, "unknown field; give only 'name', 'spec' and 'visibility'")
                             for k in unknown])
        if "visibility" in data:
            visibility = data["visibility"]
        spec = data.get("spec")
        if not isinstance(spec, dict):
            raise SpecError("the request body has no pipeline spec",
                            [("spec", "a pipeline mapping is required")])
        name = data.get("name") or query_name or spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SpecError("the job has no name", [("name", "give a job name (or spec.name)")])
    if len(name) > MAX_JOB_NAME or not name.isprintable():
        raise SpecError(f"job name {name[:40]!r} is not valid",
                        [("name", f"use at most {MAX_JOB_NAME} printable characters")])
    return name, spec, visibility


def _model_name(name: str, pipeline: spec_module.Pipeline) -> str:
    """The registry name of the job's model: ``spec.name``, else the job name (checked now,
    not when the job has finished)."""
    model_name = pipeline.name or name
    if not _NAME.fullmatch(model_name):
        where = "spec.name" if pipeline.name else "name"
        raise SpecError(f"{model_name!r} cannot name a model",
                        [(where, "a model name uses 1 to 64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")])
    return model_name


def _submit(ctx: PlatformContext, principal: Principal, name: str,
            raw: dict[str, Any], access_token: str | None = None,
            visibility_text: Any = None) -> dict[str, Any]:
    # 422 naming 'visibility' / 403 for a group the caller is not in, before anything else
    visibility, group = (("private", None) if visibility_text is None
                         else parse_visibility(visibility_text, principal))
    pipeline = spec_module.load(raw)  # SpecError (422) with every field path
    model_name = _model_name(name, pipeline)
    resolved = resolve_spec_paths(raw, ctx.storage, principal.user)  # PathError (400)
    prepare = None
    if access_token is not None:  # written before the job can be admitted
        def prepare(job_dir: Path) -> None:
            job_token_env(access_token, job_dir)
    res = pipeline.resources
    resources = {} if res is None else {k: v for k, v in {
        "cpus": res.cpus, "memory": res.memory, "gpus": res.gpus,
        "max_time_s": res.max_time}.items() if v is not None}
    job = ctx.manager.submit(principal=principal, name=name, spec=resolved,
                             model_name=model_name, prepare=prepare, resources=resources,
                             queue=res.queue if res is not None else None,
                             priority=res.priority if res is not None else None,
                             visibility=visibility, group=group)
    return _with_position(ctx, job)


def _job_token(ctx: PlatformContext, request: Request) -> str | None:
    """The caller's OIDC access token, when the server hands it to jobs
    (``auth.pass_token_to_jobs``); personal tokens and proxy users have none."""
    auth = getattr(ctx.config, "auth", None)
    if not getattr(auth, "pass_token_to_jobs", False):
        return None
    token = getattr(request.state, "access_token", None)
    return token if isinstance(token, str) and token else None


def _list(ctx: PlatformContext, principal: Principal, state: JobState | None,
          name: str | None, mine: bool, limit: int) -> list[dict[str, Any]]:
    owner = principal.user if mine else None
    if owner is not None or principal.is_admin:
        jobs = ctx.store.list_jobs(owner=owner, state=state, name=name, limit=limit)
    else:
        jobs = [j for j in ctx.store.list_jobs(state=state, name=name)
                if can_read(principal, j)][:limit]
    return [_with_position(ctx, j) for j in jobs]


def _read_log(path: Path, offset: int, limit: int = -1) -> bytes:
    """Bytes of the log from ``offset`` (at most ``limit``; -1: all); none before it exists."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def _history(ctx: PlatformContext, job: JobRecord) -> list[dict[str, Any]]:
    path = Path(ctx.storage.run_dir(job.id)) / "history.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, list):
        return [e for e in data if isinstance(e, dict)]
    history = job.progress.get("history") if isinstance(job.progress, dict) else None
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def _listed(rel: str) -> bool:
    parts = rel.split("/")
    return not any(p.startswith(".") for p in parts) and rel not in _HIDDEN_ARTIFACTS


def _artifacts(root: Path) -> list[dict[str, Any]]:
    """Regular files under the run directory (symlinks neither followed nor listed)."""
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())
        for fname in sorted(filenames):
            path = base / fname
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = path.relative_to(root).as_posix()
            if _listed(rel):
                out.append({"path": rel, "size": st.st_size})
    return sorted(out, key=lambda a: a["path"])


def _artifact_path(root: Path, rel: str, job_id: str) -> Path:
    """``root/rel`` if it is a listed regular file inside ``root`` reached without symlinks."""
    parts = check_relpath(rel)  # PathError: absolute, '..', empty parts, NUL, ...
    if not _listed(rel):
        raise NotFound(f"no artifact {rel!r}", job_id=job_id)
    path = root
    for part in parts:
        path = path / part
        try:
            st = path.lstat()
        except OSError:
            raise NotFound(f"no artifact {rel!r}", job_id=job_id) from None
        if stat.S_ISLNK(st.st_mode):
            raise PathError(f"artifact path {rel!r} goes through a symbolic link",
                            job_id=job_id)
    if not stat.S_ISREG(path.lstat().st_mode):
        raise NotFound(f"no artifact {rel!r} (not a file)", job_id=job_id)
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise PathError(f"artifact path {rel!r} leaves the job's run directory", job_id=job_id)
    return path


# -- routes -------------------------------------------------------------------------------

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SubmitIn.model_json_schema()},
            "application/yaml": {"schema": {"type": "string"}},
        },
    }
}


def jobs_router() -> APIRouter:
    """The ``/api/jobs`` routes (uses ``Ctx`` and ``CurrentPrincipal`` from deps)."""
    router = APIRouter(prefix="/api/jobs", tags=["jobs"])

    @router.post("", status_code=201, response_model=JobOut, openapi_extra=_SUBMIT_BODY,
                 responses={422: {"description": "invalid spec (problems by field path)"}})
    async def submit(request: Request, ctx: Ctx, principal: CurrentPrincipal,
                     name: Annotated[str | None, Query(max_length=MAX_JOB_NAME)] = None,
                     visibility: Annotated[str | None, Query(max_length=300)] = None
                     ) -> JSONResponse:
        """Submit a pipeline; the answer is the queued job.

        ``visibility`` (body field, or ``?visibility=`` for a YAML body): ``private``
        (default), ``public`` or ``group:<name>``; group members may then read the job
        (logs, metrics, artifacts) but not cancel it. A model the job registers for the
        first time gets the same visibility.

        With ``auth.pass_token_to_jobs`` the caller's OIDC access token goes to
        the job as ``BEARER_TOKEN_FILE`` (:mod:`mlaas.platform.auth.jobtoken`).
        """
        body = await request.body()
        job_name, raw, shared = _parse_submission(body, request.headers.get("content-type", ""),
                                                  name, visibility)
        out = await run_in_threadpool(_submit, ctx, principal, job_name, raw,
                                      _job_token(ctx, request), shared)
        return JSONResponse(out, status_code=201)

    @router.get("", response_model=JobList)
    def list_jobs(ctx: Ctx, principal: CurrentPrincipal, state: JobState | None = None,
                  name: Annotated[str | None, Query(max_length=MAX_JOB_NAME)] = None,
                  mine: bool = False,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Jobs the caller may read, newest first."""
        return {"jobs": _list(ctx, principal, state, name, mine, limit)}

    @router.get("/{job_id}", response_model=JobOut)
    def get_job(job_id: str, ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """State, timestamps, queue position and progress of one job."""
        return _with_position(ctx, _readable_job(ctx, principal, job_id))

    @router.get("/{job_id}/logs", response_class=PlainTextResponse, response_model=None,
                responses={200: {"content": {"text/plain": {}}}})
    async def logs(job_id: str, ctx: Ctx, principal: CurrentPrincipal,
                   offset: Annotated[int, Query(ge=0)] = 0,
                   follow: bool = False) -> StreamingResponse | PlainTextResponse:
        """The job's log from byte ``offset``; with ``follow`` it streams until the job ends."""
        job = await run_in_threadpool(_readable_job, ctx, principal, job_id)
        path = Path(ctx.storage.log_path(job.id))
        if not follow:
            data = await run_in_threadpool(_read_log, path, offset)
            return PlainTextResponse(data)  # the bytes as written: offsets stay byte offsets

        async def stream() -> AsyncIterator[bytes]:
            pos, final = offset, False
            while True:
                chunk = await run_in_threadpool(_read_log, path, pos, FOLLOW_CHUNK)
                if chunk:
                    pos += len(chunk)
                    yield chunk
                    continue
                if final:
                    return
                current = await run_in_threadpool(ctx.store.get_job, job.id)
                if current.final:
                    final = True  # send what was written before it ended, then stop
                    continue
                await asyncio.sleep(FOLLOW_POLL_S)

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    @router.get("/{job_id}/metrics", response_model=HistoryOut)
    def metrics(job_id: str, ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """Per-epoch history: the run's history.json, or what progress reported so far."""
        return {"history": _history(ctx, _readable_job(ctx, principal, job_id))}

    @router.post("/{job_id}/cancel", response_model=JobOut)
    def cancel(job_id: str, ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """Cancel a queued or running job (409 when it has already finished)."""
        job = _readable_job(ctx, principal, job_id, "write")
        if job.final:
            raise Conflict(f"job {job_id!r} has already {job.state.value}; nothing to cancel",
                           job_id=job_id)
        return _with_position(ctx, ctx.manager.cancel(job_id))

    @router.get("/{job_id}/artifacts", response_model=ArtifactList)
    def artifacts(job_id: str, ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """Files of the job's run directory: bundle, plots, metrics, history, stats."""
        job = _readable_job(ctx, principal, job_id)
        return {"artifacts": _artifacts(Path(ctx.storage.run_dir(job.id)))}

    @router.get("/{job_id}/artifacts/{path:path}", response_class=FileResponse,
                response_model=None, responses={200: {"content": {"application/octet-stream": {}}}})
    def artifact(job_id: str, path: str, ctx: Ctx, principal: CurrentPrincipal
                 ) -> FileResponse:
        """One artifact's bytes (paths stay inside the run directory; no symlinks)."""
        job = _readable_job(ctx, principal, job_id)
        found = _artifact_path(Path(ctx.storage.run_dir(job.id)), path, job.id)
        return FileResponse(found, media_type="application/octet-stream",
                            filename=found.name)

    return router
