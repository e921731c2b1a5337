"""The job manager: the loop that admits queued jobs, watches running ones and finishes them.

Layer: platform. It joins the store (durable state,
:class:`mlaas.platform.records.Store`), platform storage (job directories),
an executor (:class:`mlaas.platform.executors.base.Executor`) and the model
registry. The HTTP API calls :meth:`JobManager.submit` and
:meth:`JobManager.cancel`; everything else happens in :meth:`JobManager.tick`,
run every ``poll_interval`` seconds by a daemon thread:

1. poll the executor for ended jobs and map each exit to a state:
   cancel requested -> ``cancelled``; stopped for a limit (wall time, memory)
   -> ``failed``; 0 -> ``succeeded`` (the bundle registered as a new version);
   75 (or death by SIGTERM, which only a process too young to checkpoint
   suffers) -> ``preempted`` -> ``queued`` (resumes from its checkpoint); anything
   else -> ``failed`` with the exit code and the log tail in ``reason``;
2. copy each running job's ``progress.json`` into the store;
3. admit queued jobs: :func:`fifo_admit` picks which, given the executor's
   free slots; each goes ``queued -> running`` in the store, then to
   ``executor.start``.

The admission policy is one pure function (``admit=``), so the scheduler of
the quotas issue replaces it without touching the loop.

The job directory (``storage.job_dir(id)``) is the only channel to the job
process, so a server that dies loses nothing: :meth:`JobManager.recover`, at
start-up, requeues jobs whose process is gone (they resume from their
checkpoint) and honours the ``exit.json`` of jobs that ended meanwhile::

    job_dir/pipeline.json   written by submit()
    job_dir/job.log         the process's stdout and stderr, plus [mlaas] lines
    job_dir/progress.json   the job's latest progress report
    job_dir/exit.json       {"exit_code", "finished_at", "error"} when it ended
    job_dir/run/            the run directory: checkpoint.pt, bundle.tar.gz, plots, ...
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlaas.errors import Conflict, MlaasError, NotFound
from mlaas.platform.auth.jobtoken import existing_token_env
from mlaas.platform.authz import authorize
from mlaas.platform.executors.base import Executor, Exited, Launch, read_log_tail
from mlaas.platform.jobrun import (
    EXIT_FILE,
    EXIT_OK,
    EXIT_PREEMPTED,
    PIPELINE_FILE,
    PROGRESS_FILE,
    RUN_DIR,
    write_json_atomic,
)
from mlaas.platform.principal import Principal
from mlaas.platform.records import JobRecord, JobState, Store

__all__ = ["JobManager", "fifo_admit", "AdmitPolicy", "BUNDLE_NAME", "DEFAULT_RESOURCES"]

log = logging.getLogger("mlaas.platform.manager")

BUNDLE_NAME = "bundle.tar.gz"

DEFAULT_RESOURCES: dict[str, Any] = {"cpus": 1, "gpus": 0, "memory_bytes": None,
                                     "max_time_s": None, "threads": None}
"""What a job gets when neither its ``resources`` nor the manager's ``defaults`` say."""

AdmitPolicy = Callable[[Sequence[Launch], Mapping[str, Any]], list[str]]
"""``(queued launches in queue order, executor.free()) -> job ids to start now, in order``."""


def fifo_admit(queued: Sequence[Launch], free: Mapping[str, Any]) -> list[str]:
    """Strict FIFO: admit from the head of the queue while the head fits.

    Args:
        queued: the queued jobs' launch requests, first come first.
        free: the executor's free resources (``cpus``, ``gpus``).

    The first job that does not fit stops admission, so a big job at the
    head is not starved by small ones behind it. Pure: no clock, no store.
    """
    cpus, gpus = int(free.get("cpus", 0)), int(free.get("gpus", 0))
    chosen: list[str] = []
    for launch in queued:
        if launch.cpus > cpus or launch.gpus > gpus:
            break
        chosen.append(launch.job_id)
        cpus -= launch.cpus
        gpus -= launch.gpus
    return chosen


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _with_tail(reason: str, tail: str) -> str:
    return f"{reason}\n--- last lines of job.log ---\n{tail}" if tail.strip() else reason


class JobManager:
    """Runs submitted jobs on an executor and keeps the store in step.

    Args:
        store (Store): durable state.
        storage (Storage): platform storage (``job_dir(id)``).
        executor (Executor): where job processes run.
        registry (Registry): where a succeeded job's bundle is registered.
        poll_interval (float): seconds between two ticks of the loop thread.
        grace_s (float): on cancel, seconds between SIGTERM and SIGKILL.
        on_success (callable or None): called with the final record of each
            succeeded job, after registration (errors are logged, not raised).
        defaults (mapping or None): resources for jobs whose ``resources`` lack
            a key: ``cpus``, ``gpus``, ``memory_bytes``, ``max_time_s``, ``threads``
            (other keys are ignored, so ``config.jobs.model_dump()`` can be passed).
        admit (AdmitPolicy): the admission policy (default :func:`fifo_admit`).
    """

    def __init__(self, store: Store, storage: Any, executor: Executor, registry: Any, *,
                 poll_interval: float = 0.5, grace_s: float = 10.0,
                 on_success: Callable[[JobRecord], None] | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 admit: AdmitPolicy = fifo_admit) -> None:
        self.store = store
        self.storage = storage
        self.executor = executor
        self.registry = registry
        self.poll_interval = poll_interval
        self.grace_s = grace_s
        self.on_success = on_success
        self.defaults = {**DEFAULT_RESOURCES,
                         **{k: v for k, v in (defaults or {}).items() if k in DEFAULT_RESOURCES}}
        self.admit = admit
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen_progress: dict[str, tuple[int, int]] = {}
        self._unfinished: list[Exited] = []  # ended jobs whose new state is not stored yet

    # -- paths -----------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """The job's directory in platform storage (created)."""
        return Path(self.storage.job_dir(job_id))

    # -- the API's entry points ---------------------------------------------------------

    def submit(self, *, principal: Principal, name: str, spec: dict[str, Any],
               model_name: str | None = None, resources: Mapping[str, Any] | None = None,
               priority: int = 0, queue: str | None = None,
               visibility: str = "private",
               prepare: Callable[[Path], Any] | None = None) -> JobRecord:
        """Queue ``spec`` as a job of ``principal``; returns the queued record.

        Args:
            principal: the submitter: the job's owner (``principal.user``) and
                group (``principal.primary_group``).
            name: the job's name.
            spec: the validated pipeline, workspace paths already resolved.
            model_name: where the bundle is registered (default ``spec["name"]``,
                else ``name``). An existing model must be writable by the principal
                (checked now, not when the job has run for hours).
            resources: ``cpus``, ``gpus``, ``memory_bytes``, ``max_time_s``,
                ``threads`` (missing keys come from the manager's ``defaults``).
            prepare: called with the job directory before the job can be admitted
                (the API writes the user's token file there, see
                :mod:`mlaas.platform.auth.jobtoken`).
        """
        model = model_name or spec.get("name") or name
        try:
            existing = self.store.get_model(model)
        except NotFound:
            existing = None
        if existing is not None:
            authorize(principal, "write", existing, kind="model", name=model)
        record = self.store.create_job(name=name, owner=principal.user,
                                       group=principal.primary_group, spec=spec,
                                       model_name=model, resources=dict(resources or {}),
                                       priority=priority, queue=queue, visibility=visibility)
        try:
            if prepare is not None:
                prepare(self.job_dir(record.id))
            # admission waits for this file, so the loop never starts a half-written job
            write_json_atomic(self.job_dir(record.id) / PIPELINE_FILE, spec)
        except (OSError, MlaasError, TypeError, ValueError) as exc:
            self.store.transition(record.id, {JobState.QUEUED}, JobState.FAILED,
                                  finished_at=_now(),
                                  reason=f"cannot write the job's {PIPELINE_FILE}: {exc}")
            raise
        self._wake.set()
        return record

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: queued -> cancelled now; running -> SIGTERM, cancelled when it exits.

        Raises :class:`~mlaas.errors.Conflict` for a job that is already final.
        """
        for _ in range(10):  # each pass loses at most one race against the loop
            record = self.store.get_job(job_id)
            if record.final:
                raise Conflict(f"job {job_id!r} is already {record.state.value}; only queued "
                               "or running jobs can be cancelled", job_id=job_id)
            if record.state in (JobState.QUEUED, JobState.PREEMPTED):
                done = self.store.transition(job_id, {JobState.QUEUED, JobState.PREEMPTED},
                                             JobState.CANCELLED, finished_at=_now(),
                                             reason="cancelled before it ran"
                                             if record.attempts == 0 else
                                             "cancelled while waiting to resume")
                if done is not None:
                    return done
                continue
            marked = self.store.transition(job_id, {JobState.RUNNING}, JobState.RUNNING,
                                           cancel_requested=True)
            if marked is None:
                continue
            if job_id in self.executor.running():
                self.executor.terminate(job_id, grace_s=self.grace_s, kill=True)
            self._wake.set()
            return marked
        raise Conflict(f"job {job_id!r} keeps changing state; try to cancel it again",
                       job_id=job_id)

    def preempt(self, job_id: str) -> None:
        """Ask a running job to checkpoint and stop (SIGTERM, no SIGKILL): it is requeued."""
        if job_id in self.executor.running():
            self.executor.terminate(job_id, grace_s=self.grace_s, kill=False)

    # -- the loop ----------------------------------------------------------------------

    def tick(self) -> None:
        """One cycle: finish ended jobs, record progress, admit queued jobs."""
        with self._lock:
            ended, self._unfinished = self._unfinished + self.executor.poll(), []
            for exited in ended:
                try:
                    self._finish(exited)
                except Exception:  # noqa: BLE001 - the executor reports an exit only once
                    log.exception("recording the end of job %s failed; retrying next cycle",
                                  exited.job_id)
                    self._unfinished.append(exited)
            self._record_progress()
            self._admit()

    def start(self) -> None:
        """Run :meth:`tick` every ``poll_interval`` seconds in a daemon thread."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="mlaas-job-manager",
                                            daemon=True)
            self._thread.start()

    def stop(self, terminate_jobs: bool = False, timeout: float = 30.0) -> None:
        """Stop the loop thread.

        Args:
            terminate_jobs: also stop every job process (SIGTERM, SIGKILL after
                ``grace_s``); they exit 75 and are queued to resume. Without it
                the processes keep running; a later :meth:`start` (or a new
                manager's :meth:`recover`) picks them up.
        """
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        if terminate_jobs:
            with self._lock:
                for exited in self.executor.shutdown(self.grace_s):
                    self._finish(exited)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad cycle
                log.exception("job manager cycle failed")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def wait(self, job_id: str, timeout: float) -> JobRecord:
        """Block until the job is final (ticking here if the loop is not running).

        Raises :class:`TimeoutError` naming the job and its last state.
        """
        deadline = time.monotonic() + timeout
        while True:
            record = self.store.get_job(job_id)
            if record.final:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id!r} is still {record.state.value} after "
                                   f"{timeout:g} s")
            if self._thread is None or not self._thread.is_alive():
                self.tick()
            time.sleep(min(0.1, self.poll_interval))

    # -- start-up -------------------------------------------------------------------------

    def recover(self) -> list[JobRecord]:
        """Put the store in step with reality after a restart; returns the jobs it changed.

        Jobs ``running`` in the store whose process this executor does not run:
        an ``exit.json`` of 0 means it succeeded while the server was down (its
        bundle is registered now); another final code means it failed; 75 or no
        ``exit.json`` (killed with the server) means it is requeued and resumes
        from its checkpoint. Jobs left ``preempted`` are queued again.
        """
        changed: list[JobRecord] = []
        with self._lock:
            ours = self.executor.running()
            for record in self.store.list_jobs(state=JobState.RUNNING):
                if record.id in ours:
                    continue
                exit_info = self._read_json(self.job_dir(record.id) / EXIT_FILE)
                code = exit_info.get("exit_code") if isinstance(exit_info, dict) else None
                if isinstance(code, int) and code != EXIT_PREEMPTED:
                    log.info("job %s ended with code %s while the server was down",
                             record.id, code)
                    exited = Exited(record.id, code,
                                    f"exited with code {code} while the server was down",
                                    self._log_tail(record.id))
                else:
                    exited = Exited(record.id, EXIT_PREEMPTED if code == EXIT_PREEMPTED else None,
                                    "the server stopped while the job ran",
                                    self._log_tail(record.id))
                result = self._finish(exited, requeue_unknown=True)
                if result is not None:
                    changed.append(result)
            for record in self.store.list_jobs(state=JobState.PREEMPTED):
                requeued = self.store.transition(record.id, {JobState.PREEMPTED},
                                                 JobState.QUEUED)
                if requeued is not None:
                    changed.append(requeued)
        return changed

    # -- finishing ----------------------------------------------------------------------

    def _finish(self, exited: Exited, *, requeue_unknown: bool = False) -> JobRecord | None:
        """Map one ended process to the job's next state; returns the new record."""
        job_id = exited.job_id
        self._seen_progress.pop(job_id, None)
        try:
            record = self.store.get_job(job_id)
        except NotFound:
            log.warning("job %s ended but is not in the store", job_id)
            return None
        fields: dict[str, Any] = {"exit_code": exited.exit_code}
        progress = self._read_json(self.job_dir(job_id) / PROGRESS_FILE)
        if isinstance(progress, dict) and progress:
            fields["progress"] = progress
        running = {JobState.RUNNING}
        code = exited.exit_code
        if record.cancel_requested:
            return self.store.transition(job_id, running, JobState.CANCELLED, finished_at=_now(),
                                         reason=f"cancelled on request; {exited.reason}",
                                         **fields)
        if exited.limit is not None:
            return self._fail(record, _with_tail(exited.reason, exited.log_tail), fields)
        if code == EXIT_OK:
            return self._succeed(record, fields)
        if code in (EXIT_PREEMPTED, -signal.SIGTERM) or (code is None and requeue_unknown):
            # -SIGTERM: stopped before jobrun took over SIGTERM (its first milliseconds);
            # like 75 it means "stop and come back later", with nothing to lose
            preempted = self.store.transition(job_id, running, JobState.PREEMPTED,
                                              reason=f"preempted: {exited.reason}; it resumes "
                                                     "from its last checkpoint", devices=(),
                                              **fields)
            if preempted is None:
                return None
            return self.store.transition(job_id, {JobState.PREEMPTED}, JobState.QUEUED)
        return self._fail(record, _with_tail(exited.reason, exited.log_tail), fields)

    def _fail(self, record: JobRecord, reason: str, fields: dict[str, Any]) -> JobRecord | None:
        log.info("job %s failed: %s", record.id, reason.splitlines()[0])
        return self.store.transition(record.id, {JobState.RUNNING}, JobState.FAILED,
                                     finished_at=_now(), reason=reason, **fields)

    def _succeed(self, record: JobRecord, fields: dict[str, Any]) -> JobRecord | None:
        """Register the bundle as the next version of the job's model, then mark it succeeded."""
        bundle = self.job_dir(record.id) / RUN_DIR / BUNDLE_NAME
        if not bundle.is_file():
            return self._fail(record, f"the job exited 0 but left no {RUN_DIR}/{BUNDLE_NAME}",
                              fields)
        try:
            self.store.ensure_model(record.model_name, owner=record.owner, group=record.group)
            info = self.registry.upload(record.model_name, bundle, metadata={
                "job_id": record.id, "job_name": record.name, "owner": record.owner,
                "group": record.group})
        except (MlaasError, OSError) as exc:
            return self._fail(record, f"the job succeeded but its bundle could not be "
                                      f"registered as model {record.model_name!r}: "
                                      f"{type(exc).__name__}: {exc}", fields)
        done = self.store.transition(record.id, {JobState.RUNNING}, JobState.SUCCEEDED,
                                     finished_at=_now(), model_version=int(info["version"]),
                                     reason=None, **fields)
        if done is not None and self.on_success is not None:
            try:
                self.on_success(done)
            except Exception:  # noqa: BLE001 - a hook must not undo a success
                log.exception("on_success hook failed for job %s", record.id)
        return done

    # -- progress -------------------------------------------------------------------------

    def _record_progress(self) -> None:
        for job_id in self.executor.running():
            path = self.job_dir(job_id) / PROGRESS_FILE
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_mtime_ns, st.st_size)
            if self._seen_progress.get(job_id) == key:
                continue
            data = self._read_json(path)
            if isinstance(data, dict):
                try:
                    self.store.update_job(job_id, progress=data)
                except NotFound:
                    continue
                self._seen_progress[job_id] = key

    # -- admission --------------------------------------------------------------------------

    def _launch(self, record: JobRecord) -> Launch:
        """The executor request of a job: its resources over the manager's defaults."""
        res = {**self.defaults, **{k: v for k, v in (record.resources or {}).items()
                                   if v is not None}}
        try:
            cpus, gpus = int(res["cpus"]), int(res["gpus"])
            memory = None if res["memory_bytes"] is None else int(res["memory_bytes"])
            max_time = None if res["max_time_s"] is None else float(res["max_time_s"])
            threads = None if res["threads"] is None else int(res["threads"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid resources {record.resources!r}: {exc}") from exc
        if cpus < 1 or gpus < 0 or (memory is not None and memory <= 0) \
                or (max_time is not None and max_time <= 0) or (threads is not None
                                                                and threads < 1):
            raise ValueError(f"invalid resources {record.resources!r}: cpus and threads must "
                             "be >= 1, gpus >= 0, memory_bytes and max_time_s > 0")
        return Launch(job_id=record.id, job_dir=self.job_dir(record.id), cpus=cpus,
                      memory_bytes=memory, gpus=gpus, max_time_s=max_time, threads=threads,
                      env={"MLAAS_JOB_ID": record.id,
                           "MLAAS_JOB_ATTEMPT": str(record.attempts + 1),
                           **existing_token_env(self.job_dir(record.id))})

    def _admit(self) -> None:
        queued = self.store.queued_jobs()
        if not queued:
            return
        capacity = self.executor.capacity()
        launches: list[Launch] = []
        records: dict[str, JobRecord] = {}
        for record in queued:
            if not (self.job_dir(record.id) / PIPELINE_FILE).is_file():
                break  # submit() is still writing it; FIFO waits for the head
            try:
                launch = self._launch(record)
            except ValueError as exc:
                self._reject(record, str(exc))
                continue
            if launch.cpus > capacity["cpus"] or launch.gpus > capacity["gpus"]:
                self._reject(record, f"asks for {launch.cpus} CPU(s) and {launch.gpus} GPU(s); "
                                     f"this executor has {capacity['cpus']} CPU(s) and "
                                     f"{capacity['gpus']} GPU(s)")
                continue
            launches.append(launch)
            records[record.id] = record
        by_id = {launch.job_id: launch for launch in launches}
        for job_id in self.admit(launches, self.executor.free()):
            self._start(records[job_id], by_id[job_id])

    def _reject(self, record: JobRecord, reason: str) -> None:
        self.store.transition(record.id, {JobState.QUEUED}, JobState.FAILED, finished_at=_now(),
                              reason=f"cannot run: {reason}")

    def _start(self, record: JobRecord, launch: Launch) -> None:
        running = self.store.transition(record.id, {JobState.QUEUED}, JobState.RUNNING,
                                        started_at=_now(), attempts=record.attempts + 1,
                                        node=getattr(self.executor, "node", "local"), exit_code=None, cancel_requested=False)
        if running is None:
            return  # cancelled meanwhile
        (launch.job_dir / EXIT_FILE).unlink(missing_ok=True)
        try:
            devices = self.executor.start(launch)
        except Exception as exc:  # noqa: BLE001 - any start failure fails this job only
            log.warning("job %s could not be started: %s", record.id, exc)
            self._fail(running, f"could not start the job process: {type(exc).__name__}: {exc}",
                       {})
            return
        if devices:
            self.store.update_job(record.id, devices=tuple(devices))
        if self.store.get_job(record.id).cancel_requested:  # cancelled while starting
            self.executor.terminate(record.id, grace_s=self.grace_s, kill=True)

    # -- files --------------------------------------------------------------------------------

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _log_tail(self, job_id: str) -> str:
        return read_log_tail(self.job_dir(job_id) / "job.log")
