"""The SQL store: jobs, workspace-file metadata and model names, as frozen records.

Layer: platform (persistence). :class:`SqlStore` implements the
:class:`mlaas.platform.records.Store` protocol on a
:class:`mlaas.platform.db.Database` (SQLite or PostgreSQL). Every method is
one short transaction and hands back frozen records, never ORM rows, so no
caller holds a session. Concurrency rests on single statements:
:meth:`SqlStore.transition` is one ``UPDATE ... WHERE id = ? AND state IN
(...)``, so when the manager and a cancel race, exactly one wins.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mlaas.errors import NotFound
from mlaas.platform.db import Database, FileRow, JobRow, ModelRow, utcnow
from mlaas.platform.records import (
    VISIBILITIES,
    FileRecord,
    JobRecord,
    JobState,
    ModelRecord,
)

__all__ = ["SqlStore", "JOB_ID_RE", "new_job_id"]

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
"""What a job id may look like; anything else is not a job (NotFound without a query)."""

_JOB_FIELDS = {f.name for f in dataclasses.fields(JobRecord)}
_UPDATABLE = _JOB_FIELDS - {"id"}
_TIME_FIELDS = {"created_at", "updated_at", "started_at", "finished_at"}
_DICT_FIELDS = {"spec", "progress", "resources"}
_NOT_NULL = {"name", "owner", "group", "state", "spec", "model_name", "created_at", "updated_at",
             "visibility", "resources", "priority", "attempts", "progress", "cancel_requested",
             "devices"}


def new_job_id() -> str:
    """A short random url-safe id: 12 hex digits of a uuid4 (48 bits)."""
    return uuid.uuid4().hex[:12]


class _Clock:
    """UTC now, strictly increasing within this process.

    Jobs are ordered by ``(created_at, id)``; two submissions in the same
    microsecond would otherwise fall back to the random id and leave FIFO.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: datetime | None = None

    def __call__(self) -> datetime:
        with self._lock:
            now = utcnow()
            if self._last is not None and now <= self._last:
                now = self._last + timedelta(microseconds=1)
            self._last = now
            return now


class SqlStore:
    """The :class:`~mlaas.platform.records.Store` on SQL (SQLite or PostgreSQL).

    Args:
        db (Database): an opened database; call ``db.migrate()`` first (the
            server does at start).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._now = _Clock()

    def __repr__(self) -> str:
        return f"SqlStore({self.db.display_url!r})"

    # -- jobs ---------------------------------------------------------------

    def create_job(self, *, name: str, owner: str, group: str, spec: dict[str, Any],
                   model_name: str, resources: dict[str, Any] | None = None,
                   priority: int = 0, queue: str | None = None,
                   visibility: str = "private") -> JobRecord:
        """Insert a new queued job with a fresh id and return it."""
        _check_visibility(visibility)
        now = self._now()
        for _ in range(5):  # 48-bit ids: a collision is astronomically rare, but cheap to retry
            row = JobRow(id=new_job_id(), name=name, owner=owner, group=group,
                         visibility=visibility, state=JobState.QUEUED.value, spec=dict(spec),
                         model_name=model_name, resources=dict(resources or {}),
                         priority=int(priority), queue=queue, created_at=now, updated_at=now,
                         started_at=None, finished_at=None, attempts=0, exit_code=None,
                         reason=None, progress={}, cancel_requested=False, node=None,
                         devices=[], model_version=None)
            try:
                with self.db.write() as session:
                    session.add(row)
                    session.flush()
                    return _job(row)
            except IntegrityError:
                continue
        raise RuntimeError("could not find a free job id in 5 tries")  # pragma: no cover

    def get_job(self, job_id: str) -> JobRecord:
        """The job ``job_id``; :class:`NotFound` if there is none (also for malformed ids)."""
        _check_job_id(job_id)
        with self.db.read() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job named {job_id!r}")
            return _job(row)

    def list_jobs(self, *, owner: str | None = None, state: JobState | None = None,
                  name: str | None = None, limit: int | None = None) -> list[JobRecord]:
        """Jobs newest first, filtered by exact owner, state and name."""
        query = sa.select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if state is not None:
            query = query.where(JobRow.state == JobState(state).value)
        if name is not None:
            query = query.where(JobRow.name == name)
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, not {limit}")
            query = query.limit(limit)
        with self.db.read() as session:
            return [_job(row) for row in session.scalars(query)]

    def queued_jobs(self) -> list[JobRecord]:
        """Every queued job, first come first served (``created_at``, then id)."""
        query = (sa.select(JobRow).where(JobRow.state == JobState.QUEUED.value)
                 .order_by(JobRow.created_at, JobRow.id))
        with self.db.read() as session:
            return [_job(row) for row in session.scalars(query)]

    def transition(self, job_id: str, expected: set[JobState] | frozenset[JobState],
                   new: JobState, **fields: Any) -> JobRecord | None:
        """Compare and set: move the job to ``new`` only if its state is in ``expected``.

        Args:
            expected: the states the caller saw; the update is one
                ``UPDATE ... WHERE id = ? AND state IN (expected)``.
            fields: other columns to set in the same statement (as in
                :meth:`update_job`); ``updated_at`` is set to now unless given.

        Returns the updated record, or None when the state did not match (someone
        else moved the job first). :class:`NotFound` if there is no such job.
        """
        _check_job_id(job_id)
        if not expected:
            raise ValueError(f"transition of job {job_id!r} needs at least one expected state")
        if "state" in fields:
            raise ValueError(f"transition of job {job_id!r} takes its new state as 'new', "
                             "not as a field")
        values = self._values({**fields, "state": new})
        states = sorted(JobState(s).value for s in expected)
        with self.db.write() as session:
            result = session.execute(
                sa.update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(states))
                .values(**values).execution_options(synchronize_session=False))
            row = session.get(JobRow, job_id, populate_existing=True)
            if row is None:
                raise NotFound(f"no job named {job_id!r}")
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return _job(row)

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Set any :class:`JobRecord` fields but ``id`` (``updated_at`` = now unless given).

        Unknown fields raise ``ValueError`` naming them; :class:`NotFound` if no such job.
        """
        _check_job_id(job_id)
        values = self._values(fields)
        with self.db.write() as session:
            result = session.execute(
                sa.update(JobRow).where(JobRow.id == job_id).values(**values)
                .execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"no job named {job_id!r}")
            row = session.get(JobRow, job_id, populate_existing=True)
            assert row is not None
            return _job(row)

    def queue_position(self, job_id: str) -> int | None:
        """0-based place of a queued job in the FIFO, None if it is not queued.

        :class:`NotFound` if there is no such job.
        """
        _check_job_id(job_id)
        queued = JobState.QUEUED.value
        with self.db.read() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job named {job_id!r}")
            if row.state != queued:
                return None
            ahead = sa.select(sa.func.count()).select_from(JobRow).where(
                JobRow.state == queued,
                sa.or_(JobRow.created_at < row.created_at,
                       sa.and_(JobRow.created_at == row.created_at, JobRow.id < row.id)))
            return int(session.scalar(ahead) or 0)

    def _values(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Check and convert record fields to column values."""
        unknown = sorted(set(fields) - _UPDATABLE)
        if unknown:
            what = "the job id cannot change" if unknown == ["id"] else (
                f"unknown job field(s) {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(sorted(_UPDATABLE))}")
            raise ValueError(what)
        values: dict[str, Any] = {}
        for key, value in fields.items():
            if value is None and key in _NOT_NULL:
                raise ValueError(f"job field {key!r} cannot be None")
            if key == "state":
                value = JobState(value).value
            elif key == "visibility":
                _check_visibility(value)
            elif key == "devices":
                if isinstance(value, str):
                    raise ValueError(f"job field 'devices' must be a sequence of names, "
                                     f"not the string {value!r}")
                value = [str(d) for d in value]
            elif key in _DICT_FIELDS:
                if not isinstance(value, dict):
                    raise ValueError(f"job field {key!r} must be a dict, not "
                                     f"{type(value).__name__}")
                value = dict(value)
            elif key in _TIME_FIELDS and value is not None:
                if not isinstance(value, datetime) or value.tzinfo is None:
                    raise ValueError(f"job field {key!r} must be a timezone-aware datetime, "
                                     f"not {value!r}")
            values[key] = value
        values.setdefault("updated_at", self._now())
        return values

    # -- workspace files ----------------------------------------------------

    def put_file(self, *, owner: str, group: str, path: str, size: int,
                 sha256: str) -> FileRecord:
        """Record (or replace) the metadata of ``owner``'s workspace file ``path``."""
        now = self._now()
        for _ in range(3):  # an insert racing another insert of the same path retries as update
            try:
                with self.db.write() as session:
                    row = session.get(FileRow, (owner, path))
                    if row is None:
                        row = FileRow(owner=owner, path=path, group=group, visibility="private",
                                      size=size, sha256=sha256, updated_at=now)
                        session.add(row)
                    else:
                        row.group, row.size, row.sha256, row.updated_at = group, size, sha256, now
                    session.flush()
                    return _file(row)
            except IntegrityError:
                continue
        raise RuntimeError(f"could not record file {path!r} of {owner!r}")  # pragma: no cover

    def get_file(self, owner: str, path: str) -> FileRecord:
        with self.db.read() as session:
            row = session.get(FileRow, (owner, path))
            if row is None:
                raise NotFound(f"no file named {path!r}")
            return _file(row)

    def list_files(self, owner: str) -> list[FileRecord]:
        """``owner``'s files, sorted by path."""
        query = sa.select(FileRow).where(FileRow.owner == owner).order_by(FileRow.path)
        with self.db.read() as session:
            return [_file(row) for row in session.scalars(query)]

    def delete_file(self, owner: str, path: str) -> None:
        with self.db.write() as session:
            result = session.execute(sa.delete(FileRow).where(FileRow.owner == owner,
                                                              FileRow.path == path))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"no file named {path!r}")

    def used_bytes(self, owner: str) -> int:
        """Total size of ``owner``'s workspace files, for the quota."""
        query = sa.select(sa.func.coalesce(sa.func.sum(FileRow.size), 0)).where(
            FileRow.owner == owner)
        with self.db.read() as session:
            return int(session.scalar(query) or 0)

    # -- model names --------------------------------------------------------

    def ensure_model(self, name: str, *, owner: str, group: str,
                     visibility: str = "private") -> tuple[ModelRecord, bool]:
        """The model name's record, created with this owner if it is new, and whether
        this call created it.

        An existing name is returned unchanged (whoever owns it): the caller
        authorises against the returned record. Saying whether it was created
        spares a caller that claims new names a read of its own before this one.
        """
        _check_visibility(visibility)
        for _ in range(3):
            try:
                with self.db.write() as session:
                    row = session.get(ModelRow, name)
                    created = row is None
                    if row is None:
                        row = ModelRow(name=name, owner=owner, group=group,
                                       visibility=visibility, created_at=self._now())
                        session.add(row)
                        session.flush()
                    return _model(row), created
            except IntegrityError:
                continue
        raise RuntimeError(f"could not record model {name!r}")  # pragma: no cover

    def get_model(self, name: str) -> ModelRecord:
        with self.db.read() as session:
            row = session.get(ModelRow, name)
            if row is None:
                raise NotFound(f"no model named {name!r}")
            return _model(row)

    def list_models(self) -> list[ModelRecord]:
        """Every model name, sorted (filter with :func:`mlaas.platform.authz.can_read`)."""
        with self.db.read() as session:
            return [_model(row) for row in session.scalars(
                sa.select(ModelRow).order_by(ModelRow.name))]

    def set_model_visibility(self, name: str, visibility: str, *,
                             group: str | None = None) -> ModelRecord:
        """Set who may read the model; ``group`` (if given) becomes the model's group."""
        _check_visibility(visibility)
        with self.db.write() as session:
            row = session.get(ModelRow, name)
            if row is None:
                raise NotFound(f"no model named {name!r}")
            row.visibility = visibility
            if group is not None:
                row.group = group
            session.flush()
            return _model(row)

    def delete_model(self, name: str) -> None:
        with self.db.write() as session:
            result = session.execute(sa.delete(ModelRow).where(ModelRow.name == name))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"no model named {name!r}")


def _check_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise NotFound(f"no job named {job_id!r}")


def _check_visibility(visibility: str) -> None:
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility {visibility!r} is not one of {', '.join(VISIBILITIES)}")


def _job(row: JobRow) -> JobRecord:
    return JobRecord(
        id=row.id, name=row.name, owner=row.owner, group=row.group,
        state=JobState(row.state), spec=dict(row.spec or {}), model_name=row.model_name,
        created_at=row.created_at, updated_at=row.updated_at, visibility=row.visibility,
        resources=dict(row.resources or {}), priority=row.priority, queue=row.queue,
        started_at=row.started_at, finished_at=row.finished_at, attempts=row.attempts,
        exit_code=row.exit_code, reason=row.reason, progress=dict(row.progress or {}),
        cancel_requested=bool(row.cancel_requested), node=row.node,
        devices=tuple(_strs(row.devices)), model_version=row.model_version)


def _strs(values: Iterable[Any] | None) -> list[str]:
    return [str(v) for v in values or ()]


def _file(row: FileRow) -> FileRecord:
    return FileRecord(owner=row.owner, group=row.group, path=row.path, size=row.size,
                      sha256=row.sha256, updated_at=row.updated_at, visibility=row.visibility)


def _model(row: ModelRow) -> ModelRecord:
    return ModelRecord(name=row.name, owner=row.owner, group=row.group,
                       visibility=row.visibility, created_at=row.created_at)
