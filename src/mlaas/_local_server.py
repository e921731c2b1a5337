"""Run a real ``mlaas server`` as a child process on 127.0.0.1, for the demo, tests and benchmarks.

Layer: client (tooling). :class:`LocalServer` starts the installed ``mlaas
server`` command (never a shell) with its own data directory and log file,
waits until ``/healthz`` answers, and stops it with SIGTERM, then SIGKILL
after a grace period. A server that exits early or never answers raises
:class:`ServerUnreachable` with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from mlaas.client import Client, ServerUnreachable

__all__ = ["LocalServer", "free_port", "mlaas_command", "port_is_free"]

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def mlaas_command() -> list[str]:
    """The ``mlaas`` console script next to this interpreter, else ``python -m mlaas.cli``."""
    script = Path(sys.executable).with_name("mlaas")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlaas.cli"]


class LocalServer:
    """``mlaas server --data-dir DATA_DIR --port PORT`` as a child process.

    Args:
        data_dir (PathLike): the server's storage (created by the server).
        port (int or None): a port on 127.0.0.1; default a free one.
        log (PathLike or None): where the server's output goes; default
            ``DATA_DIR/../server.log`` beside the data dir.
        args (list of str): more ``mlaas server`` options, e.g. ``["--cpus", "2"]``.
        env (mapping or None): extra environment variables for the server.
        start_timeout (float): seconds to wait for ``/healthz``.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, port: int | None = None,
                 log: str | os.PathLike[str] | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = Path(log) if log else self.data_dir.with_name(self.data_dir.name + ".log")
        self.args = list(args or [])
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [*mlaas_command(), "server", "--data-dir", str(self.data_dir), "--host", HOST,
                "--port", str(self.port), *self.args]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> LocalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = {**os.environ, **self.env}
        env.pop("MLAAS_SERVER", None)
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + self.start_timeout
        with Client(self.url, timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    self._close_log()
                    raise ServerUnreachable(
                        f"mlaas server exited with code {code} before answering on {self.url}; "
                        f"its log {self.log_path}:\n{self.log_tail()}", server=self.url)
                try:
                    client.health()
                    return self
                except ServerUnreachable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise ServerUnreachable(
                            f"mlaas server did not answer on {self.url} within "
                            f"{self.start_timeout:g} s; its log {self.log_path}:\n{self.log_tail()}",
                            server=self.url) from None
                    time.sleep(0.2)

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            code = proc.returncode
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL at once (durability tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self, **kwargs: Any) -> Client:
        return Client(self.url, **kwargs)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
