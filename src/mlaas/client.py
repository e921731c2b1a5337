"""The Python client of an ``mlaas server``: files, jobs, artifacts, models, predictions.

Layer: client. :class:`Client` wraps one :class:`httpx.Client` and speaks the
HTTP contract of ``docs/platform-api.md`` plus the inference routes of
:mod:`mlaas.serve.app`. It imports neither the data layer nor torch, so the
CLI commands built on it start fast.

Errors are translated at one boundary (:meth:`Client._send`):

- an error answer ``{"error": ClassName, "message": ..., <context>}`` becomes
  an exception of that class name that subclasses the matching
  :mod:`mlaas.errors` family (``NotFound``, ``SpecError`` with its
  ``problems``, ``Unauthorized``, ...), so one ``except NotFound`` works for a
  local registry and a remote server alike;
- a server that cannot be reached becomes :class:`ServerUnreachable` (an
  ``OSError``) naming the URL.

The token comes from the ``token`` argument or ``MLAAS_TOKEN``; it is sent as
``Authorization: Bearer ...`` and never shown in reprs or messages.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import quote

import httpx

from mlaas import errors
from mlaas.errors import (
    Conflict,
    DataError,
    Forbidden,
    MlaasError,
    NotFound,
    PathError,
    PlatformError,
    QuotaExceeded,
    RateLimited,
    ServeError,
    SpecError,
    Unauthorized,
)
from mlaas.spec import read_spec_file

__all__ = [
    "Client",
    "ServerUnreachable",
    "WaitTimeout",
    "DEFAULT_SERVER",
    "FINAL_STATES",
    "error_from_response",
    "workspace_name",
]

DEFAULT_SERVER = "http://127.0.0.1:8080"
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
SUBMIT_PREFIX = "submit"
_CHUNK = 1 << 20


class ServerUnreachable(PlatformError, ConnectionError):
    """The server does not answer: refused, timed out, or the connection broke (an ``OSError``)."""


class WaitTimeout(PlatformError, TimeoutError):
    """:meth:`Client.wait` gave up before the job reached a final state."""


# -- errors: the server's JSON error body back into an mlaas exception -------------------

# Error classes defined outside mlaas.errors (serving, training), by the family they
# belong to; importing their modules would pull numpy and onnxruntime into the client.
_FOREIGN: dict[str, tuple[type[MlaasError], ...]] = {
    "ModelNotFound": (NotFound,),
    "JobNotFound": (NotFound,),
    "InvalidName": (ServeError, ValueError),
    "BadRequest": (ServeError, ValueError),
    "ProtocolError": (ServeError, ValueError),
    "RequestTooLarge": (QuotaExceeded,),
    "Overloaded": (ServeError,),
    "InferenceError": (ServeError,),
    "InvalidEvent": (DataError,),
    "TrainingError": (MlaasError, RuntimeError),
}

# Server classes that also belong to a platform family, so ``except NotFound`` catches a
# missing model as it catches a missing job or file.
_ALSO: dict[str, type[MlaasError]] = {"ModelNotFound": NotFound, "RequestTooLarge": QuotaExceeded}

# Anything else (``HTTPError``, ``InternalServerError``, a class this client does not
# know yet) by its HTTP status.
_BY_STATUS: dict[int, tuple[type[MlaasError], ...]] = {
    400: (ServeError, ValueError), 401: (Unauthorized,), 403: (Forbidden,), 404: (NotFound,),
    405: (Conflict,), 409: (Conflict,), 413: (QuotaExceeded,), 422: (SpecError,),
    429: (RateLimited,),
}
_OTHER: tuple[type[MlaasError], ...] = (PlatformError,)

_RESERVED = {"error", "message", "problems", "args", "context", "exit_code", "status_code",
             "with_traceback", "add_note"}
_REMOTE_CLASSES: dict[tuple[str, tuple[type, ...]], type[MlaasError]] = {}


def _remote_class(name: str, bases: tuple[type[MlaasError], ...]) -> type[MlaasError]:
    """A subclass of ``bases`` named like the server's class, made once per (name, bases)."""
    key = (name, bases)
    if key not in _REMOTE_CLASSES:
        _REMOTE_CLASSES[key] = type(name, bases, {
            "__module__": __name__,
            "__doc__": f"The server's {name}, rebuilt by mlaas.client.",
        })
    return _REMOTE_CLASSES[key]


def _class_for(name: str, status: int) -> type[MlaasError]:
    local = getattr(errors, name, None) if name in errors.__all__ else None
    if isinstance(local, type) and issubclass(local, MlaasError):
        also = _ALSO.get(name)
        if also is not None and not issubclass(local, also):
            return _remote_class(name, (local, also))
        return local
    if name in _FOREIGN:
        return _remote_class(name, _FOREIGN[name])
    bases = _BY_STATUS.get(status, _OTHER)
    if not name.isidentifier():
        name = "HTTPError"
    return _remote_class(name, bases)


def error_from_response(response: httpx.Response) -> MlaasError:
    """The mlaas exception an error answer stands for (it is returned, not raised).

    Args:
        response (httpx.Response): an answer with status >= 400, read already.

    The exception's class has the server's class name and subclasses the
    matching :mod:`mlaas.errors` class (or the family of its HTTP status); it
    carries the body's context fields as attributes, ``status_code``, and for
    :class:`SpecError` the ``problems`` as ``(field_path, message)`` pairs.
    """
    status = response.status_code
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        text = response.text.strip()[:500] or response.reason_phrase
        body = {"error": "HTTPError", "message": f"HTTP {status} from {response.request.url}: {text}"}
    name = str(body.get("error") or "HTTPError")
    message = str(body.get("message") or f"HTTP {status} {response.reason_phrase}")
    if name == "HTTPError" and status == 404 and "message" in body:
        message = f"{message}: {response.request.method} {response.request.url.path}"
    cls = _class_for(name, status)
    context = {k: v for k, v in body.items()
               if isinstance(k, str) and k.isidentifier() and not k.startswith("_")
               and k not in _RESERVED}
    if issubclass(cls, RateLimited) and "retry_after" not in context:
        header = response.headers.get("Retry-After")
        if header and header.strip().isdigit():
            context["retry_after"] = int(header)
    try:
        if issubclass(cls, SpecError):
            problems = [tuple(p) if isinstance(p, (list, tuple)) and len(p) == 2
                        else (str(p.get("location", "")), str(p.get("message", "")))
                        if isinstance(p, dict) else ("", str(p))
                        for p in body.get("problems") or []]
            exc: MlaasError = cls(message, [(str(a), str(b)) for a, b in problems], **context)
        else:
            exc = cls(message, **context)
    except TypeError:  # a class whose constructor takes other arguments
        exc = _remote_class(name, _BY_STATUS.get(status, _OTHER))(message, **context)
    exc.status_code = status  # type: ignore[attr-defined]
    return exc


# -- workspace names for local files --------------------------------------------------


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def workspace_name(local: Path, sha256: str) -> str:
    """Where ``submit`` puts a local file: ``submit/<sha256[:16]>/<basename>``.

    The content hash makes the name stable (the same file is uploaded once)
    and keeps two different files with the same base name apart.
    """
    return f"{SUBMIT_PREFIX}/{sha256[:16]}/{local.name}"


def _check_workspace_path(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or "\\" in path or any(p in ("..", ".") for p in parts):
        raise PathError(f"workspace path {path!r} must be relative, '/'-separated and stay "
                        "inside the workspace (no '..', no leading '/')", path=path)
    return path


def _is_remote(name: str) -> bool:
    return "://" in name


def _has_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


# -- the client ---------------------------------------------------------------------------


class Client:
    """A connection to an ``mlaas server``; use it as a context manager or call :meth:`close`.

    Args:
        base_url (str): the server, e.g. ``http://127.0.0.1:8080``; default
            ``MLAAS_SERVER``, else ``http://127.0.0.1:8080``.
        token (str or None): bearer token; default ``MLAAS_TOKEN`` (none in
            single-user mode).
        timeout (float): seconds for connecting and for each read.
        transport (httpx.BaseTransport or None): what carries the requests
            (tests pass ``httpx.MockTransport`` or a TestClient's transport).
    """

    def __init__(self, base_url: str | None = None, *, token: str | None = None,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = (base_url or os.environ.get("MLAAS_SERVER") or DEFAULT_SERVER).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise PathError(f"server URL {self.base_url!r} must start with http:// or https://",
                            server=self.base_url)
        token = token if token is not None else os.environ.get("MLAAS_TOKEN")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport, follow_redirects=False)

    def __repr__(self) -> str:  # never the token
        return f"Client({self.base_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the one boundary where HTTP becomes mlaas errors ------------------------------

    def _unreachable(self, exc: httpx.TransportError) -> ServerUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            why = f"no answer within {self.timeout:g} s"
        elif isinstance(exc, httpx.ConnectError):
            why = "connection refused or host not found"
        else:
            why = f"{type(exc).__name__}: {exc}"
        return ServerUnreachable(
            f"cannot reach the mlaas server at {self.base_url} ({why}); start one with "
            "`mlaas server`, or point --server / MLAAS_SERVER at it", server=self.base_url)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise PlatformError(f"the server's answer to {method} {path} is not JSON",
                                server=self.base_url) from exc

    # -- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok"}`` when the server is up."""
        return self._json("GET", "/healthz")  # type: ignore[no-any-return]

    # -- files ----------------------------------------------------------------------------

    @staticmethod
    def _file_url(path: str) -> str:
        return "/api/files/" + quote(_check_workspace_path(path), safe="/")

    def upload_file(self, path: str, data: str | os.PathLike[str] | bytes) -> dict[str, Any]:
        """Put a file into the caller's workspace; returns ``FileOut`` (path, size, sha256).

        Args:
            path (str): workspace path, relative and ``/``-separated.
            data (PathLike, str or bytes): a local file (streamed, not read
                into memory) or the bytes themselves.
        """
        url = self._file_url(path)
        if isinstance(data, bytes):
            return self._json("PUT", url, content=data)  # type: ignore[no-any-return]
        local = Path(data)
        try:
            f: IO[bytes] = local.open("rb")
        except OSError as exc:
            raise PathError(f"cannot read local file {str(local)!r} for upload: {exc.strerror}",
                            file_path=str(local)) from exc
        with f:
            return self._json("PUT", url, content=f,  # type: ignore[no-any-return]
                              headers={"Content-Type": "application/octet-stream"})

    def list_files(self) -> list[dict[str, Any]]:
        """The caller's workspace files, each ``{"path", "size", "sha256", "updated_at"}``."""
        return self._json("GET", "/api/files")["files"]  # type: ignore[no-any-return]

    def download_file(self, path: str) -> bytes:
        """The bytes of one workspace file."""
        return self._send("GET", self._file_url(path)).content

    def delete_file(self, path: str) -> None:
        """Remove one workspace file."""
        self._send("DELETE", self._file_url(path))

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, spec: str | os.PathLike[str] | Mapping[str, Any], *, name: str | None = None,
               upload_workspace_files: bool = True,
               visibility: str | None = None) -> dict[str, Any]:
        """Submit a pipeline as a job; returns its ``JobOut`` (``id``, ``state``, ...).

        Args:
            spec (PathLike, str or mapping): a local YAML/JSON spec file, or the
                parsed spec.
            name (str or None): the job's name; default the spec's ``name``,
                else the file's stem.
            upload_workspace_files (bool): upload the local files the spec names
                (``data.sources[].files``, globs expanded here, and
                ``model.file``) to ``submit/<sha256>/<basename>`` in the workspace
                and submit the spec pointing there. Relative names are relative
                to the spec file's directory (the current one for a mapping).
                URLs and names with no local file pass unchanged (they may
                already be workspace paths).
            visibility (str or None): who may read the job (and the model it
                registers, if the name is new): ``private`` (the server's
                default), ``group:<name>`` (a group you belong to) or ``public``.

        The server validates the spec; an invalid one raises :class:`SpecError`
        listing each problem by field path.
        """
        if isinstance(spec, Mapping):
            raw: dict[str, Any] = json.loads(json.dumps(spec))  # a deep, JSON-able copy
            base_dir, stem = Path.cwd(), None
        else:
            path = Path(spec)
            raw, base_dir, stem = read_spec_file(path), path.resolve().parent, path.stem
        if upload_workspace_files:
            raw = self.upload_spec_files(raw, base_dir)
        job_name = name or (raw.get("name") if isinstance(raw.get("name"), str) else None) \
            or stem or "job"
        body: dict[str, Any] = {"name": job_name, "spec": raw}
        if visibility is not None:
            body["visibility"] = visibility
        return self._json("POST", "/api/jobs", json=body)  # type: ignore[no-any-return]

    def upload_spec_files(self, raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
        """Upload the local files ``raw`` names and return a copy naming their workspace paths.

        See :meth:`submit`. A file already in the workspace with the same
        content is not sent again.
        """
        out: dict[str, Any] = json.loads(json.dumps(raw))
        present: dict[str, str] | None = None

        def put(local: Path) -> str:
            nonlocal present
            if present is None:
                present = {f["path"]: f.get("sha256", "") for f in self.list_files()}
            sha = _sha256_of(local)
            target = workspace_name(local, sha)
            if present.get(target) != sha:
                self.upload_file(target, local)
                present[target] = sha
            return target

        def local_files(name: str) -> list[Path] | None:
            if _is_remote(name):
                return None
            full = Path(name).expanduser()
            full = full if full.is_absolute() else base_dir / full
            if _has_glob(name):
                found = sorted(Path(p) for p in glob.glob(str(full)) if Path(p).is_file())
                return found or None
            return [full] if full.is_file() else None

        data = out.get("data")
        sources = data.get("sources") if isinstance(data, dict) else None
        for source in sources if isinstance(sources, list) else []:
            files = source.get("files") if isinstance(source, dict) else None
            if not isinstance(files, list):
                continue
            rewritten: list[Any] = []
            for entry in files:
                found = local_files(entry) if isinstance(entry, str) else None
                rewritten.extend([put(p) for p in found] if found else [entry])
            source["files"] = rewritten
        model = out.get("model")
        if isinstance(model, dict) and isinstance(model.get("file"), str):
            found = local_files(model["file"])
            if found and len(found) == 1:
                model["file"] = put(found[0])
        return out

    def jobs(self, state: str | None = None, name: str | None = None, mine: bool = False,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs the caller may see, newest first, optionally filtered."""
        params: dict[str, Any] = {}
        if state:
            params["state"] = state
        if name:
            params["name"] = name
        if mine:
            params["mine"] = "true"
        if limit is not None:
            params["limit"] = limit
        return self._json("GET", "/api/jobs", params=params)["jobs"]  # type: ignore[no-any-return]

    @staticmethod
    def _job_url(job_id: str, rest: str = "") -> str:
        return f"/api/jobs/{quote(str(job_id), safe='')}{rest}"

    def job(self, job_id: str) -> dict[str, Any]:
        """One job's ``JobOut``: state, timestamps, queue position, progress."""
        return self._json("GET", self._job_url(job_id))  # type: ignore[no-any-return]

    def logs(self, job_id: str, *, follow: bool = False, offset: int = 0,
             reconnect: float = 60.0) -> Iterator[str]:
        """The job's log as text pieces; with ``follow``, pieces arrive until the job ends.

        Args:
            offset (int): start after this many bytes of the log.
            reconnect (float): with ``follow``, a connection that drops or a
                stream that ends while the job is not final (a server restart)
                is resumed from the last byte received, retrying for up to this
                many seconds before :class:`ServerUnreachable`.

        Join the pieces for the whole log; they are not split at lines.
        """
        url = self._job_url(job_id, "/logs")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        position, down_since = offset, None
        while True:
            params: dict[str, Any] = {"offset": position}
            if follow:
                params["follow"] = "true"
            try:
                with self._http.stream("GET", url, params=params, **(
                        {"timeout": httpx.Timeout(self.timeout, read=None)} if follow else {})
                        ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_from_response(response)
                    for block in response.iter_bytes():
                        position += len(block)
                        down_since = None
                        text = decoder.decode(block)
                        if text:
                            yield text
                if not follow or self.job(job_id).get("state") in FINAL_STATES:
                    break
            except (httpx.TransportError, ServerUnreachable) as exc:
                now = time.monotonic()
                down_since = down_since or now
                if not follow or now - down_since > reconnect:
                    if isinstance(exc, ServerUnreachable):
                        raise
                    raise self._unreachable(exc) from exc
                time.sleep(min(1.0, max(0.05, reconnect / 60)))
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Per-epoch history: ``[{"epoch", "train_loss", "val_loss", ...}, ...]``."""
        return self._json("GET", self._job_url(job_id, "/metrics"))["history"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the server to cancel; returns the ``JobOut`` (:class:`Conflict` if already final)."""
        return self._json("POST", self._job_url(job_id, "/cancel"))  # type: ignore[no-any-return]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's files: ``[{"path", "size"}, ...]`` (bundle, plots, metrics)."""
        return self._json("GET", self._job_url(job_id, "/artifacts"))["artifacts"]  # type: ignore[no-any-return]

    def artifact(self, job_id: str, path: str) -> bytes:
        """The bytes of one artifact, e.g. ``metrics.json``."""
        url = self._job_url(job_id, "/artifacts/" + quote(_check_workspace_path(path), safe="/"))
        return self._send("GET", url).content

    def download(self, job_id: str, dest_dir: str | os.PathLike[str]) -> list[Path]:
        """Save every artifact of the job under ``dest_dir``; returns the files written.

        Each artifact path the server names is checked to stay inside
        ``dest_dir`` (:class:`PathError` otherwise, before anything is
        written); files are streamed to a temporary name and renamed.
        """
        root = Path(dest_dir).resolve()
        items = self.artifacts(job_id)
        targets: list[tuple[str, Path]] = []
        for item in items:
            rel = str(item.get("path", ""))
            try:
                _check_workspace_path(rel)
            except PathError:
                raise PathError(f"the server named an artifact path that leaves the download "
                                f"directory: {rel!r}", path=rel, job_id=job_id) from None
            target = (root / rel).resolve()
            if not target.is_relative_to(root) or target == root:
                raise PathError(f"the server named an artifact path that leaves the download "
                                f"directory: {rel!r}", path=rel, job_id=job_id)
            targets.append((rel, target))
        written: list[Path] = []
        for rel, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            url = self._job_url(job_id, "/artifacts/" + quote(rel, safe="/"))
            try:
                with self._http.stream("GET", url) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_from_response(response)
                    with partial.open("wb") as f:
                        for block in response.iter_bytes():
                            f.write(block)
            except httpx.TransportError as exc:
                partial.unlink(missing_ok=True)
                raise self._unreachable(exc) from exc
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            partial.replace(target)
            written.append(target)
        return written

    def wait(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0,
             reconnect: float = 60.0) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; returns the final ``JobOut``.

        Args:
            timeout (float or None): give up after this many seconds
                (:class:`WaitTimeout`); ``None`` waits as long as it takes.
            poll (float): seconds between status requests.
            reconnect (float): keep polling through a server that does not
                answer (a restart) for up to this many seconds, then
                :class:`ServerUnreachable`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        while True:
            try:
                job = self.job(job_id)
                down_since = None
                if job.get("state") in FINAL_STATES:
                    return job
                state = job.get("state")
            except ServerUnreachable:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect:
                    raise
                state = "unreachable"
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id!r} is still {state} after {timeout:g} s",
                                  job_id=job_id)
            pause = poll if deadline is None else min(poll, deadline - time.monotonic())
            time.sleep(max(0.0, pause))

    # -- the farm: queues, nodes, scaling --------------------------------------------------

    def queues(self) -> dict[str, Any]:
        """``{"queues": [...], "configured": [...], "policy"}``: every queue's quotas,
        usage and pending/running counts (admins also get the job ids)."""
        return self._json("GET", "/api/queues")  # type: ignore[no-any-return]

    def set_queues(self, queues: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Replace the queue configuration (admins); answers as :meth:`queues`."""
        return self._json("PUT", "/api/queues",  # type: ignore[no-any-return]
                          json={"queues": [dict(q) for q in queues]})

    def nodes(self) -> dict[str, Any]:
        """``{"nodes": [...], "executor"}``: each node's flavors, capacity and free devices."""
        return self._json("GET", "/api/nodes")  # type: ignore[no-any-return]

    def scaling(self) -> dict[str, Any]:
        """The provisioner's signal: pending demand per flavor, idle and drainable nodes."""
        return self._json("GET", "/api/scaling")  # type: ignore[no-any-return]

    # -- models and predictions ---------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """Registered models: ``[{"name", "versions", "latest", "aliases"}, ...]``."""
        return self._json("GET", "/api/models")["models"]  # type: ignore[no-any-return]

    def model(self, name: str) -> dict[str, Any]:
        """One model: its versions with metadata, and its aliases."""
        return self._json("GET", f"/api/models/{quote(name, safe='')}")  # type: ignore[no-any-return]

    def model_visibility(self, name: str) -> dict[str, Any]:
        """Who owns a model and who may read it: ``{"name", "owner", "group", "visibility"}``."""
        return self._json(  # type: ignore[no-any-return]
            "GET", f"/api/models/{quote(name, safe='')}/visibility")

    def set_model_visibility(self, name: str, visibility: str) -> dict[str, Any]:
        """Share a model you own: ``private``, ``group:<name>`` (a group you belong to;
        admins: any) or ``public``. Returns the model's new ``{"name", "owner", "group",
        "visibility"}``; :class:`SpecError` for a malformed value, :class:`Forbidden` for
        a group you are not in or a model you do not own."""
        return self._json(  # type: ignore[no-any-return]
            "PUT", f"/api/models/{quote(name, safe='')}/visibility",
            json={"visibility": visibility})

    def predict(self, model: str, events: Any, *, version: int | None = None,
                alias: str | None = None) -> list[Any]:
        """Score raw events on the server; one output per event (``None`` off the cut).

        Args:
            model (str): registered model name.
            events: rows ``[{...}, ...]``, columns ``{"MET_pt": [...], ...}`` or
                ``{"events": ...}``, as for :meth:`mlaas.bundle.Bundle.predict_events`.
            version, alias: which version; default alias ``production``, else the latest.
        """
        params: dict[str, Any] = {}
        if version is not None:
            params["version"] = version
        if alias is not None:
            params["alias"] = alias
        answer = self._json("POST", f"/api/models/{quote(model, safe='')}/predict",
                            params=params, json=events)
        return answer["outputs"]  # type: ignore[no-any-return]

    # -- personal API tokens ------------------------------------------------------------

    def create_token(self, name: str, scopes: list[str] | tuple[str, ...], *,
                     expires_in_days: float | None = None) -> dict[str, Any]:
        """Create a personal API token (``POST /api/tokens``; needs a login, not a token).

        Args:
            name (str): a label for the token (``ci``, ``laptop``).
            scopes (list of str): a non-empty subset of ``read``, ``submit``, ``predict``.
            expires_in_days (float or None): lifetime; the server's default (30) if None.

        Returns the token's description with the secret in ``"token"``: the only
        time the server shows it.
        """
        body: dict[str, Any] = {"name": name, "scopes": list(scopes)}
        if expires_in_days is not None:
            body["expires_in_days"] = expires_in_days
        return self._json("POST", "/api/tokens", json=body)  # type: ignore[no-any-return]

    def list_tokens(self) -> list[dict[str, Any]]:
        """The caller's personal API tokens, newest first (never their secrets)."""
        return self._json("GET", "/api/tokens")["tokens"]  # type: ignore[no-any-return]

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        """Revoke one of the caller's tokens by id: ``{"revoked": id}``."""
        return self._json(  # type: ignore[no-any-return]
            "DELETE", f"/api/tokens/{quote(token_id, safe='')}")

    # -- accounting -----------------------------------------------------------------------

    def usage(self, *, since: str | None = None, until: str | None = None,
              user: str | None = None, group: str | None = None) -> dict[str, Any]:
        """GPU-hours, CPU-hours, jobs, preemptions and queue waits (``GET /api/usage``).

        Args:
            since, until (str or None): the window, ISO 8601 (``2026-11-01``) or a
                duration back from now (``7d``, ``12h``); default all time to now.
            user (str or None): one user (yourself unless you are an admin).
            group (str or None): one group (one of yours unless you are an admin).

        Without ``user`` and ``group``: your own usage (an admin's: everybody's).
        Returns ``{"since", "until", "user", "group", "total", "users", "groups"}``
        (see docs/accounting.md).
        """
        params = {k: v for k, v in (("since", since), ("until", until), ("user", user),
                                    ("group", group)) if v is not None}
        return self._json("GET", "/api/usage", params=params)  # type: ignore[no-any-return]


