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
3. schedule: the pure policy (:mod:`mlaas.platform.scheduler`) reads the
   manager's one :class:`~mlaas.platform.scheduler.Snapshot` and returns
   decisions; each ``Preempt`` is applied first (SIGTERM; the job checkpoints,
   exits 75, goes ``preempted -> queued`` and resumes when admitted again),
   then each ``Admit`` (``queued -> running`` in the store, then
   ``executor.start`` on the node the policy chose).

The snapshot lives as long as the manager and follows every change as it
happens: a job queued (the store's queued jobs, checked each tick, so jobs
queued by :meth:`recover` or another path join too), started, ended,
cancelled, its checkpoints (an epoch reported in ``progress.json`` is a
checkpoint), nodes joining and leaving (the Ray executor's ``nodes()``, read
each tick). Queues, flavors and the policy come from the configuration
(:mod:`mlaas.platform.farm`); :meth:`JobManager.set_queues` replaces the
queues at runtime.

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

from mlaas.errors import Conflict, MlaasError, NotFound, SpecError
from mlaas.platform.auth.jobtoken import existing_token_env
from mlaas.platform.authz import authorize
from mlaas.platform.config import CPU_FLAVOR, FlavorConfig, QueueConfig
from mlaas.platform.executors.base import Executor, Exited, Launch, read_log_tail
from mlaas.platform.farm import (Request, check_admissible, choose_queue, local_node,
                                 parse_request, resolve_priority, scheduler_flavors,
                                 scheduler_queues)
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
from mlaas.platform.records import FINAL_STATES, JobRecord, JobState, Store
from mlaas.platform.scheduler import (Admit, Flavor, Node, PolicyConfig, Snapshot,
                                      Workload, policy, run_cycle)

__all__ = ["JobManager", "fifo_admit", "AdmitPolicy", "BUNDLE_NAME", "DEFAULT_RESOURCES"]

log = logging.getLogger("mlaas.platform.manager")

BUNDLE_NAME = "bundle.tar.gz"

DEFAULT_RESOURCES: dict[str, Any] = {"cpus": 1, "gpus": 0, "memory": None,
                                     "memory_bytes": None, "max_time_s": None, "threads": None}
"""What a job gets when neither its ``resources`` nor the manager's ``defaults`` say."""

AdmitPolicy = Callable[[Sequence[Launch], Mapping[str, Any]], list[str]]
"""``(queued launches in queue order, executor.free()) -> job ids to start now, in order``."""


def fifo_admit(queued: Sequence[Launch], free: Mapping[str, Any]) -> list[str]:
    """Strict FIFO over launches: admit from the head while the head fits.

    The manager's admission before the scheduler; kept as a small pure
    reference (the scheduler's ``fifo`` policy with one StrictFIFO queue
    decides the same).

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


NODE_LOST = "node lost:"
"""How an executor's ``Exited.reason`` starts for a job whose node went away: requeued."""

NODE_QUARANTINE_S = 60.0
"""How long a node that lost a job is left out of scheduling (Ray notices death late)."""


def _default_policy() -> PolicyConfig:
    return policy("fair")


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
        queues (list of QueueConfig): the queues; none: one ``default`` queue for
            everybody without limits (:func:`mlaas.platform.farm.scheduler_queues`).
        flavors (list of FlavorConfig): device flavors besides ``cpu`` and ``gpu_flavor``.
        gpu_flavor (str): the flavor of a local executor's GPUs (and of a plain
            ``gpus: N`` request).
        policy (PolicyConfig or None): the scheduling policy (default ``fair``).
        node_name (str): the name of the local executor's one node.
    """

    def __init__(self, store: Store, storage: Any, executor: Executor, registry: Any, *,
                 poll_interval: float = 0.5, grace_s: float = 10.0,
                 on_success: Callable[[JobRecord], None] | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 queues: Sequence[QueueConfig] = (), flavors: Sequence[FlavorConfig] = (),
                 gpu_flavor: str = "gpu", policy: PolicyConfig | None = None,
                 node_name: str = "local") -> None:
        self.store = store
        self.storage = storage
        self.executor = executor
        self.registry = registry
        self.poll_interval = poll_interval
        self.grace_s = grace_s
        self.on_success = on_success
        self.defaults = {**DEFAULT_RESOURCES,
                         **{k: v for k, v in (defaults or {}).items() if k in DEFAULT_RESOURCES}}
        self.gpu_flavor = gpu_flavor
        self.policy = policy if policy is not None else _default_policy()
        self.node_name = node_name
        self._flavor_cfg = list(flavors)
        self._queue_cfg = list(queues)
        self._flavors = scheduler_flavors(gpu_flavor, flavors)
        self.snapshot = Snapshot((), scheduler_queues(self._queue_cfg,
                                                      (f.name for f in self._flavors)),
                                 flavors=self._flavors, half_life=self.policy.half_life_s)
        self._requests: dict[str, Request] = {}  # job id -> its parsed request (pending/running)
        self._seen_epoch: dict[str, Any] = {}
        self._elastic = callable(getattr(executor, "nodes", None))
        self._quarantined: dict[str, float] = {}  # node -> monotonic time it may come back
        self._history_loaded = False
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen_progress: dict[str, tuple[int, int]] = {}
        self._unfinished: list[Exited] = []  # ended jobs whose new state is not stored yet
        if not self._elastic:
            self._sync_nodes()  # this machine: known at once (a Ray pool at the first tick)

    # -- paths -----------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """The job's directory in platform storage (created)."""
        return Path(self.storage.job_dir(job_id))

    # -- the API's entry points ---------------------------------------------------------

    def submit(self, *, principal: Principal, name: str, spec: dict[str, Any],
               model_name: str | None = None, resources: Mapping[str, Any] | None = None,
               priority: int | str | None = 0, queue: str | None = None,
               visibility: str = "private", group: str | None = None,
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
            resources: ``cpus``, ``gpus`` (a count of ``gpu_flavor``, or
                ``{flavor: count}``), ``memory`` (GiB, for placement),
                ``memory_bytes``, ``max_time_s``, ``threads`` (missing keys come
                from the manager's ``defaults``).
            priority: an integer, or a priority class name of the queue.
            queue: the queue (one of the principal's groups'; admins may use
                any); None: the first queue of the principal's groups.
            visibility, group: who may read the job (and, on its first
                registration, its model): ``private``, ``group`` (members of
                ``group``) or ``public``; ``group`` defaults to
                ``principal.primary_group`` (the API checks membership, see
                :mod:`mlaas.platform.visibility`).

        Raises :class:`~mlaas.errors.SpecError` (``resources.queue``,
        ``resources.priority``, ``resources.gpus``) for an unknown queue or
        priority class, or a flavor the queue has no quota for, and
        :class:`~mlaas.errors.Forbidden` for a queue of another group.
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
        with self._lock:
            chosen = choose_queue(principal, queue, self._queues())
        rank = resolve_priority(priority, chosen)
        try:
            request = parse_request(self._merged(resources or {}), self.gpu_flavor)
        except ValueError:
            request = None  # refused at admission, with the reason on the job
        if request is not None:
            check_admissible(request, chosen)
        record = self.store.create_job(name=name, owner=principal.user,
                                       group=group or principal.primary_group, spec=spec,
                                       model_name=model, resources=dict(resources or {}),
                                       priority=rank, queue=chosen.name, visibility=visibility)
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
                with self._lock:
                    if job_id in self.snapshot.pending:
                        self.snapshot.remove_pending(job_id)
                        self._requests.pop(job_id, None)
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
                self._release(exited.job_id)  # the process is gone: its slots are free
                if exited.exit_code is None and exited.reason.startswith(NODE_LOST):
                    self._quarantine(exited.reason[len(NODE_LOST):].strip().split(" ")[0])
                try:
                    self._finish(exited)
                except Exception:  # noqa: BLE001 - the executor reports an exit only once
                    log.exception("recording the end of job %s failed; retrying next cycle",
                                  exited.job_id)
                    self._unfinished.append(exited)
            self._record_progress()
            self._sync_nodes()
            self._sync_pending()
            self._schedule()

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
                    self._release(exited.job_id)
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
            self._sync_nodes()
            self._load_usage_history()
            for record in self.store.list_jobs(state=JobState.RUNNING):
                if record.id in ours and record.id not in self.snapshot.running:
                    self._adopt(record)
            self._sync_pending()
        return changed

    # -- finishing ----------------------------------------------------------------------

    def _finish(self, exited: Exited, *, requeue_unknown: bool = False) -> JobRecord | None:
        """Map one ended process to the job's next state and account the attempt's end."""
        result = self._finish_job(exited, requeue_unknown=requeue_unknown)
        self._account_end(exited, result)
        return result

    def _finish_job(self, exited: Exited, *, requeue_unknown: bool = False) -> JobRecord | None:
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
        lost = code is None and exited.reason.startswith(NODE_LOST)
        if code in (EXIT_PREEMPTED, -signal.SIGTERM) or (code is None and requeue_unknown) \
                or lost:
            # a lost node (Ray executor): the job resumes from its checkpoint elsewhere
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
            # a new model name starts with the job's group and visibility (an existing one
            # keeps its own: only PUT /api/models/{name}/visibility changes that)
            self.store.ensure_model(record.model_name, owner=record.owner, group=record.group,
                                    visibility=record.visibility)
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
                epoch = data.get("epoch")  # an epoch's end is a checkpoint (checkpoint_every)
                if epoch is not None and epoch != self._seen_epoch.get(job_id) \
                        and job_id in self.snapshot.running:
                    self._seen_epoch[job_id] = epoch
                    self.snapshot.update_checkpoint(job_id, st.st_mtime)

    # -- the scheduler's state ------------------------------------------------------------

    def _queues(self) -> dict[str, Any]:
        return {name: qs.queue for name, qs in self.snapshot.queues.items()}

    def _merged(self, resources: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **{k: v for k, v in resources.items() if v is not None}}

    def _nodes_now(self) -> list[Node]:
        """The pool: the Ray executor's live nodes, or this machine as one node."""
        if self._elastic:
            out = []
            for info in self.executor.nodes():  # type: ignore[attr-defined]
                out.append(Node(info.name, {CPU_FLAVOR: int(info.cpus), **info.flavors},
                                cpus=float(info.cpus), memory=float(info.memory_gib)))
            return out
        cap = self.executor.capacity()
        return [local_node(self.node_name, int(cap["cpus"]), self.gpu_flavor, int(cap["gpus"]))]

    def _quarantine(self, node: str) -> None:
        """A node that lost a job leaves the snapshot for ``NODE_QUARANTINE_S`` seconds:
        Ray may still list it alive for a while, and nothing must be started there."""
        if not self._elastic or not node:
            return
        self._quarantined[node] = time.monotonic() + NODE_QUARANTINE_S
        if node in self.snapshot.nodes:
            for lost in self.snapshot.remove_node(node):
                self._requests.pop(lost.workload.id, None)
            log.info("node %s lost a job: left out of scheduling for %g s", node,
                     NODE_QUARANTINE_S)

    def _sync_nodes(self) -> None:
        """Nodes that joined, left or changed since the last tick update the snapshot.

        A node's running jobs are released when it leaves; the executor reports
        them as ended (``node lost``) and they are requeued from there.
        """
        if self.snapshot.nodes and not self._elastic:
            return  # the local node does not change
        try:
            nodes = {n.name: n for n in self._nodes_now()}
        except MlaasError as exc:
            log.warning("cannot list the executor's nodes (kept the last known): %s", exc)
            return
        now = time.monotonic()
        for name, until in list(self._quarantined.items()):
            if until <= now:
                del self._quarantined[name]
            else:
                nodes.pop(name, None)
        snap = self.snapshot
        for name in sorted(set(snap.nodes) - set(nodes)):
            for lost in snap.remove_node(name):
                self._requests.pop(lost.workload.id, None)
            log.info("node %s left the pool", name)
        for name, node in sorted(nodes.items()):
            known = snap.nodes.get(name)
            if known is not None and dict(known.node.gpus) == dict(node.gpus) \
                    and known.node.cpus == node.cpus:
                continue
            if known is not None:
                if known.running:
                    continue  # changed under running jobs: wait until they are gone
                snap.remove_node(name)
            new_flavor = False
            for flavor in node.gpus:
                if snap.flavors is not None and flavor not in snap.flavors:
                    log.warning("node %s offers flavor %r, which is not configured (flavors:)"
                                "; queues need a quota for it to use it", name, flavor)
                    snap.flavors[flavor] = Flavor(flavor)
                    new_flavor = True
            snap.add_node(node)
            log.info("node %s joined the pool: %s", name, dict(node.gpus))
            if new_flavor and not self._queue_cfg:
                self.set_queues([])  # the default queue takes every flavor, new ones too
                snap = self.snapshot

    def _workload(self, record: JobRecord, request: Request) -> Workload:
        queued_at = time.time() if record.attempts > 0 else None
        return Workload(record.id, record.queue or "", record.owner, request.flavors,
                        submitted_at=record.created_at.timestamp(), cpus=float(request.cpus),
                        memory=request.memory_gib, priority=int(record.priority or 0),
                        queued_at=queued_at)

    def _check(self, record: JobRecord) -> tuple[JobRecord, Request] | str:
        """The job's queue and request, or why it can never run here."""
        try:
            request = parse_request(self._merged(record.resources or {}), self.gpu_flavor)
        except ValueError as exc:
            return str(exc)
        queues = self._queues()
        if record.queue is None:  # queued before queues existed: its owner's queue
            try:
                default = choose_queue(Principal(record.owner, (record.group,)), None, queues)
            except MlaasError as exc:
                return exc.message
            record = self.store.update_job(record.id, queue=default.name)
        queue = queues.get(record.queue or "")
        if queue is None:
            return f"queue {record.queue!r} is not configured (queues: {', '.join(queues)})"
        try:
            check_admissible(request, queue)
        except SpecError as exc:
            return exc.message
        if not self._elastic:
            cap = self.executor.capacity()
            local = {CPU_FLAVOR: int(cap["cpus"])}
            if cap["gpus"]:
                local[self.gpu_flavor] = int(cap["gpus"])
            if any(n > local.get(f, 0) for f, n in request.flavors.items()):
                gpus = ", ".join(f"{n} {f}" for f, n in sorted(request.gpus.items()))
                return (f"asks for {request.cpus} CPU(s) and {request.gpu_count} GPU(s)"
                        f"{f' ({gpus})' if gpus and set(request.gpus) != {self.gpu_flavor} else ''}"
                        f"; this executor has {cap['cpus']} CPU(s) and {cap['gpus']} GPU(s)"
                        f"{f' ({self.gpu_flavor})' if cap['gpus'] else ''}")
        return record, request

    def _sync_pending(self) -> None:
        """Queued jobs of the store join the snapshot; jobs no longer queued leave it."""
        snap = self.snapshot
        queued: set[str] = set()
        for record in self.store.queued_jobs():
            queued.add(record.id)
            if record.id in snap.pending or record.id in snap.running:
                continue
            if not (self.job_dir(record.id) / PIPELINE_FILE).is_file():
                continue  # submit() is still writing it
            checked = self._check(record)
            if isinstance(checked, str):
                self._reject(record, checked)
                continue
            record, request = checked
            self._requests[record.id] = request
            snap.add_pending(self._workload(record, request))
        for job_id in [j for j in snap.pending if j not in queued]:
            snap.remove_pending(job_id)  # cancelled, or changed by another path
            self._requests.pop(job_id, None)

    def _release(self, job_id: str) -> None:
        if job_id in self.snapshot.running:
            self.snapshot.stop(job_id, time.time())
        self._requests.pop(job_id, None)
        self._seen_epoch.pop(job_id, None)

    def _load_usage_history(self) -> None:
        """Fair share remembers past work across a restart: each finished job's last
        attempt (devices and CPU slots times its run time) is charged to its owner at
        its end, oldest first; jobs older than ten half-lives weigh nothing and are
        skipped. Only once per manager."""
        if self._history_loaded:
            return
        self._history_loaded = True
        now = time.time()
        horizon = now - 10 * self.policy.half_life_s
        charges: list[tuple[float, str, float]] = []
        for record in self.store.list_jobs():
            if not record.final or record.started_at is None or record.finished_at is None:
                continue
            end = record.finished_at.timestamp()
            if end < horizon:
                continue
            try:
                request = parse_request(self._merged(record.resources or {}), self.gpu_flavor)
            except ValueError:
                continue
            seconds = max(0.0, end - record.started_at.timestamp())
            charges.append((min(end, now), record.owner,
                            seconds * sum(request.flavors.values())))
        for at, user, amount in sorted(charges):
            if amount > 0:
                self.snapshot.usage.charge(user, amount, at)

    def _adopt(self, record: JobRecord) -> None:
        """A job this executor still runs (a manager restarted in the same process):
        it holds its slots in the snapshot again."""
        checked = self._check(record)
        if isinstance(checked, str):
            return
        record, request = checked
        node = record.node if record.node in self.snapshot.nodes else None
        if node is None:
            node_of = getattr(self.executor, "node_of", None)
            node = node_of(record.id) if callable(node_of) else self.node_name
        ns = self.snapshot.nodes.get(node or "")
        if ns is None or any(ns.free_count.get(f, 0) < n for f, n in request.flavors.items()):
            log.warning("running job %s does not fit its node %s in the snapshot", record.id,
                        node)
            return
        devices = {f: tuple(ns.free[f][:n]) for f, n in request.flavors.items()}
        self._requests[record.id] = request
        self.snapshot.add_pending(self._workload(record, request))
        started = record.started_at.timestamp() if record.started_at else time.time()
        self.snapshot.start(record.id, ns.node.name, devices, started)

    # -- admission --------------------------------------------------------------------------

    def _schedule(self) -> None:
        """One scheduling cycle: apply its preemptions, then its admissions."""
        snap = self.snapshot
        if not snap.pending:
            return
        now = time.time()
        result = run_cycle(snap, now=now, config=self.policy)
        for d in result.preempted:
            log.info("preempting job %s: %s", d.workload.id, d.reason)
            snap.mark_terminating(d.workload.id)
            self._log_line(d.workload.id, f"preempted by the scheduler: {d.reason}")
            self.preempt(d.workload.id)
        for admit in result.admitted:
            self._start(admit, now)

    def _launch(self, record: JobRecord, request: Request) -> Launch:
        """The executor request of a job."""
        return Launch(job_id=record.id, job_dir=self.job_dir(record.id), cpus=request.cpus,
                      memory_bytes=request.memory_bytes, gpus=request.gpu_count,
                      max_time_s=request.max_time_s, threads=request.threads,
                      env={"MLAAS_JOB_ID": record.id,
                           "MLAAS_JOB_ATTEMPT": str(record.attempts + 1),
                           **existing_token_env(self.job_dir(record.id))})

    def _reject(self, record: JobRecord, reason: str) -> None:
        self.store.transition(record.id, {JobState.QUEUED}, JobState.FAILED, finished_at=_now(),
                              reason=f"cannot run: {reason}")

    def _start(self, admit: Admit, now: float) -> None:
        snap = self.snapshot
        job_id = admit.workload.id
        request = self._requests.get(job_id)
        record = self.store.get_job(job_id)
        if request is None or record.state is not JobState.QUEUED:
            if job_id in snap.pending:
                snap.remove_pending(job_id)
            return
        running = self.store.transition(job_id, {JobState.QUEUED}, JobState.RUNNING,
                                        started_at=_now(), attempts=record.attempts + 1,
                                        node=admit.node, exit_code=None,
                                        cancel_requested=False)
        if running is None:  # cancelled meanwhile
            snap.remove_pending(job_id)
            self._requests.pop(job_id, None)
            return
        snap.start(job_id, admit.node, dict(admit.devices), now)
        launch = self._launch(record, request)
        (launch.job_dir / EXIT_FILE).unlink(missing_ok=True)
        try:
            if self._elastic:
                devices = self.executor.start(  # type: ignore[call-arg]
                    launch, node=admit.node,
                    devices={f: i for f, i in admit.devices.items() if f != CPU_FLAVOR})
            else:
                devices = self.executor.start(launch)
        except Conflict as exc:  # the node went or changed under us: wait for another start
            log.warning("job %s could not be started on node %s, requeued: %s", job_id,
                        admit.node, exc)
            self._release(job_id)
            if NODE_LOST in str(exc):
                self._quarantine(admit.node)
            back = self.store.transition(job_id, {JobState.RUNNING}, JobState.PREEMPTED,
                                         attempts=record.attempts, started_at=record.started_at,
                                         node=record.node,
                                         reason=f"not started on node {admit.node}: "
                                                f"{exc.message}; waits for another node")
            if back is not None:
                self.store.transition(job_id, {JobState.PREEMPTED}, JobState.QUEUED)
            return
        except Exception as exc:  # noqa: BLE001 - any start failure fails this job only
            log.warning("job %s could not be started: %s", job_id, exc)
            self._release(job_id)
            self._fail(running, f"could not start the job process: {type(exc).__name__}: {exc}",
                       {})
            return
        if devices:
            self.store.update_job(job_id, devices=tuple(devices))
        self._account_start(running, admit.node, admit.devices, launch.cpus)
        if self.store.get_job(job_id).cancel_requested:  # cancelled while starting
            self.executor.terminate(job_id, grace_s=self.grace_s, kill=True)

    # -- queues and views (the API's) ---------------------------------------------------------

    @property
    def queue_config(self) -> list[QueueConfig]:
        """The configured queues (empty: the one default queue)."""
        return list(self._queue_cfg)

    @property
    def known_flavors(self) -> set[str]:
        with self._lock:
            return set(self.snapshot.flavors or ()) | {f.name for f in self._flavors}

    def set_queues(self, queues: Sequence[QueueConfig]) -> None:
        """Replace the queues at runtime (validated by the caller, see
        :func:`mlaas.platform.farm.validate_queues`).

        Raises :class:`~mlaas.errors.Conflict` naming a queue that would go
        while jobs are pending or running in it.
        """
        with self._lock:
            old = self.snapshot
            new_queues = scheduler_queues(list(queues), old.flavors or ())
            names = {q.name for q in new_queues}
            busy: dict[str, int] = {}
            for w in [*old.pending.values(), *(r.workload for r in old.running.values())]:
                if w.queue not in names:
                    busy[w.queue] = busy.get(w.queue, 0) + 1
            if busy:
                raise Conflict("queues with pending or running jobs cannot be removed: " +
                               ", ".join(f"{q} ({n} job(s))" for q, n in sorted(busy.items())))
            snap = Snapshot((), new_queues, flavors=list(old.flavors.values())
                            if old.flavors is not None else None, usage=old.usage)
            for ns in old.nodes.values():
                snap.add_node(ns.node)
            for w in old.pending.values():
                snap.add_pending(w)
            for r in old.running.values():
                snap.add_pending(r.workload)
                snap.start(r.workload.id, r.node, dict(r.devices), r.started_at,
                           checkpoint_at=r.checkpoint_at)
                if r.terminating:
                    snap.mark_terminating(r.workload.id)
            self.snapshot = snap
            self._queue_cfg = list(queues)
        self._wake.set()

    def may_use(self, principal: Principal, queue: str) -> bool:
        from mlaas.platform.farm import may_use

        with self._lock:
            q = self.snapshot.queues.get(queue)
            return q is not None and may_use(principal, q.queue)

    def queues_view(self, *, with_jobs: bool = False) -> list[dict[str, Any]]:
        """Each queue: definition, quotas (``null`` nominal: unlimited), usage, counts;
        ``with_jobs`` adds the ids of its pending and running jobs."""
        from mlaas.platform.farm import UNLIMITED

        with self._lock:
            snap = self.snapshot
            running: dict[str, list[str]] = {}
            for r in snap.running.values():
                running.setdefault(r.workload.queue, []).append(r.workload.id)
            out = []
            for name, qs in snap.queues.items():
                q = qs.queue
                entry: dict[str, Any] = {
                    "name": name, "group": q.group, "cohort": q.cohort, "strategy": q.strategy,
                    "priority_classes": dict(q.priority_classes),
                    "preempt_within_queue": q.preempt_within_queue,
                    "quotas": {f: {"nominal": None if c.nominal >= UNLIMITED else c.nominal,
                                   "borrowing_limit": c.borrowing_limit}
                               for f, c in sorted(q.quotas.items())},
                    "usage": {f: n for f, n in sorted(qs.usage.items()) if n},
                    "pending": qs.pending_count, "running": len(running.get(name, [])),
                }
                if with_jobs:
                    entry["pending_jobs"] = [j for _, j in qs.by_queued]
                    entry["running_jobs"] = sorted(running.get(name, []))
                out.append(entry)
            return out

    def nodes_view(self, *, with_jobs: bool = False) -> list[dict[str, Any]]:
        """Each node: its flavors (capacity, free), CPUs, memory and running jobs."""
        with self._lock:
            out = []
            for name, ns in sorted(self.snapshot.nodes.items()):
                entry: dict[str, Any] = {
                    "name": name, "cpus": ns.node.cpus, "free_cpus": ns.free_cpus,
                    "memory_gib": round(ns.node.memory, 3),
                    "flavors": {f: {"capacity": n, "free": ns.free_count.get(f, 0)}
                                for f, n in sorted(ns.node.gpus.items())},
                    "running": len(ns.running),
                }
                if with_jobs:
                    entry["running_jobs"] = sorted(ns.running)
                out.append(entry)
            return out

    def scaling_view(self) -> dict[str, Any]:
        """The signal for an external provisioner (docs/scheduler.md, Scaling).

        ``pending``: devices per flavor wanted by jobs that fit their quota but
        find no node with room now (more nodes would start them);
        ``unplaceable``: jobs larger than any node of the pool; ``idle_nodes``:
        nodes running nothing; ``drainable_nodes``: idle nodes none of whose
        flavors are wanted by waiting jobs (safe to remove).
        """
        with self._lock:
            snap = self.snapshot
            from mlaas.platform.scheduler.admission import Work, check_quota

            work = Work.of(snap)
            demand: dict[str, int] = {}
            waiting = 0
            for w in snap.pending.values():
                fits_now = any(all(ns.free_count.get(f, 0) >= n for f, n in w.gpus.items())
                               for ns in snap.nodes.values())
                fits_ever = any(all(ns.node.gpus.get(f, 0) >= n for f, n in w.gpus.items())
                                for ns in snap.nodes.values())
                if fits_now or not fits_ever:
                    continue  # starts at the next tick, or counted as unplaceable below
                if self.policy.quotas and not check_quota(snap.queues[w.queue].queue, w,
                                                          work).ok:
                    continue  # its quota says no: more nodes would not start it
                waiting += 1
                for f, n in w.gpus.items():
                    demand[f] = demand.get(f, 0) + n
            unplaceable = []
            for w in snap.pending.values():
                if not any(all(ns.node.gpus.get(f, 0) >= n for f, n in w.gpus.items())
                           for ns in snap.nodes.values()):
                    unplaceable.append({"job_id": w.id, "queue": w.queue, "wants": dict(w.gpus)})
                    for f, n in w.gpus.items():
                        demand[f] = demand.get(f, 0) + n
            idle = sorted(n for n, ns in snap.nodes.items() if not ns.running)
            wanted = {f for f, n in demand.items() if n and f != CPU_FLAVOR}
            drainable = [n for n in idle if not wanted & {
                f for f in snap.nodes[n].node.gpus if f != CPU_FLAVOR}]
            if demand.get(CPU_FLAVOR) and not wanted:
                drainable = []  # CPU work waits: any node would help
            return {"pending": dict(sorted(demand.items())), "waiting_jobs": waiting,
                    "unplaceable": sorted(unplaceable, key=lambda u: u["job_id"]),
                    "pending_jobs": len(snap.pending), "running_jobs": len(snap.running),
                    "capacity": {f: n for f, n in sorted(snap.capacity.items()) if n},
                    "free": {f: n for f, n in sorted(snap.free_total.items()) if n},
                    "idle_nodes": idle, "drainable_nodes": drainable}

    # -- accounting (mlaas.platform.accounting): a failure is logged, never breaks a job -----

    accounting: Any = None
    """The :class:`~mlaas.platform.accounting.Accounting` told of each attempt (None: none)."""

    def _account_start(self, running: JobRecord, node: str, devices: Mapping[str, Any],
                       cpus: float) -> None:
        if self.accounting is None:
            return
        try:
            held = {f: len(ix) for f, ix in devices.items() if f != CPU_FLAVOR}
            self.accounting.attempt_started(running, node=node, devices=held, cpus=cpus)
        except Exception:  # noqa: BLE001 - accounting must not stop a started job
            log.exception("accounting the start of job %s failed", running.id)

    def _account_end(self, exited: Exited, result: JobRecord | None) -> None:
        if self.accounting is None:
            return
        try:
            state = result.state if result is not None else \
                self.store.get_job(exited.job_id).state
            outcome = state.value if state in FINAL_STATES else \
                "lost" if exited.exit_code is None else "preempted"
            self.accounting.attempt_ended(exited.job_id, outcome)
        except Exception:  # noqa: BLE001 - nor the end of one
            log.exception("accounting the end of job %s failed", exited.job_id)

    # -- files --------------------------------------------------------------------------------

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _log_line(self, job_id: str, text: str) -> None:
        """One ``[mlaas]`` line in the job's log, so its owner reads why it stopped."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            with open(self.job_dir(job_id) / "job.log", "a") as fh:
                fh.write(f"[mlaas] {stamp} job {job_id} {text}\n")
        except OSError as exc:
            log.warning("cannot write to the log of job %s: %s", job_id, exc)

    def _log_tail(self, job_id: str) -> str:
        return read_log_tail(self.job_dir(job_id) / "job.log")
