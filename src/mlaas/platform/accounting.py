"""Accounting: one row per job attempt, and usage summed per user and per group.

Layer: platform (persistence and reporting). The job manager tells
:class:`Accounting` when an attempt starts (a job process was launched on a
node with its devices) and when it ends (succeeded, failed, cancelled,
preempted, or lost with its node or the server). Each attempt is one row of
``job_attempts``; nothing else writes that table, and jobs are never joined:
an attempt row keeps the user, group, queue, node and request it ran with,
so usage stays right after a job is changed or removed.

:meth:`Accounting.usage` sums the rows of a time window into, for the whole
selection and per user and per group:

- ``gpu_hours`` per flavor (devices x hours) and ``cpu_hours``;
- ``jobs`` (distinct jobs that ran in the window) and ``attempts``;
- ``outcomes`` (attempts that ended in the window, per outcome) and
  ``preemptions`` (the ``preempted`` ones);
- ``wait_s``: how long attempts that started in the window waited in their
  queue (count, mean, p50, p95). An attempt waits from when its job entered
  the queue: submission for the first attempt, the end of the previous
  attempt for a requeued one.

Hours are clipped to the window, and an attempt still running counts up to
now. Windows are half-open ``[since, until)``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mlaas.platform.db import Base, Database, UTCDateTime, utcnow
from mlaas.platform.records import JobRecord

__all__ = ["Accounting", "JobAttemptRow", "OUTCOMES", "AttemptObserver", "DEFAULT_GPU_FLAVOR",
           "gpu_request", "parse_when"]

log = logging.getLogger("mlaas.platform.accounting")

OUTCOMES = ("succeeded", "failed", "cancelled", "preempted", "lost")
"""How an attempt can end; ``lost``: its node or the server went away while it ran."""

DEFAULT_GPU_FLAVOR = "gpu"
"""The flavor of a job that asked for a plain GPU count (``gpus: 2``) instead of flavors."""


class JobAttemptRow(Base):
    """One start of a job process, until it ends (``outcome`` None while it runs)."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.String(32))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    user: Mapped[str] = mapped_column(sa.String(255))
    group: Mapped[str] = mapped_column(sa.String(255))
    queue: Mapped[str | None] = mapped_column(sa.String(255))
    node: Mapped[str | None] = mapped_column(sa.String(255))
    gpus: Mapped[dict[str, int]] = mapped_column(sa.JSON)
    cpus: Mapped[float] = mapped_column(sa.Float)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(sa.String(16))

    __table_args__ = (
        sa.UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_attempt"),
        sa.Index("ix_job_attempts_started", "started_at"),
        sa.Index("ix_job_attempts_user", "user"),
        sa.Index("ix_job_attempts_group", "group"),
    )


class AttemptObserver(Protocol):
    """What wants to hear about attempts as they happen (the Prometheus metrics)."""

    def attempt_started(self, *, queue: str, wait_s: float) -> None: ...
    def attempt_ended(self, *, queue: str, outcome: str) -> None: ...


def gpu_request(resources: Mapping[str, Any] | None,
                devices: Mapping[str, int] | Sequence[str] = ()) -> dict[str, int]:
    """The devices an attempt holds, as ``{flavor: count}``.

    Args:
        resources: the job's ``resources``; ``gpus`` is either ``{flavor: count}``
            (the farm's form) or a plain count.
        devices: what the executor gave: ``{flavor: count}``, or device names
            (then counted under the requested flavor, or :data:`DEFAULT_GPU_FLAVOR`).

    The executor's answer wins over the request: it is what was held.
    """
    if isinstance(devices, Mapping):
        held = {str(f): int(n) for f, n in devices.items() if int(n) > 0}
        if held:
            return held
        devices = ()
    asked = (resources or {}).get("gpus")
    if isinstance(asked, Mapping):
        wanted = {str(f): int(n) for f, n in asked.items() if n and int(n) > 0}
        if devices and len(wanted) == 1:
            return {next(iter(wanted)): len(devices)}
        return wanted
    count = len(devices) if devices else (int(asked) if isinstance(asked, (int, float))
                                          and not isinstance(asked, bool) else 0)
    return {DEFAULT_GPU_FLAVOR: count} if count > 0 else {}


@dataclass
class _Sum:
    """Running totals of one user, group or the whole selection."""

    gpu_hours: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    cpu_hours: float = 0.0
    jobs: set[str] = field(default_factory=set)
    attempts: int = 0
    running: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)

    def out(self) -> dict[str, Any]:
        waits = sorted(self.waits)
        return {
            "gpu_hours": {f: round(h, 6) for f, h in sorted(self.gpu_hours.items())},
            "gpu_hours_total": round(sum(self.gpu_hours.values()), 6),
            "cpu_hours": round(self.cpu_hours, 6),
            "jobs": len(self.jobs),
            "attempts": self.attempts,
            "running": self.running,
            "outcomes": {o: self.outcomes.get(o, 0) for o in OUTCOMES},
            "preemptions": self.outcomes.get("preempted", 0),
            "wait_s": {
                "count": len(waits),
                "mean": round(sum(waits) / len(waits), 3) if waits else None,
                "p50": _quantile(waits, 0.50),
                "p95": _quantile(waits, 0.95),
            },
        }


def _quantile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    value = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return round(value, 3)


_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: str, now: datetime, *, field: str = "since") -> datetime:
    """A window bound from text: an ISO 8601 time, or a duration before ``now``.

    Args:
        value (str): ``2026-11-01``, ``2026-11-01T12:00:00+01:00`` (a time without
            a zone is UTC), or ``<number><unit>`` with unit ``s``, ``m``, ``h``,
            ``d`` or ``w`` (``7d``: seven days ago).
        now (datetime): timezone-aware; what durations count back from.
        field (str): the parameter's name, for the error.

    Raises ``ValueError`` naming the field and the value.
    """
    text = value.strip()
    ago = _AGO.match(text)
    try:
        if ago:
            return now - timedelta(seconds=float(ago.group(1)) * _UNIT_S[ago.group(2)])
        when = datetime.fromisoformat(text)
        return (when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when).astimezone(
            timezone.utc)
    except OverflowError:
        raise ValueError(f"{field} {value!r} is out of range; give a time between the "
                         "years 1 and 9999") from None
    except ValueError:
        raise ValueError(f"{field} {value!r} is neither an ISO 8601 time (2026-11-01, "
                         "2026-11-01T12:00:00Z) nor a duration ago (30m, 12h, 7d, 2w)") from None


def _aware(value: datetime | None, what: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{what} {value!r} is a naive datetime; accounting takes "
                         "timezone-aware times")
    return value


class Accounting:
    """Records job attempts in ``job_attempts`` and sums them into usage.

    Args:
        db (Database): the platform's (migrated) database; no engine of its own.
        observer (AttemptObserver or None): told of each start and end after it
            is recorded (the app's Prometheus metrics); its errors are logged.
        clock (callable): now, timezone-aware UTC (tests pass a fixed one).
    """

    def __init__(self, db: Database, *, observer: AttemptObserver | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.observer = observer
        self.clock = clock

    def __repr__(self) -> str:
        return f"Accounting({self.db.display_url!r})"

    # -- recording ----------------------------------------------------------------------

    def attempt_started(self, job: JobRecord, *, node: str | None,
                        devices: Mapping[str, int] | Sequence[str] = (),
                        cpus: float | None = None, queued_at: datetime | None = None,
                        started_at: datetime | None = None) -> int:
        """Record that attempt ``job.attempts`` of ``job`` started now; returns its row id.

        Args:
            job: the job as it was moved to running (``attempts`` already counts
                this start; ``queue``, ``owner``, ``group`` and ``resources`` are
                copied).
            node: where it runs.
            devices: what it holds (see :func:`gpu_request`).
            cpus: CPU slots it holds (default: ``resources["cpus"]``, else 1).
            queued_at: when it entered the queue; default: the end of this job's
                previous attempt, else its submission.
            started_at: default ``job.started_at``, else now.

        A second call for the same attempt (a retried start) replaces nothing
        and returns the existing row's id.
        """
        started = _aware(started_at, "started_at") or job.started_at or self.clock()
        if cpus is None:
            raw = (job.resources or {}).get("cpus")
            cpus = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) \
                and raw > 0 else 1.0
        if cpus < 0:
            raise ValueError(f"cpus of job {job.id!r} must be >= 0, not {cpus!r}")
        gpus = gpu_request(job.resources, devices)
        attempt = max(int(job.attempts), 1)
        queue = job.queue
        with self.db.write() as session:
            existing = session.scalar(sa.select(JobAttemptRow.id).where(
                JobAttemptRow.job_id == job.id, JobAttemptRow.attempt == attempt))
            if existing is not None:
                return int(existing)
            # an attempt left open (a crash between start and end) ends where this one begins
            session.execute(sa.update(JobAttemptRow).where(
                JobAttemptRow.job_id == job.id, JobAttemptRow.ended_at.is_(None))
                .values(ended_at=started, outcome="lost"))
            if _aware(queued_at, "queued_at") is None:
                previous = session.scalar(
                    sa.select(sa.func.max(JobAttemptRow.ended_at))
                    .where(JobAttemptRow.job_id == job.id))
                queued_at = previous or job.created_at
            assert queued_at is not None
            row = JobAttemptRow(job_id=job.id, attempt=attempt, user=job.owner,
                                group=job.group, queue=queue, node=node, gpus=gpus,
                                cpus=float(cpus), queued_at=min(queued_at, started),
                                started_at=started, ended_at=None, outcome=None)
            session.add(row)
            session.flush()
            row_id = int(row.id)
        self._tell("attempt_started", queue=queue or "",
                   wait_s=max(0.0, (started - queued_at).total_seconds()))
        return row_id

    def attempt_ended(self, job_id: str, outcome: str,
                      ended_at: datetime | None = None) -> bool:
        """Close the job's running attempt with ``outcome`` (one of :data:`OUTCOMES`).

        Returns False (and changes nothing) when the job has no open attempt:
        its start was never recorded, or the end was already.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} of job {job_id!r} is not one of "
                             f"{', '.join(OUTCOMES)}")
        ended = _aware(ended_at, "ended_at") or self.clock()
        with self.db.write() as session:
            row = session.scalars(
                sa.select(JobAttemptRow).where(JobAttemptRow.job_id == job_id,
                                               JobAttemptRow.ended_at.is_(None))
                .order_by(JobAttemptRow.attempt.desc()).limit(1)).first()
            if row is None:
                log.debug("job %s ended (%s) without an open attempt", job_id, outcome)
                return False
            row.ended_at = max(ended, row.started_at)
            row.outcome = outcome
            queue = row.queue or ""
        self._tell("attempt_ended", queue=queue, outcome=outcome)
        return True

    def _tell(self, what: str, **kwargs: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, what)(**kwargs)
        except Exception:  # noqa: BLE001 - metrics must never break accounting
            log.exception("accounting observer failed on %s", what)

    # -- reading ------------------------------------------------------------------------

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's attempts, first first, as plain dicts (for tests and the API)."""
        with self.db.read() as session:
            rows = session.scalars(sa.select(JobAttemptRow).where(
                JobAttemptRow.job_id == job_id).order_by(JobAttemptRow.attempt))
            return [_row_dict(r) for r in rows]

    def in_use(self) -> list[tuple[str, str, int]]:
        """Devices held by running attempts now: ``[(queue, flavor, count)]`` summed."""
        totals: Counter[tuple[str, str]] = Counter()
        with self.db.read() as session:
            for queue, gpus in session.execute(
                    sa.select(JobAttemptRow.queue, JobAttemptRow.gpus)
                    .where(JobAttemptRow.ended_at.is_(None))):
                for flavor, count in (gpus or {}).items():
                    totals[(queue or "", str(flavor))] += int(count)
        return [(q, f, n) for (q, f), n in sorted(totals.items())]

    def usage(self, *, user: str | None = None, group: str | None = None,
              since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
        """Usage in ``[since, until)`` (default: all time up to now), optionally of one
        user and/or one group.

        Returns ``{"since", "until", "user", "group", "total", "users", "groups"}``
        where ``total`` and each value of ``users`` / ``groups`` (keyed by name)
        is ``{"gpu_hours": {flavor: h}, "gpu_hours_total", "cpu_hours", "jobs",
        "attempts", "running", "outcomes": {outcome: n}, "preemptions",
        "wait_s": {"count", "mean", "p50", "p95"}}`` (see the module docstring).
        """
        now = self.clock()
        since, until = _aware(since, "since"), _aware(until, "until")
        end = until or now
        if since is not None and since >= end:
            raise ValueError(f"since ({since.isoformat()}) must be before until "
                             f"({end.isoformat()})")
        query = sa.select(JobAttemptRow).where(JobAttemptRow.started_at < end)
        if since is not None:
            query = query.where(sa.or_(JobAttemptRow.ended_at.is_(None),
                                       JobAttemptRow.ended_at > since,
                                       JobAttemptRow.started_at >= since))
        if user is not None:
            query = query.where(JobAttemptRow.user == user)
        if group is not None:
            query = query.where(JobAttemptRow.group == group)
        with self.db.read() as session:
            rows = list(session.scalars(query.order_by(JobAttemptRow.started_at)))
        total = _Sum()
        users: dict[str, _Sum] = defaultdict(_Sum)
        groups: dict[str, _Sum] = defaultdict(_Sum)
        for row in rows:
            for acc in (total, users[row.user], groups[row.group]):
                _add(acc, row, since, end, now)
        return {
            "since": since.isoformat() if since is not None else None,
            "until": end.isoformat(),
            "user": user,
            "group": group,
            "total": total.out(),
            "users": {name: s.out() for name, s in sorted(users.items())},
            "groups": {name: s.out() for name, s in sorted(groups.items())},
        }


def _add(acc: _Sum, row: JobAttemptRow, since: datetime | None, end: datetime,
         now: datetime) -> None:
    """Charge one attempt to ``acc``, clipped to the window ``[since, end)``."""
    stop = min(row.ended_at or now, end)
    start = max(row.started_at, since) if since is not None else row.started_at
    hours = max(0.0, (stop - start).total_seconds()) / 3600.0
    acc.jobs.add(row.job_id)
    acc.attempts += 1
    acc.cpu_hours += row.cpus * hours
    for flavor, count in (row.gpus or {}).items():
        acc.gpu_hours[flavor] += int(count) * hours
    if row.ended_at is None:
        acc.running += 1
    elif row.ended_at < end and row.outcome and (since is None or row.ended_at >= since):
        acc.outcomes[row.outcome] += 1
    if since is None or row.started_at >= since:
        acc.waits.append(max(0.0, (row.started_at - row.queued_at).total_seconds()))


def _row_dict(row: JobAttemptRow) -> dict[str, Any]:
    return {"job_id": row.job_id, "attempt": row.attempt, "user": row.user, "group": row.group,
            "queue": row.queue, "node": row.node, "gpus": dict(row.gpus or {}),
            "cpus": row.cpus, "queued_at": row.queued_at, "started_at": row.started_at,
            "ended_at": row.ended_at, "outcome": row.outcome}

