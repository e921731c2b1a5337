"""Where the bytes come from: file names, URLs, retries, and uproot's errors.

Layer: data, physical side. This module resolves the spec's ``files`` into
URLs (globs, XRootD redirector, HTTP), opens them with bounded retries, finds
the tree and reads entry ranges of named branches. It never knows what a
branch means; ``layout``, ``transform`` and ``stats`` never open a file.

Every foreign exception from uproot, XRootD, HTTP or decompression passes
through :func:`read_errors`, which re-raises it as an :mod:`mlaas.errors`
class naming the URL.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import posixpath
import re
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# XRootD's client would otherwise retry a refused connection for minutes
# (5 attempts x 120 s windows) before our own bounded retry sees anything.
# Set before XRootD is imported; a user's explicit environment wins.
os.environ.setdefault("XRD_CONNECTIONRETRY", "1")
os.environ.setdefault("XRD_CONNECTIONWINDOW", "10")
os.environ.setdefault("XRD_REQUESTTIMEOUT", "60")
os.environ.setdefault("XRD_TIMEOUTRESOLUTION", "1")  # check timeouts each second, not 15
# After a failed connection the client refuses the host for 30 min by default;
# our retry loop is the one that decides when to try again.
os.environ.setdefault("XRD_STREAMERRORWINDOW", "1")

import awkward as ak  # noqa: E402
import numpy as np  # noqa: E402
import uproot  # noqa: E402

from mlaas.data import baskets  # noqa: E402
from mlaas.errors import DataError, SourceError, SpecError, TreeNotFound, close_names  # noqa: E402
from mlaas.spec import Pipeline, RetrySpec  # noqa: E402

try:
    from isal import isal_zlib as _isal_zlib
except ImportError:  # a dependency, but an install without it still reads with zlib
    _isal_zlib = None

ZLIB_LIBRARY_ENV = "MLAAS_ZLIB"
ZLIB_LIBRARIES = ("isal", "zlib")


def use_fast_zlib() -> str:
    """Let uproot inflate ZLIB baskets with ISA-L (``isal``) instead of the stdlib's zlib.

    ZLIB is ROOT's default compression and its decompression is most of the
    CPU of a streamed epoch (0.51 of 1.10 s in a profile of the deepsets
    benchmark's training split); ISA-L inflates the same baskets 1.5x faster
    (0.094 s against 0.146 s for 200k datagen events), byte for byte the
    same, and releases the GIL like zlib, so reader threads still overlap.
    uproot supports it (``library = "isal"``), but its public
    ``uproot.ZLIB.library`` only reaches compression: reading goes through
    the module's ``_DecompressZLIB`` instance, so that class is where it is
    set. ``MLAAS_ZLIB=zlib`` keeps the stdlib's; another value is warned
    about and ignored. Returns the library in use.
    """
    decompress = getattr(getattr(uproot, "compression", None), "_DecompressZLIB", None)
    if decompress is None or getattr(decompress, "library", None) is None:
        return "zlib"  # another uproot layout: leave it alone
    wanted = os.environ.get(ZLIB_LIBRARY_ENV, "").strip().lower() or "isal"
    if wanted not in ZLIB_LIBRARIES:
        warnings.warn(f"{ZLIB_LIBRARY_ENV}={wanted!r} is not one of "
                      f"{', '.join(ZLIB_LIBRARIES)}; using isal", UserWarning, stacklevel=2)
        wanted = "isal"
    decompress.library = "isal" if wanted == "isal" and _isal_zlib is not None else "zlib"
    return str(decompress.library)


ZLIB_LIBRARY = use_fast_zlib()
#: what a corrupt ZLIB basket raises, from either library
_ZLIB_ERRORS: tuple[type[BaseException], ...] = (
    (zlib.error,) if _isal_zlib is None else (zlib.error, _isal_zlib.error))


def _client_errors() -> tuple[type[BaseException], ...]:
    """aiohttp's errors (fsspec's HTTP reads), some of which are not OSErrors.

    ``ServerDisconnectedError`` (a connection dropped mid-request) escaped
    every handler as itself before; it is a network failure like the others.
    """
    try:
        from aiohttp import ClientError
    except ImportError:  # no HTTP support installed: nothing to catch
        return ()
    return (ClientError,)


#: network failures that are not OSErrors (retried when the URL is remote)
_NETWORK_ERRORS = _client_errors()

__all__ = [
    "FileRef",
    "resolve_files",
    "open_tree",
    "OpenTrees",
    "read_open",
    "tree_path",
    "read_range",
    "read_pool",
    "read_errors",
    "file_identity",
    "split_key",
    "is_remote",
    "with_retries",
]

T = TypeVar("T")
REMOTE_SCHEMES = ("root://", "http://", "https://")
_NOT_TRANSIENT = re.compile(
    r"No such file|\[3011\]|(?<!\d)404(?!\d)|not a ROOT file|Permission denied")


@dataclass(frozen=True)
class FileRef:
    """One input file: the URL uproot opens and the source (label group) it belongs to.

    ``key`` is the file's base name: it seeds the train/validation/test split,
    so a file gives the same split read locally or through XRootD.
    """

    url: str
    source: int
    key: str


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def _expand(name: str, base_dir: Path, redirector: str | None) -> list[str]:
    if is_remote(name):
        if glob.has_magic(name):  # uproot would look for a file named '*.root'
            raise SourceError(f"{name!r} is a pattern, and patterns work on local paths only; "
                              "list the remote files one by one", file_path=name)
        return [name]
    if name.startswith("/store/") and redirector:
        return [f"{redirector}/{name}"]  # root://host:port//store/...
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if glob.has_magic(str(path)):
        matches = sorted(glob.glob(str(path)))
        if not matches:
            raise SourceError(f"no file matches the pattern {name!r}", file_path=str(path))
        return matches
    if not path.exists():
        hint = (f"; data.redirector ({redirector}) rewrites /store/... names only: write "
                f"{redirector}/{name} to read this one through it"
                if redirector and name.startswith("/") else "")
        raise SourceError(
            f"file {name!r} does not exist; name files as local paths or globs "
            "(relative to the spec), root://host:port//path, https://host/path, or "
            f"/store/... with data.redirector{hint}",
            file_path=str(path),
        )
    return [str(path)]


def resolve_files(pipeline: Pipeline) -> list[FileRef]:
    """Every input file in spec order, globs expanded, logical names redirected, each once.

    A file named twice would be read twice: ``[signal.root, "sig*.root"]``
    counted each event of signal.root twice, silently. Within a source the
    repeat is dropped with a warning (a pattern and a name overlapping is
    ordinary). In two sources it is an error: a background pattern
    ``*.root`` that also matches signal.root put every signal event in
    training twice, once per label.
    """
    refs: list[FileRef] = []
    seen: dict[str, int] = {}  # the file (see same_file) -> the source that has it
    data = pipeline.data
    for index, source in enumerate(data.sources):
        for name in source.files:
            for url in _expand(name, pipeline.base_dir, data.redirector):
                same = same_file(url)
                if same in seen:
                    _repeated(url, seen[same], index)
                    continue
                seen[same] = index
                refs.append(FileRef(url=url, source=index, key=split_key(url)))
    return refs


def same_file(url: str) -> str:
    """What two names of one file share: the real path locally (``./a``, links).

    Remotely the URL with its path normalised: ``root://h//store//a.root``
    and ``root://h//store/a.root`` are one file to the server (and were read
    twice, once per label). Whether the path is absolute (``//`` after the
    host) stays: XRootD reads ``root://h/store`` as a relative path. A query
    string is kept as written.
    """
    if not is_remote(url):
        return os.path.realpath(url)
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    path, mark, query = path.partition("?")
    absolute = "/" if path.startswith("/") else ""
    path = posixpath.normpath("/" + re.sub("/+", "/", path)).lstrip("/")
    return f"{scheme}://{host}/{absolute}{path}{mark}{query}"


def _repeated(url: str, first: int, now: int) -> None:
    if first != now:
        raise SpecError(
            f"file {url} is in two sources, data.sources[{first}] and data.sources[{now}]: "
            "its events would be read twice, once for each; a pattern such as '*.root' "
            "may match more than meant",
            field_path=f"data.sources[{now}].files",
        )
    warnings.warn(f"file {url} is named more than once in data.sources[{now}].files "
                  "(a pattern and a name, or two names of one file); it is read once",
                  UserWarning, stacklevel=3)


def split_key(url: str) -> str:
    """A file's base name: what seeds its events' splits, so a moved directory keeps them."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _is_transient(url: str, exc: BaseException) -> bool:
    if not is_remote(url) or isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    # the URL is left out: a port such as 40487 is not an HTTP 404
    text = str(exc).replace(url, "")
    return (isinstance(exc, (OSError, TimeoutError, ConnectionError, *_NETWORK_ERRORS))
            and _NOT_TRANSIENT.search(text) is None)


def _summary(exc: BaseException, url: str) -> str:
    """The exception's text on one line, without uproot's file-naming help or a repeated URL."""
    text = str(exc).split("Files may be specified as:", 1)[0]
    text = text.replace(repr(url), "").replace(f" in file {url}", "")  # said once, by us
    return " ".join(text.split()) or type(exc).__name__


def _slashes(url: str, what: str) -> str:
    """A hint for root://host:port/path, which XRootD reads as a relative path."""
    if url.startswith("root://") and "relative path" in what:
        return "; root:// URLs take the path after two slashes: root://host:port//path"
    return ""


def _lost_connection(exc: BaseException) -> str | None:
    """The network error uproot handed back in place of data, if that is what ``exc`` is.

    uproot's HTTP source (fsspec, aiohttp) returns a failed request's
    exception as the request's result, and slicing it raises ``TypeError:
    'ClientConnectorError' object is not subscriptable`` (uproot 5.7,
    ``source/coalesce.py``): a dropped connection or a timeout, which must
    be retried, not reported as a corrupt file.
    """
    found = _HANDED_BACK.search(str(exc)) if isinstance(exc, TypeError) else None
    return found.group(1) if found else None


_HANDED_BACK = re.compile(r"'(\w*(?:Error|Exception|Timeout|Disconnected)\w*)' object is not "
                          r"subscriptable")

#: What uproot and the inflaters raise on bytes that are not what the file says they are.
_CORRUPT = (ValueError, *_ZLIB_ERRORS, EOFError, IndexError, KeyError, TypeError,
            AssertionError, uproot.deserialization.DeserializationError)


@contextlib.contextmanager
def read_errors(url: str, tree: str | None = None, branch: str | None = None,
                entries: tuple[int, int] | None = None) -> Iterator[None]:
    """Translate whatever uproot, XRootD, HTTP or zlib raise into mlaas errors naming ``url``.

    With ``branch`` and ``entries`` (a read of one branch's range), a damaged
    basket is reported as that branch's data, not as an unreadable file: the
    file opened, and the rest of it may well be fine.
    """
    where = (f"branch {branch!r}, entries {entries[0]} to {entries[1]}: "
             if branch is not None and entries is not None else "")
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as exc:
        what = re.sub(r"^file not found\s*", "", _summary(exc, url))  # said once, not twice
        raise SourceError(f"file not found{': ' if what else ''}{what}{_slashes(url, what)}",
                          file_path=url, tree=tree) from exc
    except (OSError, TimeoutError, ConnectionError, *_NETWORK_ERRORS) as exc:
        what = _summary(exc, url)
        if "expected Chunk of length" in what:  # the file ends before data it points to
            plain = None if where else _not_root(url)  # or is no ROOT file, only short
            if plain:
                raise SourceError(f"not a readable ROOT file: {plain}",
                                  file_path=url, tree=tree) from exc
            kind = "the data is truncated" if where else "not a readable ROOT file (truncated?)"
            raise SourceError(f"{where}{kind}: {what.split(' from ', 1)[0]}",
                              file_path=url, tree=tree, branch=branch) from exc
        kind = type(exc).__name__
        said = kind if what == kind else f"{kind}: {what}"  # FSTimeoutError has no text
        raise SourceError(f"{where}cannot read: {said}{_slashes(url, what)}",
                          file_path=url, tree=tree, branch=branch) from exc
    except _CORRUPT as exc:
        lost = _lost_connection(exc)
        if lost is not None:  # a network failure, not the file: retried by with_retries
            raise SourceError(f"{where}the connection failed while reading ({lost})",
                              file_path=url, tree=tree, branch=branch) from ConnectionError(lost)
        plain = None if where else _not_root(url)
        if plain:
            raise SourceError(f"not a readable ROOT file: {plain}",
                              file_path=url, tree=tree) from exc
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind = ("the data is corrupt or truncated" if where
                else "not a readable ROOT file (corrupt or truncated?)")
        if url.startswith(("http://", "https://")) and "attempting to get bytes" in what:
            what += ("; if the file itself is fine, the server may ignore HTTP Range "
                     "requests, which reading parts of a file needs")
        raise SourceError(f"{where}{kind}: {type(exc).__name__}: {what}",
                          file_path=url, tree=tree, branch=branch) from exc


def _not_root(url: str) -> str | None:
    """Why the local file ``url`` is no ROOT file at all; None if it may be one, cut short.

    Every ROOT file begins with ``b"root"``, a version and ``fBEGIN`` = 100
    (4-byte big-endian each). A text file shorter than uproot's first read
    was called "not a readable ROOT file (truncated?): expected Chunk of
    length 403, received 12 bytes"; /etc/passwd even begins with "root".
    Remote files are not read again here.
    """
    if not _is_local(url):
        return None
    try:
        with open(url, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if not head:
        return "the file is empty (0 bytes)"
    if not head.startswith(b"root") and not b"root".startswith(head):
        return f"it is not a ROOT file (its first four bytes are {head[:4]!r}, not b'root')"
    if len(head) == 12 and int.from_bytes(head[8:], "big") != 100:
        return f"it is not a ROOT file (it begins {head!r}, not with a ROOT file's header)"
    return None


def with_retries(url: str, action: Callable[[], T], retry: RetrySpec,
                 sleep: Callable[[float], None] = time.sleep,
                 stop: Callable[[], bool] | None = None) -> T:
    """Run ``action``; retry transient remote failures with exponential backoff, bounded.

    The final failure says how many attempts were made, so 'server down' and
    'flaky server' read differently in a log. ``stop()`` true: nobody waits
    for this any more (its pass ended), so no further attempt is made.
    """
    for attempt in range(1, retry.attempts + 1):
        try:
            with read_errors(url):
                return action()
        except SourceError as exc:
            cause = exc.__cause__ or exc
            transient = _is_transient(url, cause)
            if not transient:
                raise
            final = attempt == retry.attempts or (stop is not None and stop())
            if not final:
                sleep(retry.backoff * 2 ** (attempt - 1))
                final = stop is not None and stop()  # the pass ended while this one waited
            if final:
                raise SourceError(f"{exc.message} ({_gave_up(attempt, cause, retry)})",
                                  **exc.context) from cause
    raise AssertionError("unreachable")


class _XRootDSource(uproot.source.xrootd.XRootDSource):
    """uproot's XRootD source, except that closing the file never waits for the server.

    On every failed request uproot closes the file before raising, and waits
    for the server's answer up to the request timeout: a server that stopped
    answering made each failed attempt last twice ``data.retries.timeout``
    (60 s with the default 30 s; 273 s in all for an epoch instead of ~92 s).
    The close is sent, and its answer is not waited for.
    """

    def _open(self) -> None:
        super()._open()
        self._resource._file = _CloseWithoutWaiting(self._resource._file)


class _CloseWithoutWaiting:
    """An ``XRootD.client.File`` whose ``close`` returns at once (its answer comes to a callback)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def __getattr__(self, name: str) -> Any:
        if name == "_file":  # not set yet (a copy made without __init__): no recursion
            raise AttributeError(name)
        return getattr(self._file, name)

    def close(self, timeout: int = 0, callback: Any = None) -> Any:
        return self._file.close(timeout=timeout, callback=callback or _ignore)


def _ignore(*_: object) -> None:
    """The answer to a close nobody waits for."""


def _gave_up(attempts: int, cause: BaseException, retry: RetrySpec) -> str:
    """How a transient failure became final: the attempts, and the timeout if it was one."""
    said = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
    if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
        said += f", each waiting up to {retry.timeout:g} s (data.retries.timeout)"
    return said


def open_file(url: str, retry: RetrySpec) -> Any:
    """uproot.open with the per-request timeout (XRootD wants whole seconds).

    ``root://`` goes through uproot's own XRootD source: the fsspec route
    passes numpy integers as read offsets, which the XRootD bindings reject
    (seen with uproot 5.7 and fsspec-xrootd 0.5 in ``num_entries_for``).

    Local files are read with plain reads (uproot's ``MultithreadedFileSource``)
    instead of its default memory map: the same epoch peaked 16% lower
    (812-857 against 985-1015 MB over a 2M-event pair, three fresh processes
    each, pass 1 392-410 against 472-485 MB) in the same time (first epoch
    4.1-4.4 against 4.1-4.8 s); see BENCHMARKS.md, 2026-11-30.
    """
    # Each range is read once, so uproot's array cache would only hold memory.
    options: dict[str, Any] = {"timeout": max(1, math.ceil(retry.timeout)), "array_cache": None}
    if url.startswith("root://"):
        options["handler"] = _XRootDSource
    elif _is_local(url):
        options["handler"] = uproot.source.file.MultithreadedFileSource
    return uproot.open(url, **options)


def _is_local(url: str) -> bool:
    """A plain path; ``file://`` URLs stay with uproot's default source, which strips
    the scheme (the plain-read source would not)."""
    return not is_remote(url) and not url.startswith("file:")


def tree_path(tree: Any) -> str:
    """Where ``tree`` is in its file, as ``data.tree`` names it: ``demo/tree`` for a
    tree in a directory (CMSSW's TFileService writes them so), not its bare name."""
    return str(tree.object_path).lstrip("/").split(";")[0]


def trees_in(file: Any, rntuples: bool = False) -> list[str]:
    """The TTrees in ``file``, by name; with ``rntuples``, its RNTuples instead.

    mlaas reads TTrees only. RNTuples (``ROOT::RNTuple``, before ROOT 6.34
    ``ROOT::Experimental::RNTuple``) are listed so that ``mlaas inspect`` and
    errors can say why one is not read, rather than leave it out silently.
    """
    kinds = ("ROOT::RNTuple", "ROOT::Experimental::RNTuple") if rntuples else ("TTree",)
    return sorted({k.split(";")[0] for k, cls in file.classnames().items() if cls in kinds})


def _not_trees(file: Any) -> str:
    """What a file without a TTree holds instead (an RNTuple, histograms...), for errors."""
    others = [f"{k.split(';')[0]} ({cls})" for k, cls in file.classnames().items()]
    if not others:
        return "none; the file holds no objects"
    unread = "; mlaas does not read RNTuples yet" if trees_in(file, rntuples=True) else ""
    return "none; it holds " + ", ".join(others) + unread


def open_tree(url: str, tree: str | None, retry: RetrySpec | None = None) -> Any:
    """Open ``url`` and return its TTree; the only tree when ``tree`` is None."""
    retry = retry or RetrySpec()
    return with_retries(url, lambda: _find_tree(url, tree, retry), retry)


def _find_tree(url: str, tree: str | None, retry: RetrySpec) -> Any:
    """One attempt of :func:`open_tree` (within a read's own attempt, see :func:`read_range`).

    A file that opens but has no such tree (or whose directory cannot be
    read) is closed here, not left to the garbage collector: an XRootD file
    closed there waits for the server on whatever thread frees it.
    """
    file = open_file(url, retry)
    try:
        return _tree_of(file, url, tree)
    except BaseException:
        _close_file(file)
        raise


def _tree_of(file: Any, url: str, tree: str | None) -> Any:
    names = trees_in(file)
    if tree is None:
        if not names:
            raise TreeNotFound(
                f"no TTree in the file (trees here: {_not_trees(file)}); mlaas reads TTrees",
                file_path=url,
            )
        if len(names) != 1:
            listed = ", ".join(names)
            raise TreeNotFound(
                f"data.tree is not set and the file has {len(names)} trees ({listed}); "
                "name one in data.tree",
                file_path=url,
            )
        return file[names[0]]
    if tree not in names:
        if tree in trees_in(file, rntuples=True):
            raise TreeNotFound(f"{tree!r} is an RNTuple, which mlaas does not read yet; it "
                               f"reads TTrees (trees here: {', '.join(names) or 'none'})",
                               file_path=url, tree=tree)
        near = close_names(tree, names)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        listed = ", ".join(names) or _not_trees(file)
        raise TreeNotFound(
            f"no tree {tree!r} in the file (trees here: {listed}){hint}",
            file_path=url, tree=tree,
        )
    return file[tree]


class OpenTrees:
    """Trees kept open for the reads of one pass: per thread, the ``limit`` last files.

    Opening a file and reading its TTree's metadata costs ~7 ms of CPU, in
    Python and under the GIL; a pass opened each file again for every chunk
    (0.16 s of an epoch's 1.3 s over the benchmark's 2M events, on the reader
    threads that the batch thread shares the GIL with). Each thread keeps its
    own (uproot's file objects are not shared between threads), the least
    recently used is closed beyond ``limit``, and :meth:`close` (or leaving
    the ``with`` block) closes the rest. A read that fails drops its tree, so
    a retry opens the file again rather than reuse a broken connection.

    A pass may end while a read of it still runs (it failed elsewhere, or
    its consumer left: see :func:`read_pool`). :meth:`close` then leaves
    that thread's files to the read (:meth:`lease`), which closes them when
    it returns, and ``closed`` tells its retries to stop.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self.closed = False
        self._lock = threading.Lock()
        self._open: dict[int, OrderedDict[tuple[str, str | None], Any]] = {}
        self._busy: set[int] = set()  # threads inside lease()

    def __enter__(self) -> OpenTrees:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, url: str, tree: str | None, retry: RetrySpec) -> Any:
        """This thread's open ``tree`` of ``url``, opened now if it has none."""
        with self._lock:
            mine = self._open.setdefault(threading.get_ident(), OrderedDict())
        key = (url, tree)
        if key in mine:
            mine.move_to_end(key)
            return mine[key]
        found = _find_tree(url, tree, retry)  # one attempt: the read retries as a whole
        mine[key] = found
        while len(mine) > self.limit:
            _close(mine.popitem(last=False)[1])
        return found

    @contextlib.contextmanager
    def lease(self, url: str, tree: str | None, retry: RetrySpec) -> Iterator[Any]:
        """This thread's open tree for one read: dropped if the read fails, and every
        file of the thread closed at its end if the pass was closed meanwhile."""
        me = threading.get_ident()
        with self._lock:
            self._busy.add(me)
        try:
            found = self.get(url, tree, retry)
            try:
                yield found
            except BaseException:
                self.drop(url, tree)
                raise
        finally:
            with self._lock:
                self._busy.discard(me)
                left = self._open.pop(me, OrderedDict()) if self.closed else OrderedDict()
            for t in left.values():
                _close(t)

    def drop(self, url: str, tree: str | None) -> None:
        """Close this thread's tree of ``url`` (after a failed read)."""
        with self._lock:
            mine = self._open.get(threading.get_ident(), OrderedDict())
        found = mine.pop((url, tree), None)
        if found is not None:
            _close(found)

    def close(self) -> None:
        """Close every file not in use now; a read in progress closes its own."""
        with self._lock:
            self.closed = True
            idle = [ident for ident in self._open if ident not in self._busy]
            every = [t for ident in idle for t in self._open.pop(ident).values()]
        for found in every:
            _close(found)


@contextlib.contextmanager
def read_pool(trees: OpenTrees, depth: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """Threads that read ahead for one pass over ``trees``; a failed pass does not wait for them.

    On the way out, reads not begun are cancelled. A pass left early (its
    generator closed) or failed closes ``trees`` first, so a running read
    makes no further attempt. The pass left early waits for running reads
    (at most one attempt each, so no thread outlives the pass); the failed
    one does not: each running read closes its own file when it returns.
    Waiting there (the executor's ``with``) made an epoch whose XRootD
    server stalled fail only once another reader had run its own retries
    for a chunk nobody would use (21-24 s instead of ~7 s with ``timeout: 3,
    attempts: 2``).
    """
    pool = ThreadPoolExecutor(depth, thread_name_prefix=name)
    wait = True
    try:
        yield pool
    except BaseException as exc:
        pool.shutdown(wait=False, cancel_futures=True)  # before a free thread takes one
        trees.close()
        wait = isinstance(exc, GeneratorExit)
        raise
    finally:
        pool.shutdown(wait=wait, cancel_futures=True)


def _close(tree: Any) -> None:
    _close_file(tree.file)


def _close_file(file: Any) -> None:
    with contextlib.suppress(Exception):  # closing is best effort: the reads are done
        file.close()


def read_open(t: Any, url: str, branches: Sequence[str], start: int, stop: int
              ) -> dict[str, ak.Array]:
    """Entries ``[start, stop)`` of ``branches`` of the open tree ``t`` (from ``url``).

    No retries (see :func:`read_range`); a damaged basket raises an error
    naming its branch and the range.
    """
    out: dict[str, ak.Array] = {}
    rest = set(branches)
    tree = tree_path(t)
    if isinstance(t.file.source, uproot.source.file.MultithreadedFileSource):  # local
        top = {b.name: b for b in t.branches}
        counted: dict[Any, np.ndarray] = {}  # offsets per counting leaf, shared
        for name in (n for n in branches if n in top):
            with contextlib.suppress(baskets.NotPlain), read_errors(  # NotPlain: uproot
                    url, tree, name, (start, stop)):
                out[name] = baskets.read_plain(top[name], start, stop, counted)
                rest.discard(name)
    if rest:
        try:
            out.update(t.arrays(filter_name=lambda name: name in rest, entry_start=start,
                                entry_stop=stop, library="ak", how=dict))
        except _CORRUPT:  # find the branch, so the error can name it
            for name in [n for n in branches if n in rest]:
                with read_errors(url, tree, name, (start, stop)):
                    t.arrays(filter_name=lambda n, name=name: n == name,
                             entry_start=start, entry_stop=stop, library="ak")
            raise
    return out


def read_range(url: str, tree: str | None, branches: Sequence[str], start: int, stop: int,
               retry: RetrySpec | None = None, trees: OpenTrees | None = None,
               ) -> dict[str, ak.Array]:
    """Read entries ``[start, stop)`` of ``branches``; retried as a whole on transient failure.

    With ``trees`` the file stays open for the pass's next reads; without,
    it is closed at once (no handle or cache kept per chunk until GC).
    """
    retry = retry or RetrySpec()

    def action() -> dict[str, ak.Array]:
        if trees is not None:
            with trees.lease(url, tree, retry) as t:
                return read_open(t, url, branches, start, stop)
        t = _find_tree(url, tree, retry)
        try:
            return read_open(t, url, branches, start, stop)
        finally:
            t.file.close()

    pass_over = None if trees is None else (lambda: trees.closed)
    return with_retries(url, action, retry, stop=pass_over)


def file_identity(url: str, tree: Any | None = None) -> dict[str, Any]:
    """What identifies a file's content for caches: size, mtime and UUID locally, UUID remotely.

    Size and mtime alone miss a file rewritten with the same size whose old
    mtime was put back, as ``cp -p``, ``rsync -a`` and ``tar x`` do: its
    cache entries were read stale. Each new ROOT file gets a new UUID, so
    with the open ``tree`` (as the chunk plan passes it) the UUID is part of
    the identity locally too. A file changed in place (ROOT's UPDATE mode)
    keeps its UUID; there size and mtime still tell.
    """
    ident: dict[str, Any] = {"url": url}
    if not is_remote(url):
        st = os.stat(url)
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    if tree is not None:
        ident["uuid"] = str(tree.file.uuid)
        ident["entries"] = int(tree.num_entries)
    return ident


def entries_per_step(tree: Any, branches: Sequence[str], step_size: str | int) -> int:
    """How many entries make one chunk of ``step_size`` for these branches (at least 1)."""
    if isinstance(step_size, int):
        return step_size
    wanted = set(branches)
    n = tree.num_entries_for(step_size, filter_name=lambda name: name in wanted)
    return max(1, int(n))


def cluster_starts(tree: Any, branches: Sequence[str]) -> list[int]:
    """Entries where every one of ``branches`` starts a new basket (empty if unknown)."""
    wanted = set(branches)
    try:
        return [int(e) for e in tree.common_entry_offsets(
            filter_name=lambda name: name in wanted)]
    except Exception:  # noqa: BLE001 - an optimisation: cutting anywhere still works
        return []


def compressed_bytes(tree: Any, branches: Sequence[str]) -> int:
    """Compressed size of the branches, for MB/s in progress bars."""
    total = 0
    for name in branches:
        with contextlib.suppress(Exception):
            total += int(tree[name].compressed_bytes)
    return total
