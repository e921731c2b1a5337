"""The disk cache's room check: complete entries are room, temporary directories are not.

``make_cache`` refuses a cache that would not fit. Entries already written
under the dataset's key count as room (they are read back, not written
again); the ``.<chunk>-*`` temporary directories of writers are not entries:
a running writer's will be renamed or thrown away, and a dead writer's are
deleted so that a killed run's half entries do not keep a new cache out.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mlaas.data import cache as cache_module
from mlaas.data.cache import DiskCache, make_cache, remove_dead_writers, written_bytes
from mlaas.data.transform import Columns
from mlaas.errors import CacheError

KEY = "0123456789abcdef01234567"


def columns(n: int) -> Columns:
    return Columns(x=np.ones((n, 3), np.float32), y=np.zeros(n, np.float32),
                   w=np.ones(n, np.float32), mask=np.ones((n, 2), np.float32),
                   file=np.zeros(n, np.int32), entry=np.arange(n, dtype=np.int64))


def a_dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def tag(pid: int, host: str | None = None) -> str:
    """The writer tag ``DiskCache.put`` puts at the end of its temporary directory's name."""
    return f"~{pid}@{host or socket.gethostname()}"


def temp_dir(key_dir: Path, chunk: str, tag: str, size: int) -> Path:
    """A half-written entry as ``DiskCache.put`` leaves it: files, no rename."""
    tmp = key_dir / f".{chunk}-abc123{tag}"
    tmp.mkdir(parents=True)
    (tmp / "x.npy").write_bytes(b"\0" * size)
    return tmp


def no_free_space(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))


def test_a_running_writers_temp_dir_is_not_room(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    key_dir = tmp_path / KEY
    DiskCache(key_dir).put("0-0-100", columns(100))
    entry = written_bytes(key_dir)
    assert entry > 0
    live = temp_dir(key_dir, "0-100-200", tag(os.getpid()), 50_000)  # this process
    no_free_space(monkeypatch)
    make_cache("disk", str(tmp_path), KEY, entry, None, tmp_path)  # the entry is room
    with pytest.raises(CacheError, match="refusing rather than caching part of the data"):
        make_cache("disk", str(tmp_path), KEY, entry + 1, None, tmp_path)  # the temp dir is not
    assert live.is_dir()  # its writer runs: left alone


def test_a_dead_writers_temp_dir_is_removed(tmp_path: Path) -> None:
    key_dir = tmp_path / KEY
    dead = temp_dir(key_dir, "0-0-100", tag(a_dead_pid()), 10)
    live = temp_dir(key_dir, "0-100-200", tag(os.getpid()), 10)
    elsewhere = temp_dir(key_dir, "1-0-100", tag(a_dead_pid(), "another-host.example"), 10)
    untagged = temp_dir(key_dir, "1-100-200", "", 10)
    assert remove_dead_writers(key_dir) == [dead]
    assert not dead.exists()
    assert live.is_dir() and elsewhere.is_dir() and untagged.is_dir()
    assert written_bytes(key_dir) == 0


def test_a_killed_writers_half_entry_does_not_count_and_is_cleared(tmp_path: Path) -> None:
    """A real writer dies between writing its files and the rename that publishes them."""
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from pathlib import Path
        from mlaas.data.cache import DiskCache
        from mlaas.data.transform import Columns
        n = 1000
        cols = Columns(x=np.ones((n, 3), np.float32), y=np.zeros(n, np.float32),
                       w=np.ones(n, np.float32), mask=np.ones((n, 2), np.float32),
                       file=np.zeros(n, np.int32), entry=np.arange(n, dtype=np.int64))
        print(os.getpid(), flush=True)
        os.rename = lambda *args: os._exit(3)  # killed just before publishing the entry
        DiskCache(Path({str(tmp_path / KEY)!r})).put("0-0-1000", cols)
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True,
                          text=True)
    assert done.returncode == 3, done.stderr
    done_pid = int(done.stdout)
    (half,) = (tmp_path / KEY).iterdir()
    assert half.name.startswith(".0-0-1000-") and half.name.endswith(tag(done_pid))
    assert (half / "complete").is_file()
    assert written_bytes(tmp_path / KEY) == 0  # never read back, so never room
    cache = make_cache("disk", str(tmp_path), KEY, 1, None, tmp_path)
    assert not half.exists()  # its writer is gone: deleted before the room is measured
    assert cache.get("0-0-1000") is None


def test_an_entry_written_by_put_is_room_and_leaves_no_temp_dir(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / KEY)
    cache.put("0-0-100", columns(100))
    names = os.listdir(tmp_path / KEY)
    assert names == ["0-0-100"]
    sizes = sum(f.stat().st_size for f in (tmp_path / KEY / "0-0-100").iterdir())
    assert written_bytes(tmp_path / KEY) == sizes


def test_reader_threads_load_cache_entries_one_at_a_time(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``np.load`` parses headers with ``ast``, which CPython 3.11 cannot do in two threads
    at once (gh-106905: "AST constructor recursion depth mismatch"): the epoch's two
    reader threads must never be inside it together."""
    import threading
    import time

    cache = DiskCache(tmp_path / KEY)
    for i in range(4):
        cache.put(f"0-{i}", columns(10 + i))
    inside, most, lock = [0], [0], threading.Lock()
    real = np.load

    def slow_load(*args: object, **kwargs: object) -> object:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)  # a window for the other thread to enter
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(cache_module.np, "load", slow_load)
    fresh = DiskCache(tmp_path / KEY)
    threads = [threading.Thread(target=fresh.get, args=(f"0-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert [len(fresh.get(f"0-{i}")) for i in range(4)] == [10, 11, 12, 13]
