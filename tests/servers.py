"""Real servers on 127.0.0.1 for the remote-read tests (no mocks).

* :class:`XRootDServer` runs Debian's ``xrootd`` (as ``nobody`` when we are
  root, because xrootd refuses to run as root).  xrootd always listens on the
  wildcard address, so it is started with ``LD_PRELOAD`` pointing at
  ``tests/support/loopback_bind.c`` (compiled on the fly), which rewrites a
  wildcard ``bind()`` to loopback.
* :class:`RangeHTTPServer` is a small stdlib HTTP server with ``Range``
  support (single range -> 206, several ranges -> 206 multipart/byteranges),
  which is what uproot/fsspec need to read ``http://`` URLs.

Both bind 127.0.0.1 only and remove their temporary directories on stop.
:func:`running` serves an ASGI app of ours with uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

HOST = "127.0.0.1"
SHIM_SOURCE = Path(__file__).resolve().parent / "support" / "loopback_bind.c"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
STALL_LIMIT_S = 60.0  # the longest a hanging test server holds a request


class ServerError(RuntimeError):
    """A test server could not be set up or started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = HOST) -> bool:
    """True if a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _check_name(name: str) -> str:
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"file name must be a relative path without '..': {name!r}")
    return Path(*parts).as_posix()


def _copy_in(root: Path, path: Path, name: str | None) -> str:
    """Copy ``path`` to ``root/name`` (world-readable); return the name."""
    name = _check_name(name if name is not None else Path(path).name)
    dest = root / name
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    while parent != root:  # every directory level traversable by anyone
        parent.chmod(0o755)
        parent = parent.parent
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.copyfile(path, tmp)
    tmp.chmod(0o644)
    os.replace(tmp, dest)
    return name


# --------------------------------------------------------------------- XRootD


class XRootDServer:
    """Debian's ``xrootd`` serving a temp dir on ``root://127.0.0.1:PORT//``.

    ``url(name)`` / ``put(path, name=None)`` give ``root://`` URLs;
    ``stop()`` / ``start()`` take the server down and bring it back on the
    same port; ``close()`` stops it and removes the temp dir.
    """

    def __init__(self, port: int | None = None, name: str = "mlaas-test") -> None:
        self.xrootd = shutil.which("xrootd")
        if self.xrootd is None:
            raise ServerError(
                "the `xrootd` server is not installed (Debian: apt-get install "
                "xrootd-server xrootd-client; `make test` does this)"
            )
        gcc = shutil.which("gcc")
        if gcc is None:
            raise ServerError("gcc is needed to build tests/support/loopback_bind.c")
        self._as_root = os.geteuid() == 0
        self._runuser = None
        if self._as_root:
            self._runuser = shutil.which("runuser")
            if self._runuser is None:
                raise ServerError("running as root but `runuser` is missing")
            try:
                pwd.getpwnam("nobody")
            except KeyError as exc:
                raise ServerError("running as root but there is no user `nobody`") from exc

        self.name = name
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        # Directly under /tmp: pytest's tmp dirs (/tmp/pytest-of-root) are 0700
        # and `nobody` could not traverse them.
        self.base = Path(tempfile.mkdtemp(prefix="mlaas-xrootd-", dir="/tmp"))
        try:
            self.base.chmod(0o755)
            self.root = self.base / "data"
            self.root.mkdir(mode=0o755)
            self.root.chmod(0o755)
            self.run_dir = self.base / "run"  # admin/pid/log dir, xrootd writes here
            self.run_dir.mkdir(mode=0o755)
            self.run_dir.chmod(0o755)
            if self._as_root:
                shutil.chown(self.run_dir, user="nobody")
            self.shim = self.base / "loopback_bind.so"
            subprocess.run(
                [gcc, "-shared", "-fPIC", "-O2", "-o", str(self.shim), str(SHIM_SOURCE), "-ldl"],
                check=True,
                capture_output=True,
            )
            self.shim.chmod(0o755)
            self.config = self.base / "xrootd.cfg"
            self.config.write_text(
                f"xrd.port {self.port}\n"
                "xrd.network nodnr\n"
                "all.export /\n"
                f"oss.localroot {self.root}\n"
                f"all.adminpath {self.run_dir}\n"
                f"all.pidpath {self.run_dir}\n"
            )
            self.config.chmod(0o644)
            self.stdout_path = self.base / "stdout.log"
            self._pidfile = self.run_dir / "xrootd.pid"
        except BaseException as exc:
            shutil.rmtree(self.base, ignore_errors=True)
            if isinstance(exc, subprocess.CalledProcessError):
                raise ServerError(
                    f"building the bind shim failed:\n{exc.stderr.decode(errors='replace')}"
                ) from exc
            raise

    # -- URLs and files

    def url(self, name: str) -> str:
        return f"root://{HOST}:{self.port}//{_check_name(name)}"

    def put(self, path: Path, name: str | None = None) -> str:
        """Copy a local file into the served dir; return its ``root://`` URL."""
        return self.url(_copy_in(self.root, Path(path), name))

    # -- process control

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        xrootd = [
            self.xrootd,
            "-c", str(self.config),
            "-l", str(self.run_dir / "xrootd.log"),
            "-n", self.name,
            "-s", str(self._pidfile),
        ]  # fmt: skip
        if self._as_root:
            # `env` after runuser so LD_PRELOAD reaches xrootd however runuser
            # treats the environment.
            return [self._runuser, "-u", "nobody", "--", "env", f"LD_PRELOAD={self.shim}", *xrootd]
        return xrootd

    def start(self) -> None:
        """Start xrootd (again) on ``self.port``; wait until it accepts TCP."""
        if self.running:
            return
        if port_accepts(self.port):
            raise ServerError(f"port {self.port} is already in use on {HOST}")
        self._pidfile.unlink(missing_ok=True)
        env = dict(os.environ)
        env["LD_PRELOAD"] = str(self.shim)
        with open(self.stdout_path, "ab") as out:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.run_dir,  # xrootd creates <cwd>/<name>/ for cores
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals only it
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise ServerError(f"xrootd exited with status {rc}:\n{self.log_text()}")
            if port_accepts(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise ServerError(
            f"xrootd did not accept connections on {HOST}:{self.port} within "
            f"{START_TIMEOUT_S:.0f} s:\n{self.log_text()}"
        )

    def stop(self) -> None:
        """Terminate xrootd (SIGTERM, then SIGKILL); keep the served files."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        # SIGTERM xrootd itself first: runuser, when signalled, waits a fixed
        # 2 s before SIGKILLing its child; when xrootd exits it exits at once.
        xrootd_pid = self._xrootd_pid(pgid)
        if xrootd_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(xrootd_pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        # runuser may exit before its child; make sure xrootd itself is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while port_accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pause(self) -> None:
        """Freeze xrootd (SIGSTOP): connections stay open and nothing answers, as
        with a server that hangs; :meth:`resume` lets it go on."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        # the whole group: runuser stops itself when its child stops (as su does)
        if self._proc is None:
            raise ServerError("xrootd is not running")
        os.killpg(self._proc.pid, signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        pid = self._xrootd_pid(self._proc.pid) if self._proc is not None else None
        if pid is None:
            raise ServerError("xrootd is not running")
        os.kill(pid, sig)

    def _xrootd_pid(self, pgid: int) -> int | None:
        """xrootd's pid from its pid file, if that process is in our group."""
        try:
            pid = int(self._pidfile.read_text().split()[0])
            return pid if os.getpgid(pid) == pgid else None
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        """Stop the server and remove its temp dir."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        """xrootd's log(s) plus anything it printed before opening its log."""
        chunks = []
        paths = sorted(self.run_dir.rglob("xrootd.log*")) + [self.stdout_path]
        for path in paths:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text:
                    chunks.append(f"==> {path} <==\n{text}")
        return "\n".join(chunks) or "(no xrootd log output)"

    def __enter__(self) -> XRootDServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------- HTTP

_RANGE_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """Parse ``Range: bytes=...`` into inclusive ``(first, last)`` pairs.

    Returns ``None`` if the header is malformed (RFC 9110: ignore it, send the
    whole file) and ``[]`` if no range is satisfiable (416).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    ranges = []
    for part in spec.split(","):
        m = _RANGE_RE.match(part)
        if m is None or (m.group(1) == "" and m.group(2) == ""):
            return None
        first, last = m.group(1), m.group(2)
        if first == "":  # suffix: the last N bytes
            n = int(last)
            if n == 0:
                continue
            ranges.append((max(size - n, 0), size - 1))
            continue
        a = int(first)
        b = size - 1 if last == "" else min(int(last), size - 1)
        if last != "" and int(last) < a:
            return None
        if a < size:
            ranges.append((a, b))
    return ranges


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response has Content-Length
    server: _ThreadingServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _file(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts or not parts:
            return None
        file = self.server.root.joinpath(*parts)
        return file if file.is_file() else None

    def _serve(self, send_body: bool) -> None:
        range_header = self.headers.get("Range")
        self.server.requests.append((self.command, self.path, range_header))
        if self.server.hanging.is_set():  # a server that hangs: no answer until released
            self.server.released.wait(STALL_LIMIT_S)
        with self.server.lock:
            drop = self.server.drops > 0 and self.server.skips == 0
            self.server.skips -= self.server.skips > 0
            self.server.drops -= drop
        if drop:  # a network failure: the connection closes without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        file = self._file()
        if file is None:
            self.send_error(404)
            return
        data = file.read_bytes()
        size = len(data)
        ranges = parse_range(range_header, size) if range_header else None

        if ranges is None:
            status, body, ctype, extra = 200, data, "application/octet-stream", {}
        elif not ranges:
            status, body, ctype = 416, b"", "application/octet-stream"
            extra = {"Content-Range": f"bytes */{size}"}
        elif len(ranges) == 1:
            a, b = ranges[0]
            status, body, ctype = 206, data[a : b + 1], "application/octet-stream"
            extra = {"Content-Range": f"bytes {a}-{b}/{size}"}
        else:
            boundary = f"mlaas-{os.urandom(8).hex()}"
            pieces = []
            for a, b in ranges:
                pieces.append(
                    f"--{boundary}\r\n"
                    "Content-Type: application/octet-stream\r\n"
                    f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n".encode()
                )
                pieces.append(data[a : b + 1])
                pieces.append(b"\r\n")
            pieces.append(f"--{boundary}--\r\n".encode())
            status, body, extra = 206, b"".join(pieces), {}
            ctype = f"multipart/byteranges; boundary={boundary}"

        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    requests: list[tuple[str, str, str | None]]
    drops: int = 0  # the next requests to answer by closing the connection
    skips: int = 0  # ... after answering this many first
    lock: threading.Lock
    hanging: threading.Event  # set: requests wait for ``released`` before any answer
    released: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up on a hanging or dropped request is expected here."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class RangeHTTPServer:
    """Threaded stdlib HTTP server with Range support on 127.0.0.1.

    Serves files of a temp dir (``.root``) at ``url(name)``; ``requests``
    records ``(method, path, Range header)`` of every request.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mlaas-http-"))
        self._server = _ThreadingServer((HOST, 0), _RangeHandler)
        self._server.root = self.root
        self._server.requests = []
        self._server.lock = threading.Lock()
        self._server.hanging, self._server.released = threading.Event(), threading.Event()
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="RangeHTTPServer", daemon=True
        )
        self._thread.start()

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        return self._server.requests

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.port}/{urllib.parse.quote(_check_name(name))}"

    def drop_next(self, count: int, skip: int = 0) -> None:
        """Answer ``count`` requests by closing the connection (a network blip), after
        answering the next ``skip`` normally."""
        with self._server.lock:
            self._server.drops, self._server.skips = count, skip

    def hang(self) -> None:
        """Stop answering: requests wait (up to ``STALL_LIMIT_S``) until :meth:`release`."""
        self._server.released.clear()
        self._server.hanging.set()

    def release(self) -> None:
        self._server.hanging.clear()
        self._server.released.set()

    def put(self, path: Path, name: str | None = None) -> str:
        """Copy a local file into the served dir; return its ``http://`` URL."""
        return self.url(_copy_in(self.root, Path(path), name))

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RangeHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (lifespan on) in a thread; yields
    ``"127.0.0.1:PORT"`` once it accepts connections, and stops it afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            pytest.fail("uvicorn did not start", pytrace=False)
        time.sleep(0.02)
    try:
        yield f"{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
