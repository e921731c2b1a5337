"""The records the store hands out, the job states, and the store's interface.

Layer: platform. These are plain frozen dataclasses, not ORM rows, so the
API, the manager and the scheduler never hold a database session. The
:class:`Store` protocol is the contract between the SQL store
(:mod:`mlaas.platform.store`) and everything that uses it.

Job states::

    queued ──> running ──> succeeded | failed | cancelled
      ▲           │
      └─ preempted┘        (SIGTERM -> checkpoint -> exit 75 -> queued, resumes)

A queued job may also be cancelled directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

__all__ = ["JobState", "FINAL_STATES", "JobRecord", "FileRecord", "ModelRecord", "Store",
           "VISIBILITIES"]


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

VISIBILITIES = ("private", "group", "public")
"""``private``: owner (and admins); ``group``: members of the object's group; ``public``: anyone."""


@dataclass(frozen=True)
class JobRecord:
    """One submitted pipeline run.

    ``spec`` is the validated pipeline as a JSON-able dict with workspace
    paths already resolved; ``progress`` is what the job process last
    reported (``epoch``, ``epochs``, ``events_per_s``, ``metrics``, ``phase``).
    ``attempts`` counts starts: a preempted or recovered job starts again
    with ``--resume``.
    """

    id: str
    name: str
    owner: str
    group: str
    state: JobState
    spec: dict[str, Any]
    model_name: str
    created_at: datetime
    updated_at: datetime
    visibility: str = "private"
    resources: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    queue: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    exit_code: int | None = None
    reason: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    node: str | None = None
    devices: tuple[str, ...] = ()
    model_version: int | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class FileRecord:
    """A file in a user's workspace; the bytes live in platform storage."""

    owner: str
    group: str
    path: str
    size: int
    sha256: str
    updated_at: datetime
    visibility: str = "private"


@dataclass(frozen=True)
class ModelRecord:
    """Who owns a registry model name and who may read it (the registry keeps the bytes)."""

    name: str
    owner: str
    group: str
    visibility: str
    created_at: datetime


class Store(Protocol):
    """Durable state. Every method is one transaction; records are snapshots.

    ``get_*`` raise :class:`mlaas.errors.NotFound` naming the object. Times
    are timezone-aware UTC.
    """

    # jobs
    def create_job(self, *, name: str, owner: str, group: str, spec: dict[str, Any],
                   model_name: str, resources: dict[str, Any] | None = None,
                   priority: int = 0, queue: str | None = None,
                   visibility: str = "private") -> JobRecord: ...
    def get_job(self, job_id: str) -> JobRecord: ...
    def list_jobs(self, *, owner: str | None = None, state: JobState | None = None,
                  name: str | None = None, limit: int | None = None) -> list[JobRecord]: ...
    def queued_jobs(self) -> list[JobRecord]: ...
    def transition(self, job_id: str, expected: set[JobState] | frozenset[JobState],
                   new: JobState, **fields: Any) -> JobRecord | None: ...
    def update_job(self, job_id: str, **fields: Any) -> JobRecord: ...
    def queue_position(self, job_id: str) -> int | None: ...

    # workspace files (metadata; bytes in storage)
    def put_file(self, *, owner: str, group: str, path: str, size: int,
                 sha256: str) -> FileRecord: ...
    def get_file(self, owner: str, path: str) -> FileRecord: ...
    def list_files(self, owner: str) -> list[FileRecord]: ...
    def delete_file(self, owner: str, path: str) -> None: ...
    def used_bytes(self, owner: str) -> int: ...

    # model names (ownership and visibility over the registry)
    def ensure_model(self, name: str, *, owner: str, group: str,
                     visibility: str = "private") -> tuple[ModelRecord, bool]: ...
    def get_model(self, name: str) -> ModelRecord: ...
    def list_models(self) -> list[ModelRecord]: ...
    def set_model_visibility(self, name: str, visibility: str, *,
                             group: str | None = None) -> ModelRecord: ...
    def delete_model(self, name: str) -> None: ...
