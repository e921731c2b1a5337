"""The preprocessed-data cache: the first epoch streams, later ones read float32 arrays back.

Layer: data. One entry per planned chunk, keyed by everything that decides
its content: the spec fields that change the arrays (``Pipeline.data_digest``),
the split, the normalisation constants, each file's identity (size, mtime and
the ROOT file's UUID locally, UUID and entries remotely) and the entry range.
Change any of them and the key changes, so a stale entry is never read.
Disk entries are written to a temporary directory and renamed into place, so
an interrupted epoch or two workers writing at once never leave a half entry;
they are read back memory-mapped. A write the disk refuses (full, read-only,
no permission) is a warning, not an error: the epoch goes on streaming.

Old keys are never removed here: a key directory is dropped by deleting it.

Temporary directories (``.<chunk>-<random>~<pid>@<host>``) are never cache
content: the room check counts complete entries only, and removes the
temporary directories of writers on this host that are no longer running, so
the half entries of a killed run neither pass for room nor take it. Those of
running writers, of other hosts (a shared file system) and untagged ones are
left alone and not counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from mlaas.data.transform import COLUMN_FIELDS, Columns
from mlaas.errors import CacheError
from mlaas.expr import AST_LOCK

__all__ = ["ChunkCache", "MemoryCache", "DiskCache", "NoCache", "make_cache", "dataset_key"]

_FIELDS = COLUMN_FIELDS


def dataset_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class ChunkCache:
    """Interface: ``get(name)`` returns cached Columns or None; ``put(name, columns)``.

    ``enabled`` says whether ``put`` keeps anything: the loader copies a
    chunk's pieces for ``put`` only then.
    """

    enabled = False

    def get(self, name: str) -> Columns | None:
        return None

    def put(self, name: str, columns: Columns) -> None:
        return None


class NoCache(ChunkCache):
    pass


class MemoryCache(ChunkCache):
    """Per process: with DataLoader workers, use ``persistent_workers=True`` to keep it."""

    enabled = True

    def __init__(self) -> None:
        self._store: dict[str, Columns] = {}

    def get(self, name: str) -> Columns | None:
        return self._store.get(name)

    def put(self, name: str, columns: Columns) -> None:
        self._store[name] = columns


class DiskCache(ChunkCache):
    """``<dir>/<dataset key>/<chunk>/{x,y,w,mask,file,entry}.npy``, read back with mmap."""

    enabled = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unusable(directory, exc, f"cannot create the cache directory {directory}"
                            ) from exc
        self._open: dict[str, Columns] = {}

    def get(self, name: str) -> Columns | None:
        """The entry's arrays, memory-mapped; each entry is opened once per process.

        Keeping the maps open lets later epochs find the pages already
        mapped (and, memory permitting, in the page cache) instead of paying
        six opens and fresh mappings per chunk and epoch.
        """
        found = self._open.get(name)
        if found is not None:
            return found
        path = self.directory / name
        if not (path / "complete").exists():
            return None
        with AST_LOCK:  # np.load parses each header with ast (see mlaas.expr.AST_LOCK)
            found = Columns(*(np.load(path / f"{k}.npy", mmap_mode="r") for k in _FIELDS))
        self._open[name] = found
        return found

    def put(self, name: str, columns: Columns) -> None:
        """Write the entry, or, when the disk refuses, warn once and write no more.

        The cache only makes later epochs faster, so a failed write loses
        nothing: the epoch's columns are already made and go on to the
        batches; the chunk is read from its file again next time. The disk
        can refuse long after :func:`make_cache` measured the room (another
        process fills it, it is remounted read-only, a shared directory's
        permissions change); each further chunk would fail the same way, so
        the cache stops writing (``enabled`` turns False: the loader stops
        keeping copies for it) while the entries already written are still
        read. Losing a race to another writer of the same entry is no failure.
        """
        if not self.enabled:
            return
        final = self.directory / name
        if final.exists():
            return
        try:
            self._write(final, columns)
        except OSError as exc:
            if not (final / "complete").exists():  # not another writer's entry
                self._stop_writing(exc)

    def _write(self, final: Path, columns: Columns) -> None:
        """Write into a temporary directory, then rename it to ``final``; no temporary left."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=_writer_tag(),
                                    dir=self.directory))
        try:
            for k, v in columns.as_dict().items():
                np.save(tmp / f"{k}.npy", np.ascontiguousarray(v))
            (tmp / "complete").write_text("ok\n")
            os.rename(tmp, final)
        except BaseException:
            # a disk that will not take the rmtree either (remounted read-only) keeps
            # it; its tag lets remove_dead_writers delete it once this process ended
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _stop_writing(self, exc: OSError) -> None:
        self.enabled = False
        warnings.warn(
            f"cannot write to the disk cache {self.directory}: {exc.strerror or exc} "
            "(data.cache.path); the epoch goes on streaming from the files, and the chunks "
            "not cached are read from the files again next time; no more are written to "
            "this cache", UserWarning, stacklevel=3)


def make_cache(kind: str, path: str | None, key: str, needed_bytes: int,
               max_bytes: int | None, base_dir: Path) -> ChunkCache:
    """Build the cache the spec asks for, refusing one that would not fit.

    Args:
        kind (str): ``none``, ``memory`` or ``disk``.
        needed_bytes (int): the estimated size of this split's arrays.
        max_bytes (int or None): the user's limit; default: half of the
            available memory, or 90% of the free disk space plus what this
            key's entries already take.
    """
    if kind == "none":
        return NoCache()
    if kind == "memory":
        room = max_bytes or int(psutil.virtual_memory().available * 0.5)
        where = "data.cache.max_bytes" if max_bytes else "memory (half of what is available)"
        _fits(needed_bytes, room, where, "raise data.cache.max_bytes, use cache: {disk: DIR} "
              "or select fewer events" if max_bytes else
              "use cache: {disk: DIR} or select fewer events")
        return MemoryCache()
    assert path is not None
    directory = Path(path).expanduser()
    if not directory.is_absolute():
        directory = base_dir / directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise _unusable(directory, exc, f"cannot use {directory} as the disk cache") from exc
    remove_dead_writers(directory / key)  # before measuring: what they held is free again
    free = int(shutil.disk_usage(directory).free * 0.9)
    room = max_bytes or free + written_bytes(directory / key)
    where = f"data.cache.max_bytes for disk at {directory}" if max_bytes else f"disk at {directory}"
    _fits(needed_bytes, room, where, "raise data.cache.max_bytes or select fewer events"
          if max_bytes else "free space or choose another directory")
    return DiskCache(directory / key)


def _unusable(directory: Path, exc: OSError, failed: str) -> CacheError:
    """Why ``directory`` cannot be made, naming ``data.cache.path``, where it comes from.

    A file where the directory (or one of its parents) should be gets
    ``FileExistsError`` or ``NotADirectoryError``, whose errno text ("File
    exists") does not say what is wrong: the message says it is a file.
    """
    blocker = next((p for p in (directory, *directory.parents)  # os.path: never raises
                    if os.path.exists(p) and not os.path.isdir(p)), None)
    if blocker is not None:
        why = f"{blocker} is a file, not a directory"
    else:
        why = exc.strerror or str(exc)
    return CacheError(f"{failed}: {why}", field_path="data.cache.path")


def written_bytes(directory: Path) -> int:
    """Bytes of the complete entries under ``directory``: a dataset's entries on disk.

    They count as room for the cache they belong to: they are its own data,
    read back instead of written again, so a cache that fit once fits again.
    Temporary directories do not count: a half entry is never read back (its
    chunk is written again), so its bytes are not room this cache can reuse.
    """
    if not directory.is_dir():
        return 0
    return sum(_size(entry) for entry in directory.iterdir()
               if not entry.name.startswith(".") and (entry / "complete").is_file())


def remove_dead_writers(directory: Path) -> list[Path]:
    """Delete the temporary directories whose writer, on this host, has ended.

    A writer killed before its rename (an interrupted run, an OOM-killed
    DataLoader worker) leaves its temporary directory behind; nobody will
    finish it, and its bytes would keep a later cache from fitting. A writer
    is known by the ``~<pid>@<host>`` tag of :func:`_writer_tag`; one that
    may still run (its pid exists, another host, no tag) is left alone.
    Returns the directories removed.
    """
    if not directory.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for tmp in directory.iterdir():
        writer = _writer_of(tmp.name) if tmp.name.startswith(".") else None
        if writer is not None and writer[1] == host and not psutil.pid_exists(writer[0]):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _writer_tag() -> str:
    """``~<pid>@<host>``, the suffix naming who writes a temporary directory."""
    return f"~{os.getpid()}@{socket.gethostname()}"


def _writer_of(name: str) -> tuple[int, str] | None:
    """The ``(pid, host)`` of a temporary directory's name, or None when it has no tag."""
    rest, at, host = name.rpartition("@")
    pid = rest.rpartition("~")[2]
    if not at or not host or not pid.isdigit():
        return None
    return int(pid), host


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    """``1234567`` as ``1.2 MB``: sizes in messages people read."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _fits(needed: int, room: int, where: str, advice: str) -> None:
    if needed > room:
        raise CacheError(
            f"the cache needs about {human_bytes(needed)} but {where} allows "
            f"{human_bytes(room)}; refusing rather than caching part of the data ({advice})",
            field_path="data.cache",
        )
