"""The disk cache: its room check, failed writes, its key and its messages.

``make_cache`` refuses a cache that would not fit. Entries already written
under the dataset's key count as room (they are read back, not written
again); the ``.<chunk>-*`` temporary directories of writers are not entries:
a running writer's will be renamed or thrown away, and a dead writer's are
deleted so that a killed run's half entries do not keep a new cache out.

A write the disk refuses mid-epoch is a warning and the epoch streams on
(audit s19 F3); the key tells apart a file rewritten with its old size and
mtime (F5) and ignores settings that do not change the arrays (F6); a path
that cannot be the cache directory is named as ``data.cache.path`` (F8).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import uproot

from mlaas.data import RootDataset, synth
from mlaas.data import cache as cache_module
from mlaas.data import chunks as chunking
from mlaas.data.cache import DiskCache, make_cache, remove_dead_writers, written_bytes
from mlaas.data.transform import Columns
from mlaas.errors import CacheError
from mlaas.spec import load

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


# -- datasets with a disk cache (audit s19) ---------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pair")
    synth.generate(out, 2000, seed=5)
    return out


def pair_spec(directory: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sources": [
            {"name": "signal", "files": [str(directory / "signal.root")], "label": 1},
            {"name": "background", "files": [str(directory / "background.root")], "label": 0},
        ],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 3}],
        "step_size": 400,  # 5 chunks per file
    }
    data.update(extra)
    return {"data": data}


def batches(ds: RootDataset, epoch: int) -> list[dict[str, np.ndarray]]:
    return [{k: np.array(v) for k, v in b.items()} for b in ds.iter_epoch(epoch)]


def assert_same_batches(got: list[dict[str, np.ndarray]],
                        want: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every chunk read from a file (``chunks.read``); the reads still happen."""
    reads: list[str] = []
    real = chunking.read

    def counted(pipeline: Any, layout: Any, chunk: chunking.ChunkRange,
                trees: Any = None) -> Any:
        reads.append(chunk.name)
        return real(pipeline, layout, chunk, trees)

    monkeypatch.setattr(chunking, "read", counted)
    return reads


def a_full_disk_after(monkeypatch: pytest.MonkeyPatch, saves: int) -> None:
    """``np.save`` in the cache writes ``saves`` arrays, then fails with ENOSPC.

    How a disk filled by another process after ``make_cache`` measured the
    room looks to the writer (tests run as root, where chmod stops nothing).
    """
    real, done = np.save, [0]

    def save(*args: Any, **kwargs: Any) -> None:
        if done[0] >= saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done[0] += 1
        real(*args, **kwargs)

    monkeypatch.setattr(cache_module.np, "save", save)


def temp_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*") if p.is_dir()]


def test_a_cache_write_failing_mid_epoch_warns_once_and_the_epoch_streams_on(
        pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F3: ENOSPC from ``np.save`` on the third entry used to end the epoch with an OSError."""
    plain = RootDataset(pair_spec(pair), split="train", batch_size=300, seed=4)
    want = [batches(plain, 0), batches(plain, 1)]
    cached = RootDataset(pair_spec(pair, cache={"disk": str(tmp_path / "cache")}),
                         split="train", batch_size=300, seed=4)
    assert len(cached.chunks) > 3
    key_dir = cached.cache.directory
    a_full_disk_after(monkeypatch, 2 * 6)  # two entries of six arrays each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = batches(cached, 0)
    assert_same_batches(first, want[0])  # not one event lost, none twice, the same order
    events = np.concatenate([b["file"].astype(np.int64) * 10**9 + b["entry"] for b in first])
    assert len(events) == len(np.unique(events)) == cached.num_events
    mine = [w for w in caught if "disk cache" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]  # once, not once per chunk
    text = str(mine[0].message)
    assert f"cannot write to the disk cache {key_dir}: No space left on device" in text
    assert "data.cache.path" in text and "streaming" in text
    assert "read from the files again next time" in text
    assert temp_dirs(tmp_path / "cache") == []  # the failed entry's directory is gone
    assert len(list(key_dir.glob("*/complete"))) == 2
    assert not cached.cache.enabled  # no more writes, no more copies kept for them

    monkeypatch.undo()  # the disk has room again; this cache object writes no more
    reads = count_reads(monkeypatch)
    assert_same_batches(batches(cached, 1), want[1])
    assert len(reads) == len(cached.chunks) - 2  # the two entries written are read back
    assert len(list(key_dir.glob("*/complete"))) == 2


@pytest.mark.parametrize("fails", ["mkdtemp", "rename"])
def test_a_refused_put_leaves_no_temp_dir_and_stops_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    cache = DiskCache(tmp_path / KEY)
    calls = [0]

    def refuse(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / KEY))

    target = cache_module.tempfile if fails == "mkdtemp" else cache_module.os
    monkeypatch.setattr(target, fails, refuse)
    with pytest.warns(UserWarning, match="Read-only file system") as caught:
        cache.put("0-0-10", columns(10))
        cache.put("0-10-20", columns(10))
    assert len(caught) == 1 and calls[0] == 1  # the second put did not try
    assert os.listdir(tmp_path / KEY) == []
    assert cache.get("0-0-10") is None


def test_losing_the_race_to_another_writer_is_no_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers write one entry: the second rename fails on the first's entry, silently."""
    cache = DiskCache(tmp_path / KEY)
    real_rename = os.rename

    def lose(src: Any, dst: Any) -> None:  # the other writer renames first
        monkeypatch.setattr(cache_module.os, "rename", real_rename)
        DiskCache(tmp_path / KEY).put(Path(dst).name, columns(10))
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(dst))

    monkeypatch.setattr(cache_module.os, "rename", lose)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put("0-0-10", columns(10))
    assert cache.enabled
    assert os.listdir(tmp_path / KEY) == ["0-0-10"]


def write_flat(path: Path, seed: int) -> None:
    """An uncompressed flat tree: another seed gives other values in a file of the same size."""
    rng = np.random.default_rng(seed)
    n = 3000
    with uproot.recreate(path, compression=None) as f:
        f.mktree("Events", {"x1": np.float32, "x2": np.float32, "lab": np.int32})
        f["Events"].extend({"x1": rng.normal(0, 1, n).astype(np.float32),
                            "x2": rng.normal(0, 1, n).astype(np.float32),
                            "lab": rng.integers(0, 2, n).astype(np.int32)})


def test_a_file_rewritten_with_its_size_and_mtime_is_not_read_stale(tmp_path: Path) -> None:
    """F5: ``cp -p``, ``rsync -a`` or ``tar x`` put the old mtime back on new content."""
    path = tmp_path / "f.root"
    spec = {"data": {"tree": "Events", "sources": [{"files": [str(path)]}], "label": "lab",
                     "features": ["x1", "x2"], "normalize": "none",
                     "cache": {"disk": str(tmp_path / "cache")}}}
    write_flat(path, 1)
    before = os.stat(path)
    old = RootDataset(spec, split="all", shuffle=False).columns()
    write_flat(path, 2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    got = RootDataset(spec, split="all", shuffle=False).columns()
    truth = uproot.open(path)["Events"].arrays(["x1", "x2"], library="np")
    np.testing.assert_array_equal(got.x[:, 0], truth["x1"][got.entry])
    np.testing.assert_array_equal(got.x[:, 1], truth["x2"][got.entry])
    assert not np.array_equal(got.x, old.x)


#: settings that change neither the arrays nor pass 1, for a cache in ``directory``
SAME_ARRAYS = {
    "retries": lambda directory: {"retries": {"attempts": 5}},
    "max_bytes": lambda directory: {"cache": {"kind": "disk", "path": str(directory),
                                              "max_bytes": "1 GB"}},
    "relative-path": lambda directory: {"cache": {"disk": directory.name}},  # the same one
    "balance": lambda directory: {"balance": "equal"},
}


@pytest.mark.parametrize("setting", SAME_ARRAYS)
def test_settings_that_do_not_change_the_arrays_reuse_the_cache(
        pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """F6: each of these wrote a second full copy of the cache under a new key."""
    directory = tmp_path / "cache"
    base = pair_spec(pair, cache={"disk": str(directory)})
    first = RootDataset(base, split="validation", shuffle=False)
    want = first.columns()
    (key,) = directory.iterdir()
    extra = {"cache": {"disk": str(directory)}, **SAME_ARRAYS[setting](directory)}
    changed = load(pair_spec(pair, **extra), base_dir=tmp_path)  # relative to tmp_path
    assert changed.data_digest() == load(base).data_digest()
    again = RootDataset(changed, split="validation", shuffle=False, stats=first.stats)
    assert again.cache.directory == key
    reads = count_reads(monkeypatch)
    got = again.columns()
    assert reads == []  # every chunk from the cache
    if setting != "balance":  # (which keeps a share of the larger source)
        for field in ("x", "y", "w", "mask", "file", "entry"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert list(directory.iterdir()) == [key]


def test_settings_that_change_the_arrays_change_the_data_digest(pair: Path) -> None:
    base = load(pair_spec(pair)).data_digest()
    for change in ({"cut": "MET_pt > 40"}, {"normalize": "minmax"}, {"step_size": 300},
                   {"nan": {"policy": "replace", "value": -1}}, {"max_events": 100},
                   {"sources": [{"files": [str(pair / "signal.root")], "label": 1,
                                 "name": "s"}]}):
        assert load(pair_spec(pair, **change)).data_digest() != base, change


# -- messages (audit s19 F8) ----------------------------------------------------------


def test_a_file_as_the_cache_path_is_called_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "README.md"
    a_file.write_text("not a directory\n")
    for path in (a_file, a_file / "cache"):  # the file itself, or one of the parents
        with pytest.raises(CacheError) as info:
            make_cache("disk", str(path), KEY, 1, None, tmp_path)
        text = str(info.value)
        assert f"cannot use {path} as the disk cache: {a_file} is a file, not a directory" in text
        assert "at spec field data.cache.path" in text
        assert "File exists" not in text and "in file" not in text


def read_only_below(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mkdir`` of a new directory fails with EROFS: a cache directory on a read-only mount."""

    def mkdir(self: Path, mode: int = 0o777, parents: bool = False,
              exist_ok: bool = False) -> None:
        if not (exist_ok and self.is_dir()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(cache_module.Path, "mkdir", mkdir)


def test_a_read_only_cache_directory_names_the_field_not_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read_only_below(monkeypatch)
    with pytest.raises(CacheError) as info:
        make_cache("disk", str(tmp_path), KEY, 1, None, tmp_path)
    text = str(info.value)
    assert (f"cannot create the cache directory {tmp_path / KEY}: Read-only file system"
            in text)
    assert "at spec field data.cache.path" in text
    assert "in file" not in text
