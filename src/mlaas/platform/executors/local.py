"""The local executor: each job a child process of the server, on this machine.

Layer: platform (executors). Implements :class:`mlaas.platform.executors.base.Executor`.

Each job runs ``[python, "-m", "mlaas.platform.jobrun", JOB_DIR]`` (an argument
list, never a shell, nothing built from user input) in a new session (its
own process group), with ``cwd = JOB_DIR`` and stdout and stderr appended to
``JOB_DIR/job.log``. Its environment is built from scratch:

- from the server only the names in :data:`PASSED_ENV` (``PATH``, ``LANG``, ...)
  plus ``pass_env`` given by the operator; ``PYTHONPATH`` only when the server
  has one;
- ``HOME = JOB_DIR``, ``TMPDIR = JOB_DIR/tmp``, ``PYTHONUNBUFFERED = 1``;
- ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
  ``NUMEXPR_NUM_THREADS``, ``MLAAS_JOB_CPUS`` = ``Launch.threads``, by default
  the job's CPU slots (the job process also calls ``torch.set_num_threads``);
- ``CUDA_VISIBLE_DEVICES`` = the devices assigned, the empty string when none,
  so a job never sees a GPU it was not given;
- every name matching :data:`SECRET_ENV` (``*TOKEN*``, ``*SECRET*``,
  ``*PASSWORD*``, ``MLAAS_DB*``, ``AWS_*``, ...) is dropped, even when listed;
  the one exception is ``BEARER_TOKEN_FILE`` from ``Launch.env`` (the path of
  the job's own token file, see :mod:`mlaas.platform.auth.jobtoken`).

Limits:

- CPU: slots out of ``cpus``; a job's thread pools are sized to its slots.
- GPU: devices out of the configured list, assigned in list order.
- Wall time: checked by :meth:`LocalExecutor.poll`; SIGTERM (the job
  checkpoints) then SIGKILL of its process group after ``limit_grace_s``;
  reason ``wall time exceeded``.
- Memory: an RSS watchdog in :meth:`LocalExecutor.poll` sums the resident set
  of the job process and all its descendants (DataLoader workers included)
  and SIGKILLs the process group above the limit; reason ``memory limit
  exceeded``. ``RLIMIT_AS`` is not used because torch and CUDA reserve far
  more address space than they touch, and ``RLIMIT_DATA`` is per process (a
  job with workers could use N times its limit) and makes torch fail inside
  an allocation with an error that does not say "limit". The watchdog's price:
  it samples once per poll, so a spike shorter than the poll interval passes,
  and pages shared between the job and its workers are counted once per
  process (the sum errs on the high side).

Processes are started from one long-lived thread owned by the executor, not
from the caller's thread: the job asks the kernel for SIGTERM when its parent
dies (``PR_SET_PDEATHSIG``), and Linux means the parent *thread*; a manager
loop thread that stops must not stop the jobs it started.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from mlaas.errors import Conflict, PlatformError
from mlaas.platform.executors.base import (
    LIMIT_MEMORY,
    LIMIT_WALL_TIME,
    Exited,
    Launch,
    read_log_tail,
)

__all__ = ["LocalExecutor", "PASSED_ENV", "SECRET_ENV", "THREAD_ENV", "job_environment",
           "assign_devices", "describe_exit"]

PASSED_ENV = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ",
              "PYTHONPATH", "SSL_CERT_FILE", "SSL_CERT_DIR")
"""Names copied from the server's environment into every job's (when set)."""

SECRET_ENV = re.compile(
    r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|AUTH|COOKIE|SESSION|DSN|"
    r"^MLAAS_DB|^MLAAS_JWT|^DATABASE_URL|^PG|^AWS_|^AZURE_|^GOOGLE_|^GCP_|^GH_|^GITHUB_|"
    r"^REDIS|^X509_USER_PROXY$|^KRB5",
    re.IGNORECASE)
"""Environment names never given to a job, whatever else says so."""

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "MLAAS_JOB_CPUS")

def assign_devices(free: Sequence[str], n: int) -> list[str]:
    """The first ``n`` free devices in configured order; raises Conflict when too few."""
    if n < 0:
        raise ValueError(f"a job cannot ask for {n} GPUs")
    if n > len(free):
        raise Conflict(f"{n} GPU(s) requested, {len(free)} free ({', '.join(free) or 'none'})")
    return list(free[:n])


def job_environment(launch: Launch, devices: Sequence[str], *,
                    server_env: Mapping[str, str] | None = None,
                    pass_env: Sequence[str] = ()) -> dict[str, str]:
    """The whole environment of one job process (see the module docstring).

    Args:
        launch: the job; ``launch.env`` is added last (secrets still dropped).
        devices: the GPU devices assigned (``CUDA_VISIBLE_DEVICES``).
        server_env: the server's environment (default ``os.environ``).
        pass_env: extra names the operator wants passed through.
    """
    source = os.environ if server_env is None else server_env
    env: dict[str, str] = {}
    for name in (*PASSED_ENV, *pass_env):
        if name in source:
            env[name] = source[name]
    env.setdefault("PATH", os.defpath)
    job_dir = str(launch.job_dir)
    env.update({"HOME": job_dir, "TMPDIR": str(launch.job_dir / "tmp"),
                "PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1",
                "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": ",".join(devices),
                "MLAAS_JOB_ID": launch.job_id,
                "MLAAS_JOB_PARENT_PID": str(os.getpid())})
    threads = launch.threads if launch.threads is not None else launch.cpus
    for name in THREAD_ENV:
        env[name] = str(max(1, threads))
    env.update(launch.env)
    kept = {k: v for k, v in env.items() if not SECRET_ENV.search(k)}
    if "BEARER_TOKEN_FILE" in launch.env:  # a path to the job's 0600 token file, not a secret
        kept["BEARER_TOKEN_FILE"] = launch.env["BEARER_TOKEN_FILE"]
    return kept


def describe_exit(returncode: int | None) -> str:
    """``exited with code 1``, ``killed by signal SIGKILL (9)``, ``exit status unknown``."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {name} ({-returncode})"
    if returncode == 75:
        return "exited with code 75 (preempted: checkpoint written)"
    return f"exited with code {returncode}"


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass
class _Job:
    launch: Launch
    proc: subprocess.Popen[bytes]
    started: float
    devices: list[str]
    log_path: Path
    kill_at: float | None = None
    terminated: bool = False
    limit: str | None = None
    limit_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class LocalExecutor:
    """Jobs as child processes of this server, with CPU and GPU slots.

    Args:
        cpus (int): CPU slots to hand out (a job takes ``Launch.cpus``).
        gpu_devices (list of str): device ids for ``CUDA_VISIBLE_DEVICES``, in the
            order they are handed out (``["0", "1"]``; UUIDs work too).
        python (str): the interpreter that runs ``mlaas.platform.jobrun``.
        pass_env (list of str): extra server environment names to pass to jobs
            (names matching :data:`SECRET_ENV` are still dropped).
        limit_grace_s (float): seconds between SIGTERM and SIGKILL for a job over
            its wall time.
    """

    def __init__(self, *, cpus: int, gpu_devices: Sequence[str] = (),
                 python: str = sys.executable, pass_env: Sequence[str] = (),
                 limit_grace_s: float = 10.0) -> None:
        if cpus < 1:
            raise ValueError(f"a local executor needs at least 1 CPU slot, got {cpus}")
        if len(set(gpu_devices)) != len(gpu_devices):
            raise ValueError(f"GPU device list has duplicates: {list(gpu_devices)}")
        self.cpus = int(cpus)
        self.devices = [str(d) for d in gpu_devices]
        self.python = python
        self.pass_env = tuple(pass_env)
        self.limit_grace_s = limit_grace_s
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.RLock()
        # one long-lived thread starts every process (see the module docstring)
        self._spawner = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mlaas-local-executor")
        self._closed = False

    # -- capacity --------------------------------------------------------------

    def capacity(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "gpus": len(self.devices), "devices": list(self.devices)}

    def free(self) -> dict[str, Any]:
        with self._lock:
            used_cpus = sum(j.launch.cpus for j in self._jobs.values())
            held = {d for j in self._jobs.values() for d in j.devices}
        devices = [d for d in self.devices if d not in held]
        return {"cpus": self.cpus - used_cpus, "gpus": len(devices), "devices": devices}

    def fits(self, launch: Launch) -> bool:
        free = self.free()
        return launch.cpus <= free["cpus"] and launch.gpus <= free["gpus"]

    def running(self) -> set[str]:
        with self._lock:
            return set(self._jobs)

    def pid(self, job_id: str) -> int | None:
        """The job process's pid (it leads its process group), None if not running here."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job.proc.pid if job is not None else None

    # -- starting ------------------------------------------------------------------

    def start(self, launch: Launch) -> list[str]:
        if self._closed:
            raise PlatformError("the local executor is shut down; cannot start job "
                                f"{launch.job_id!r}", job_id=launch.job_id)
        if launch.cpus < 1:
            raise ValueError(f"job {launch.job_id!r} asks for {launch.cpus} CPUs; at least 1")
        job_dir = Path(launch.job_dir)
        if not job_dir.is_dir():
            raise FileNotFoundError(f"job directory {str(job_dir)!r} of job {launch.job_id!r} "
                                    "does not exist")
        with self._lock:
            if launch.job_id in self._jobs:
                raise Conflict(f"job {launch.job_id!r} is already running here",
                               job_id=launch.job_id)
            free = self.free()
            if launch.cpus > free["cpus"]:
                raise Conflict(f"job {launch.job_id!r} asks for {launch.cpus} CPUs, "
                               f"{free['cpus']} of {self.cpus} free", job_id=launch.job_id)
            devices = assign_devices(free["devices"], launch.gpus)
            env = job_environment(launch, devices, pass_env=self.pass_env)
            (job_dir / "tmp").mkdir(exist_ok=True)
            log_path = job_dir / "job.log"
            argv = [self.python, "-m", "mlaas.platform.jobrun", str(job_dir)]
            proc = self._spawner.submit(self._popen, argv, job_dir, env, log_path,
                                        launch, devices).result()
            self._jobs[launch.job_id] = _Job(launch, proc, time.monotonic(), devices, log_path)
        return devices

    @staticmethod
    def _popen(argv: list[str], cwd: Path, env: dict[str, str], log_path: Path,
               launch: Launch, devices: list[str]) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            log.write(f"[mlaas] {stamp} starting job {launch.job_id} with {launch.cpus} CPU(s)"
                      f", GPUs {devices or 'none'}\n".encode())
            log.flush()
            return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)

    # -- stopping -------------------------------------------------------------------

    def terminate(self, job_id: str, *, grace_s: float, kill: bool = True) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.proc.returncode is not None:
                return
            job.terminated = True
            self._signal(job, signal.SIGTERM)
            if kill:
                deadline = time.monotonic() + max(0.0, grace_s)
                job.kill_at = deadline if job.kill_at is None else min(job.kill_at, deadline)
                if grace_s <= 0:
                    self._kill_group(job)

    @staticmethod
    def _signal(job: _Job, signum: int) -> None:
        """Signal the job process only: its DataLoader workers end with it."""
        try:
            job.proc.send_signal(signum)
        except ProcessLookupError:
            pass

    @staticmethod
    def _kill_group(job: _Job) -> None:
        """SIGKILL the job's whole process group (it leads its own session)."""
        try:
            os.killpg(job.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # -- watching -------------------------------------------------------------------

    def poll(self) -> list[Exited]:
        ended: list[Exited] = []
        with self._lock:
            now = time.monotonic()
            for job_id, job in list(self._jobs.items()):
                if job.proc.poll() is None:
                    self._enforce(job, now)
                    continue
                self._kill_group(job)  # leftovers (workers) of an ended job
                del self._jobs[job_id]
                ended.append(self._exited(job))
        return ended

    def _enforce(self, job: _Job, now: float) -> None:
        launch = job.launch
        if job.kill_at is not None and now >= job.kill_at:
            self._kill_group(job)
            job.kill_at = None
            return
        if (launch.max_time_s is not None and job.limit is None
                and now - job.started > launch.max_time_s):
            job.limit = LIMIT_WALL_TIME
            job.limit_reason = f"wall time exceeded (limit {launch.max_time_s:g} s)"
            job.terminated = True
            self._signal(job, signal.SIGTERM)
            job.kill_at = now + self.limit_grace_s
            return
        if launch.memory_bytes is not None and job.limit != LIMIT_MEMORY:
            rss = _tree_rss(job.proc.pid)
            if rss > launch.memory_bytes:
                job.limit = LIMIT_MEMORY
                job.limit_reason = (f"memory limit exceeded ({_mib(rss)} resident in the job's "
                                    f"processes, limit {_mib(launch.memory_bytes)})")
                self._kill_group(job)

    def _exited(self, job: _Job) -> Exited:
        code = job.proc.returncode
        reason = describe_exit(code)
        if job.limit is not None:
            reason = f"{job.limit_reason}; {reason}"
        elif job.terminated:
            reason = f"terminated on request; {reason}"
        seconds = time.monotonic() - job.started
        try:
            with open(job.log_path, "ab") as log:
                stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                log.write(f"[mlaas] {stamp} job {job.launch.job_id} {reason} after "
                          f"{seconds:.1f} s\n".encode())
        except OSError:
            pass
        return Exited(job.launch.job_id, code, reason, read_log_tail(job.log_path),
                      limit=job.limit, devices=list(job.devices))

    def shutdown(self, grace_s: float) -> list[Exited]:
        """Terminate every job, wait for them (at most ``grace_s`` + a few seconds)."""
        self._closed = True
        for job_id in self.running():
            self.terminate(job_id, grace_s=grace_s, kill=True)
        deadline = time.monotonic() + grace_s + 5.0
        ended = self.poll()
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
            ended.extend(self.poll())
        self._spawner.shutdown(wait=False)
        return ended
