"""The job process: ``python -m mlaas.platform.jobrun JOB_DIR``.

Layer: platform, but it runs *inside* the job, in its own process, started by
an executor (:mod:`mlaas.platform.executors`). It runs one pipeline with
:func:`mlaas.train.run.run` and talks back to the server only through files in
its job directory, so the server may die and come back without losing a job::

    JOB_DIR/pipeline.json   the spec (written by the manager before the start)
    JOB_DIR/run/            the run directory of ``mlaas run`` (checkpoint, bundle, plots)
    JOB_DIR/progress.json   the latest progress report (replaced atomically)
    JOB_DIR/exit.json       {"exit_code", "finished_at", "error"} written when it ends
    JOB_DIR/job.log         stdout and stderr (opened by the executor)
    JOB_DIR/.lock           held while the process runs: never two processes per job

Exit codes: 0 success; 75 preempted (SIGTERM: in training the trainer wrote its
checkpoint; outside training there was nothing to save, see :mod:`mlaas._stop`;
a new start resumes either way);
1 an :class:`mlaas.errors.MlaasError` (its message is the last line of the log);
2 any other exception (its traceback is in the log).

When its parent (the server thread that started it) dies, the kernel sends it
SIGTERM (``PR_SET_PDEATHSIG``, Linux only), so a SIGKILLed server's jobs
checkpoint and exit 75, and the restarted server resumes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlaas import _stop

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_CRASH", "EXIT_PREEMPTED", "PARENT_PID_ENV",
           "PIPELINE_FILE", "PROGRESS_FILE", "EXIT_FILE", "RUN_DIR", "LOG_FILE",
           "write_json_atomic", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CRASH = 2
EXIT_PREEMPTED = _stop.PREEMPTED_EXIT_CODE  # 75, as mlaas.train.trainer.PREEMPTED_EXIT_CODE

PIPELINE_FILE = "pipeline.json"
PROGRESS_FILE = "progress.json"
EXIT_FILE = "exit.json"
RUN_DIR = "run"
LOG_FILE = "job.log"
LOCK_FILE = ".lock"

PARENT_PID_ENV = "MLAAS_JOB_PARENT_PID"
"""The executor puts its pid here, so the job can tell its parent is already gone."""

LOCK_WAIT_S = 120.0
"""How long a new start waits for a previous process of the same job to let go."""

_PR_SET_PDEATHSIG = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over ``path``.

    A reader (the manager) sees the old or the new content, never half of one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _unblock_stop_signals() -> None:
    """Make sure SIGTERM and SIGINT reach this process.

    A child inherits its parent thread's signal mask, and some launchers
    (Ray's worker threads among them) run with signals blocked: a job started
    from there would never see the SIGTERM of a cancel or a preemption and
    would be SIGKILLed after the grace period, losing its checkpoint.
    """
    stops = {signal.SIGTERM, signal.SIGINT}
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, stops) & stops
    if blocked:
        names = ", ".join(sorted(s.name for s in blocked))
        print(f"[mlaas] {names} arrived blocked from the launcher; unblocked", file=sys.stderr)


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies; if it already died, SIGTERM now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            print(f"[mlaas] warning: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}",
                  file=sys.stderr)
            return
    except (OSError, AttributeError) as exc:
        print(f"[mlaas] warning: cannot ask to be stopped with the server: {exc}",
              file=sys.stderr)
        return
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        # the parent died between fork and prctl: nobody would tell us any more
        os.kill(os.getpid(), signal.SIGTERM)


def _set_threads() -> None:
    """Torch's thread pools sized from the executor's limit (OMP_NUM_THREADS)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        import torch

        torch.set_num_threads(int(value))
        with contextlib.suppress(RuntimeError):  # only allowed before any parallel work
            torch.set_num_interop_threads(int(value))


@contextlib.contextmanager
def _job_lock(job_dir: Path) -> Iterator[None]:
    """Hold ``JOB_DIR/.lock``; wait for a previous process of this job (still checkpointing)."""
    with open(job_dir / LOCK_FILE, "a+") as fh:
        deadline = time.monotonic() + LOCK_WAIT_S
        said = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _LockTimeout(
                        f"another process of this job still holds {str(job_dir / LOCK_FILE)!r} "
                        f"after {LOCK_WAIT_S:.0f} s; not starting a second one") from None
                if not said:
                    print("[mlaas] waiting for the previous process of this job to exit",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.5)
        yield


class _LockTimeout(Exception):
    pass


def _write_exit(job_dir: Path, code: int, error: str | None) -> None:
    write_json_atomic(job_dir / EXIT_FILE, {
        "exit_code": code, "error": error,
        "finished_at": datetime.now(timezone.utc).isoformat()})


class _Progress:
    """The ``on_progress`` callback: merges each report into ``progress.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text())
            if isinstance(old, dict):
                self.state = old  # a resumed attempt continues from the last report

    def __call__(self, report: dict[str, Any]) -> None:
        self.state = {**self.state, **report,
                      "updated_at": datetime.now(timezone.utc).isoformat()}
        try:
            write_json_atomic(self.path, self.state)
        except OSError as exc:  # a full disk must not kill the training
            print(f"[mlaas] warning: cannot write {str(self.path)!r}: {exc}", file=sys.stderr)


def _run(job_dir: Path) -> tuple[int, str | None]:
    """Run the pipeline; return (exit code, error message or None)."""
    progress = _Progress(job_dir / PROGRESS_FILE)
    try:
        _set_threads()
        from mlaas.errors import MlaasError
        from mlaas.train.run import run
        from mlaas.train.trainer import CHECKPOINT_NAME, Preempted

        run_dir = job_dir / RUN_DIR
        resume = (run_dir / CHECKPOINT_NAME).exists()
        print(f"[mlaas] {'resuming from' if resume else 'starting'} {run_dir}",
              file=sys.stderr, flush=True)
        result = run(job_dir / PIPELINE_FILE, run_dir, resume=resume, progress=False,
                     on_progress=progress)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done: nothing left to stop
    except BaseException as exc:  # noqa: BLE001 - the job's last word goes to its log
        from mlaas.errors import MlaasError
        from mlaas.train.trainer import Preempted

        if isinstance(exc, Preempted):
            print(f"Preempted: {exc}", file=sys.stderr)
            return EXIT_PREEMPTED, str(exc)
        if isinstance(exc, MlaasError):
            if exc.__cause__ is not None:
                # user code failed underneath (a model file that raises): its
                # traceback is what the physicist needs to fix it
                traceback.print_exception(exc.__cause__, file=sys.stderr)
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_ERROR, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return EXIT_CRASH, f"{type(exc).__name__}: {exc}"
    progress({"phase": "done", "epochs_run": result.epochs_run, "stopped": result.stopped})
    test = result.metrics.get("test", result.metrics)
    print(json.dumps({"bundle": str(result.bundle), "stopped": result.stopped,
                      "epochs": result.epochs_run,
                      "test": {k: v for k, v in test.items() if isinstance(v, (int, float))}}),
          flush=True)
    return EXIT_OK, None


def main(argv: list[str] | None = None) -> int:
    """Run the job in ``argv[0]`` (a job directory); return the exit code (see module doc)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mlaas.platform.jobrun JOB_DIR", file=sys.stderr)
        return EXIT_CRASH
    job_dir = Path(args[0]).resolve()
    if not (job_dir / PIPELINE_FILE).is_file():
        print(f"no {PIPELINE_FILE} in job directory {str(job_dir)!r}", file=sys.stderr)
        return EXIT_ERROR
    _unblock_stop_signals()
    # Until run() installs its own handlers (imports take seconds) SIGTERM ends
    # the process as preempted; it never raises (see mlaas._stop for why).
    signal.signal(signal.SIGTERM, _stop.handler)
    try:
        _die_with_parent()
        with _job_lock(job_dir):  # a SIGTERM while waiting: the other process owns exit.json
            (job_dir / EXIT_FILE).unlink(missing_ok=True)
            forget = _stop.on_preempted(lambda reason: _write_exit(job_dir, EXIT_PREEMPTED,
                                                                   reason))
            code, error = _run(job_dir)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done: nothing left to stop
            forget()
            _write_exit(job_dir, code, error)
    except _LockTimeout as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
