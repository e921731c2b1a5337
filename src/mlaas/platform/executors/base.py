"""The executor interface: where job processes run, and what the manager may ask of them.

Layer: platform. An executor only starts, watches and stops processes for job
directories; it knows nothing of users, states or the database (that is the
manager's job, :mod:`mlaas.platform.manager`). The local executor
(:mod:`mlaas.platform.executors.local`) runs jobs as child processes of the
server; a Ray executor will run the same job entry point
(``python -m mlaas.platform.jobrun JOB_DIR``) on a cluster behind the same
interface.

The manager's cycle is: ``poll()`` for jobs that ended, then ``fits()`` and
``start()`` for jobs it admits; ``terminate()`` to cancel or preempt.
``start`` and ``terminate`` never block on the job; ``poll`` enforces the
limits (wall time, memory, the SIGKILL after a grace period) and reports each
ended job exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Launch", "Exited", "Executor", "LIMIT_WALL_TIME", "LIMIT_MEMORY", "read_log_tail"]

LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 16384

LIMIT_WALL_TIME = "wall_time"
LIMIT_MEMORY = "memory"


@dataclass
class Launch:
    """What to start: one job directory and the resources it is given.

    Args:
        job_id (str): the job; the key of every other executor call.
        job_dir (Path): the job directory (``pipeline.json`` in it); the process's cwd.
        cpus (int): CPU slots; also the size of the job's thread pools.
        memory_bytes (int or None): the job's memory limit (None: no limit).
        gpus (int): GPU devices to assign (0: the job sees none).
        max_time_s (float or None): wall-time limit from the start (None: no limit).
        env (dict): extra environment for the job (``MLAAS_JOB_ID``, ...); secrets
            are filtered out here too.
        threads (int or None): size of the job's thread pools (OMP, MKL, torch);
            None: one per CPU slot.
    """

    job_id: str
    job_dir: Path
    cpus: int = 1
    memory_bytes: int | None = None
    gpus: int = 0
    max_time_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None


@dataclass
class Exited:
    """A job process that ended, reported once by :meth:`Executor.poll`.

    Args:
        job_id (str): the job.
        exit_code (int or None): the process's exit status; negative ``-N`` when
            it was killed by signal ``N`` (``subprocess`` convention); None when
            unknown.
        reason (str): for humans: ``exited with code 1``, ``killed by signal
            SIGKILL (9)``, ``wall time exceeded (limit 60 s); ...``.
        log_tail (str): the last lines of the job's log.
        limit (str or None): ``wall_time`` or ``memory`` when the executor stopped
            the job for a limit (the job may still have exited 75 after SIGTERM,
            which must not count as a preemption).
        devices (list of str): the devices it held, now free again.
    """

    job_id: str
    exit_code: int | None
    reason: str
    log_tail: str = ""
    limit: str | None = None
    devices: list[str] = field(default_factory=list)


@runtime_checkable
class Executor(Protocol):
    """Runs job processes; every method is thread-safe and returns quickly."""

    def capacity(self) -> dict[str, Any]:
        """Everything this executor has: ``{"cpus": int, "gpus": int, "devices": [str]}``."""
        ...

    def free(self) -> dict[str, Any]:
        """What is not held by running jobs, in the same shape as :meth:`capacity`."""
        ...

    def fits(self, launch: Launch) -> bool:
        """Whether ``launch`` could start now (free CPUs and GPUs)."""
        ...

    def start(self, launch: Launch) -> list[str]:
        """Start the job; returns the devices assigned (``[]`` without GPUs).

        Raises :class:`mlaas.errors.Conflict` when it does not fit or the job
        already runs, :class:`OSError` when the process cannot be started.
        """
        ...

    def terminate(self, job_id: str, *, grace_s: float, kill: bool = True) -> None:
        """SIGTERM the job now; SIGKILL it after ``grace_s`` seconds if ``kill``.

        Without ``kill`` this is a preemption request: the job checkpoints and
        exits 75 in its own time. Unknown or finished jobs are ignored.
        """
        ...

    def poll(self) -> list[Exited]:
        """Jobs that ended since the last call; also enforces limits and grace periods."""
        ...

    def running(self) -> set[str]:
        """Ids of the jobs whose processes this executor runs now."""
        ...

    def shutdown(self, grace_s: float) -> list[Exited]:
        """Terminate every job (SIGTERM, SIGKILL after ``grace_s``), wait, report them."""
        ...


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (at most :data:`LOG_TAIL_BYTES`), or ``""``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
