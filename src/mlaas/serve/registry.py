"""The model registry: named models, integer versions, aliases, hot-loaded bundles.

Layer: serving (storage). No HTTP here; :mod:`mlaas.serve.app` wires it to routes.

Layout on disk, under ``root``::

    root/.lock                    fcntl lock taken by every change
    root/.upload-*/               private staging dirs (uploads being checked)
    root/<name>/<version>/        an extracted bundle (spec.json, model.onnx, ...)
    root/<name>/<version>/.registry.json   created time, archive digest and size
    root/<name>/aliases.json      {"production": 3, "staging": 4, ...}
    root/<name>/serving.json      the operator's batching settings of the model
                                  (see :mod:`mlaas.serve.settings`); gone with the model

An upload is extracted with :func:`mlaas.bundle.safe_extract` into a staging
dir inside ``root`` (so the final ``os.rename`` stays on one file system),
validated by :meth:`Bundle.load`, and only then given the next version number
under the lock and renamed into place: a failure at any step leaves the
registry as it was. Deletions rename the version out of the tree first, so
readers never see a half-deleted bundle. Version numbers are ``max + 1`` of
the versions present.

:meth:`Registry.bundle` caches loaded bundles keyed by (name, version, inode
and mtime of the version dir), so changes made by another process or another
:class:`Registry` on the same root are seen without a restart.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from mlaas.bundle import MAX_MEMBERS, MODEL_FILE, SPEC_FILE, Bundle, bundle_root, safe_extract
from mlaas.errors import BundleError, InvalidName, ModelNotFound, ServeError, close_names
from mlaas.serve.settings import parse_settings

__all__ = [
    "Registry",
    "ModelNotFound",
    "InvalidName",
    "NAME_PATTERN",
    "DEFAULT_ALIAS",
    "MAX_ARCHIVE_BYTES",
    "archive_model_name",
]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
DEFAULT_ALIAS = "production"
MAX_ARCHIVE_BYTES = 512 * 1024**2
MAX_MEMBER_BYTES = 512 * 1024**2
MAX_TOTAL_BYTES = 2 * 1024**3
MAX_SPEC_BYTES = 16 * 1024**2
_META_FILE = ".registry.json"
_ALIASES_FILE = "aliases.json"
_SERVING_FILE = "serving.json"
_ALIASES_SUFFIX = os.sep + _ALIASES_FILE
_SETTLE_NS = 200_000_000  # state younger than this is not trusted by state_token


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidName(f"{what} {value!r} is not valid: use 1 to 64 letters, digits, '.', "
                          "'_' or '-', starting with a letter or digit", field=what)
    return value


def _check_alias(alias: str) -> str:
    _check_name(alias, "alias")
    if alias.isdigit():
        raise InvalidName(f"alias {alias!r} is all digits, which reads as a version number; "
                          "use a word", field="alias")
    return alias


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of upload ``metadata`` that is a JSON object, checked before anything is stored."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise TypeError(f"upload metadata must be a dict with string keys, not {metadata!r}")
    try:
        return dict(json.loads(json.dumps(metadata)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"upload metadata is not JSON-serialisable: {exc}") from None


def _parse_serving_file(name: str, text: str) -> dict[str, Any]:
    """The settings in model ``name``'s ``serving.json`` (``text``), or a
    :class:`ServeError` naming the file and the field (see :meth:`Registry.serving`)."""
    where = f"{name}/{_SERVING_FILE}"
    fix = f"fix the file or replace it with PUT /api/models/{name}/serving"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ServeError(f"the serving settings of model {name!r} are not valid JSON ({exc}); "
                         f"{fix}", model=name, file_path=where) from None
    if not isinstance(data, dict):
        raise ServeError(f"the serving settings of model {name!r} must be a JSON object, not "
                         f"{type(data).__name__}; {fix}", model=name, file_path=where)
    try:
        return parse_settings(data, error=ServeError)
    except ServeError as exc:
        raise ServeError(f"{exc.message} (the serving settings of model {name!r}); {fix}",
                         model=name, field=exc.context.get("field"),
                         file_path=where) from None


def _spec_summary(spec: dict[str, Any]) -> dict[str, Any]:
    layout = spec.get("layout") if isinstance(spec.get("layout"), dict) else {}
    assert isinstance(layout, dict)
    return {
        "name": spec.get("name"),
        "task": spec.get("task"),
        "n_outputs": spec.get("n_outputs"),
        "label_names": spec.get("label_names"),
        "feature_names": spec.get("feature_names"),
        "branches": sorted(layout.get("branch_types", {}) or {}),
        "branch_types": layout.get("branch_types"),
        "derived": layout.get("derived"),
        "cut": layout.get("cut"),
        "tree": spec.get("tree"),
        "inputs": spec.get("inputs"),
        "outputs": spec.get("outputs"),
        "serving": spec.get("serving"),
    }


class Registry:
    """Models stored under ``root`` by name, version and alias.

    Args:
        root: the registry directory (created if missing).
        max_archive_bytes: the largest archive :meth:`upload` accepts.
        max_member_bytes: the largest single file inside an archive.
        max_total_bytes: the largest unpacked size of an archive.
        threads: ONNX Runtime intra-op threads of the bundles it loads (default: the
            bundle's, min(2, CPUs)); a server batching small requests wants 1.

    Thread-safe; several processes may share one root (changes take an fcntl
    lock on ``root/.lock``).
    """

    def __init__(self, root: str | os.PathLike[str], *,
                 max_archive_bytes: int = MAX_ARCHIVE_BYTES,
                 max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES, threads: int | None = None) -> None:
        self.root = Path(root)
        self._root_prefix = os.path.join(os.fspath(self.root), "")  # for state_token
        self.threads = threads
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_archive_bytes = max_archive_bytes
        self.max_member_bytes = max_member_bytes
        self.max_total_bytes = max_total_bytes
        self._cache: dict[tuple[str, int], tuple[tuple[int, int], Bundle]] = {}
        self._cache_lock = threading.Lock()
        self._loading: dict[tuple[str, int], threading.Lock] = {}
        self._generation = 0  # bumped by every change made through this object

    # -- locking and paths

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                self._generation += 1
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def state_token(self, name: str) -> tuple[Any, ...] | None:
        """A cheap fingerprint of model ``name`` (two ``stat`` calls, no reads), or None.

        Equal tokens mean the model's versions and aliases are unchanged, so a
        server may reuse what it resolved before (the serving hot path does).
        Versions are added and removed by renames in the model directory (its
        mtime changes) and aliases by replacing ``aliases.json`` (a new inode);
        changes through this object also bump a counter. None (do not cache)
        for unknown names and for state changed in the last
        :data:`_SETTLE_NS`, since a file system's timestamps are coarser than
        two quick changes by another process.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            return None
        model_dir = self._root_prefix + name  # str paths: pathlib cost ~8 us, os.path.join ~1
        try:
            d = os.stat(model_dir)
        except OSError:
            return None
        newest = d.st_mtime_ns
        try:
            a = os.stat(model_dir + _ALIASES_SUFFIX)
            aliases: tuple[int, int] | None = (a.st_ino, a.st_mtime_ns)
            newest = max(newest, a.st_mtime_ns)
        except OSError:
            aliases = None
        if time.time_ns() - newest < _SETTLE_NS:
            return None
        return (self._generation, d.st_ino, d.st_mtime_ns, aliases)

    def _model_dir(self, name: str) -> Path:
        return self.root / _check_name(name, "model")

    def _names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME.fullmatch(p.name) and self._versions_of(p))

    @staticmethod
    def _versions_of(model_dir: Path) -> list[int]:
        try:
            entries = list(model_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(p.name) for p in entries
                      if p.name.isdigit() and not p.name.startswith("0") and p.is_dir())

    def _versions(self, name: str) -> list[int]:
        versions = self._versions_of(self._model_dir(name))
        if not versions:
            near = close_names(name, self._names())
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise ModelNotFound(f"no model {name!r}{hint}", model=name,
                                did_you_mean=near or None)
        return versions

    def _aliases(self, name: str) -> dict[str, int]:
        data = _read_json(self._model_dir(name) / _ALIASES_FILE)
        return {str(k): v for k, v in data.items() if isinstance(v, int)}

    # -- reading

    def list(self) -> list[dict[str, Any]]:
        """Every model: ``name``, ``versions``, ``latest``, ``aliases``."""
        out = []
        for name in self._names():
            versions = self._versions_of(self.root / name)
            if versions:
                out.append({"name": name, "versions": versions, "latest": versions[-1],
                            "aliases": self._aliases(name)})
        return out

    def versions(self, name: str) -> builtins.list[int]:
        """The versions of ``name`` on disk now, oldest first; empty for an unknown (or
        invalid) name. Cheap (one directory listing): for callers that only need to know
        which versions still exist. Loaded bundles of versions no longer there (deleted
        by another process or another Registry on the root) are forgotten on the way."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            return []
        versions = self._versions_of(self.root / name)
        with self._cache_lock:  # versions deleted by another process: let their bundles go
            for key in [k for k in (*self._cache, *self._loading)
                        if k[0] == name and k[1] not in versions]:
                self._cache.pop(key, None)
                self._loading.pop(key, None)
        return versions

    def get(self, name: str) -> dict[str, Any]:
        """One model: its versions with metadata (see :meth:`version`) and its aliases."""
        versions = self._versions(name)
        aliases = self._aliases(name)
        details = []
        for v in versions:
            with contextlib.suppress(ModelNotFound):  # deleted meanwhile
                details.append(self._describe(name, v, aliases))
        return {"name": name, "latest": versions[-1], "aliases": aliases, "versions": details}

    def version(self, name: str, version: int) -> dict[str, Any]:
        """One version: ``version``, ``created``, ``aliases``, ``spec`` (a summary),
        ``metrics``, ``provenance``, ``archive`` (sha256 and size of the upload),
        ``metadata`` (what :meth:`upload` was given, ``{}`` if nothing)."""
        self._versions(name)
        return self._describe(name, version, self._aliases(name))

    def summary(self, name: str, version: int) -> dict[str, Any]:
        """One version's ``created`` time and ``spec`` summary, as :meth:`version` gives
        them, from its two files that hold them and nothing else (no listing, no
        aliases, metrics or provenance): for listings that describe many models
        (TFaaS ``GET /models``). Raises :class:`ModelNotFound` when it is gone."""
        path = self._version_dir(name, version)
        return {"version": version, "created": _read_json(path / _META_FILE).get("created"),
                "spec": _spec_summary(_read_json(path / SPEC_FILE))}

    def _describe(self, name: str, version: int, aliases: dict[str, int]) -> dict[str, Any]:
        path = self._version_dir(name, version)
        meta = _read_json(path / _META_FILE)
        return {
            "version": version,
            "created": meta.get("created"),
            "aliases": sorted(a for a, v in aliases.items() if v == version),
            "archive": {k: meta.get(k) for k in ("sha256", "size")},
            "metadata": meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {},
            "spec": _spec_summary(_read_json(path / SPEC_FILE)),
            "metrics": _read_json(path / "metrics.json"),
            "provenance": _read_json(path / "provenance.json"),
        }

    def _version_dir(self, name: str, version: int) -> Path:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelNotFound(f"version {version!r} of model {name!r} does not exist "
                                "(versions are 1, 2, ...)", model=name, version=version)
        path = self._model_dir(name) / str(version)
        if not path.is_dir():
            versions = self._versions(name)
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: "
                                f"{', '.join(map(str, versions))})", model=name, version=version)
        return path

    def resolve(self, name: str, version: int | None = None, alias: str | None = None, *,
                versions: builtins.list[int] | None = None) -> tuple[int, Path]:
        """The version number and directory to serve.

        Args:
            name: the model.
            version: an explicit version (wins over ``alias``).
            alias: an alias; default ``production`` when set, else the latest version.
            versions: the model's versions as the caller just listed them
                (:meth:`versions`, oldest first), so that the directory is not listed
                again: a server asks for them on every request it cannot cache.
        """
        if version is not None:
            return version, self._version_dir(name, version)
        versions = list(versions) if versions else self._versions(name)
        aliases = self._aliases(name)
        if alias is not None:
            _check_alias(alias)
            if alias not in aliases:
                known = ", ".join(map(repr, sorted(aliases))) or "none"
                raise ModelNotFound(f"model {name!r} has no alias {alias!r} (aliases: {known})",
                                    model=name, alias=alias)
            v = aliases[alias]
        else:
            v = aliases.get(DEFAULT_ALIAS, versions[-1])
        return v, self._version_dir(name, v)

    def bundle(self, name: str, version: int | None = None, alias: str | None = None
               ) -> tuple[int, Bundle]:
        """The loaded bundle for (name, version or alias), from the cache when unchanged.

        Returns ``(version, bundle)``. The cache key includes the inode and
        mtime of the version directory, so a version deleted and uploaded
        again (here or by another process) is loaded afresh.
        """
        v, path = self.resolve(name, version, alias)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} has no version {v}", model=name,
                                version=v) from None
        ident = (st.st_ino, st.st_mtime_ns)
        key = (name, v)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == ident:
                return v, hit[1]
            loading = self._loading.setdefault(key, threading.Lock())
        # one load per version at a time: concurrent first requests share one Bundle
        # (and so one batcher in the server) instead of each loading their own
        with loading:
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None and hit[0] == ident:
                    return v, hit[1]
            try:
                loaded = Bundle.load(path, threads=self.threads)
            except BundleError:
                if not path.exists():
                    raise ModelNotFound(f"model {name!r} has no version {v}", model=name,
                                        version=v) from None
                raise
            with self._cache_lock:
                self._cache[key] = (ident, loaded)
                # drop versions that are gone from disk
                for k in [k for k in self._cache if k[0] == name and k != key]:
                    if not (self.root / k[0] / str(k[1])).is_dir():
                        del self._cache[k]
        return v, loaded

    def clear_cache(self) -> None:
        """Forget every loaded bundle."""
        with self._cache_lock:
            self._cache.clear()

    # -- changing

    def upload(self, name: str, archive: bytes | str | os.PathLike[str],
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add a bundle archive (``.tar.gz`` bytes or path) as the next version of ``name``.

        Args:
            name: the model (created on its first upload).
            archive: the archive's bytes or a path to it.
            metadata: extra JSON-serialisable facts stored with the version and
                returned under ``metadata`` in its description (the platform puts
                ``owner`` and ``job_id`` there).

        Returns the new version's description (:meth:`version`). Raises
        :class:`BundleError` for an unsafe, corrupt or invalid bundle, leaving
        the registry unchanged.
        """
        _check_name(name, "model")
        extra = _check_metadata(metadata)
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            if isinstance(archive, (bytes, bytearray, memoryview)):
                data = bytes(archive)
                if len(data) > self.max_archive_bytes:
                    raise BundleError(f"bundle archive is {len(data)} bytes, above the limit "
                                      f"of {self.max_archive_bytes}")
                source = staging / "archive.tar.gz"
                source.write_bytes(data)
            else:
                source = Path(archive)
                if not source.is_file():
                    raise BundleError(f"no bundle archive at {str(source)!r}",
                                      file_path=str(source))
                if source.stat().st_size > self.max_archive_bytes:
                    raise BundleError(f"bundle archive is {source.stat().st_size} bytes, above "
                                      f"the limit of {self.max_archive_bytes}")
            digest, size = _sha256(source)
            unpacked = staging / "unpacked"
            unpacked.mkdir()
            safe_extract(source, unpacked, max_member_bytes=self.max_member_bytes,
                         max_total_bytes=self.max_total_bytes)
            bundle_dir = bundle_root(unpacked)
            if not (bundle_dir / SPEC_FILE).exists():
                raise BundleError(f"the archive holds no {SPEC_FILE} (at its top or in its "
                                  "only directory); is it a bundle.tar.gz?")
            if not (bundle_dir / MODEL_FILE).exists():
                raise BundleError(f"the archive holds no {MODEL_FILE}")
            loaded = Bundle.load(bundle_dir)  # validates spec, ONNX, inputs
            if "serving" in loaded.spec:  # the bundle's own batching settings
                parse_settings(loaded.spec["serving"], error=BundleError, prefix="serving.")
            del loaded  # its session is not kept
            meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sha256": digest, "size": size, "metadata": extra}
            (bundle_dir / _META_FILE).write_text(json.dumps(meta))
            with self._locked():
                model_dir = self._model_dir(name)
                model_dir.mkdir(exist_ok=True)
                existing = self._versions_of(model_dir)
                version = (existing[-1] if existing else 0) + 1
                os.rename(bundle_dir, model_dir / str(version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.version(name, version)

    def serving(self, name: str, *, versions: builtins.list[int] | None = None
                ) -> dict[str, Any]:
        """The batching settings the operator set for model ``name`` (only the fields
        set; ``{}`` when none).

        Args:
            name: the model.
            versions: as in :meth:`resolve`: the caller listed them already, so the
                model is known to exist and its directory is not listed again.

        Raises :class:`ModelNotFound` for an unknown model, and
        :class:`~mlaas.errors.ServeError` (HTTP 500) naming the file
        (``file_path``, ``<name>/serving.json`` under the registry root) and the
        bad field (``field``) when ``serving.json`` was edited by hand into
        something invalid: not JSON, not an object, an unknown field or a bad
        value. They are the operator's settings, so they are not guessed at: the
        error says what to fix, and ``PUT /api/models/{name}/serving`` replaces
        the file. (The runtime batches the model with its bundle's or the
        server's settings meanwhile, with a warning in the log.)
        """
        if not versions:
            self._versions(name)
        try:
            text = (self._model_dir(name) / _SERVING_FILE).read_text()
        except FileNotFoundError:
            return {}
        return _parse_serving_file(name, text)

    def set_serving(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Store the batching settings of model ``name`` (replacing the previous ones; a
        field left out falls back to the bundle's own or the server's default, ``{}``
        clears them all). Validated by :func:`mlaas.serve.settings.parse_settings`
        (:class:`~mlaas.errors.BadRequest` naming the field). Returns what was stored."""
        settings = parse_settings(settings)
        with self._locked():
            self._versions(name)
            path = self._model_dir(name) / _SERVING_FILE
            if settings:
                _write_json_atomic(path, settings)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return settings

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, int]:
        """Point ``alias`` at ``version`` of ``name``; returns all aliases of the model."""
        _check_alias(alias)
        with self._locked():
            self._version_dir(name, version)
            aliases = self._aliases(name)
            aliases[alias] = version
            _write_json_atomic(self._model_dir(name) / _ALIASES_FILE, aliases)
        return aliases

    def delete_alias(self, name: str, alias: str) -> dict[str, int]:
        """Remove ``alias`` of ``name``; returns the remaining aliases."""
        with self._locked():
            self._versions(name)
            aliases = self._aliases(name)
            if alias not in aliases:
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}", model=name,
                                    alias=alias)
            del aliases[alias]
            _write_json_atomic(self._model_dir(name) / _ALIASES_FILE, aliases)
        return aliases

    def delete_version(self, name: str, version: int) -> None:
        """Remove one version and the aliases pointing at it; the last one removes the model."""
        with self._locked():
            path = self._version_dir(name, version)
            model_dir = path.parent
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
            os.rename(path, trash / "v")
            aliases = self._aliases(name)
            kept = {a: v for a, v in aliases.items() if v != version}
            if not self._versions_of(model_dir):
                for leftover in (_ALIASES_FILE, _SERVING_FILE):
                    with contextlib.suppress(FileNotFoundError):
                        (model_dir / leftover).unlink()
                os.rename(model_dir, trash / "model")
            elif kept != aliases:
                _write_json_atomic(model_dir / _ALIASES_FILE, kept)
        shutil.rmtree(trash, ignore_errors=True)
        with self._cache_lock:
            self._cache.pop((name, version), None)
            self._loading.pop((name, version), None)

    def delete_model(self, name: str) -> builtins.list[int]:
        """Remove every version of ``name``; returns the versions removed."""
        with self._locked():
            versions = self._versions(name)
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
            os.rename(self._model_dir(name), trash / "model")
        shutil.rmtree(trash, ignore_errors=True)
        with self._cache_lock:
            for k in [k for k in (*self._cache, *self._loading) if k[0] == name]:
                self._cache.pop(k, None)
                self._loading.pop(k, None)
        return versions


def archive_model_name(archive: bytes, *, max_spec_bytes: int = MAX_SPEC_BYTES,
                       max_members: int = MAX_MEMBERS) -> str | None:
    """The ``name`` in the spec.json of a bundle archive, when it is a valid model name.

    For uploads that do not say the name (TFaaS clients send a bare tarball).
    Only spec.json is read (at the top or in the only directory, where
    :func:`~mlaas.bundle.bundle_root` looks), in memory, up to
    ``max_spec_bytes``; nothing is extracted. None for anything else (no
    spec.json, no or an invalid name, a corrupt archive): the upload itself
    then says what is wrong with the archive.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            members = {}
            for m in tar:  # bounded as extraction is: a bomb of members is not listed whole
                if len(members) >= max_members:
                    return None
                members[PurePosixPath(m.name).parts] = m
            spec = members.get((SPEC_FILE,))
            if spec is None:
                dirs = {parts[0] for parts, m in members.items() if len(parts) > 1 or m.isdir()}
                spec = members.get((dirs.pop(), SPEC_FILE)) if len(dirs) == 1 else None
            if spec is None or not spec.isreg() or spec.size > max_spec_bytes:
                return None
            source = tar.extractfile(spec)
            data = json.loads(source.read()) if source is not None else None
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and _NAME.fullmatch(name) else None


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
