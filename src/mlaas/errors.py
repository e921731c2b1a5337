"""Every public mlaas exception, in one tree.

Each class subclasses the built-in a caller would already catch, so
``except KeyError`` still works for a missing branch and ``except OSError``
for an unreachable server::

    MlaasError
    ├── SpecError(ValueError)            a pipeline spec that does not validate
    ├── ExpressionError(SpecError)       a bad expression in a spec
    ├── ConfigError(SpecError)           server settings (file or flags) that do not validate
    ├── DataError(ValueError)            the data does not fit the spec
    │   ├── SourceError(OSError)         a file or server cannot be read
    │   ├── TreeNotFound(KeyError)
    │   ├── BranchNotFound(KeyError)
    │   ├── UnsupportedBranch(TypeError)
    │   ├── BadValues                    NaN/inf under ``nan: error``
    │   └── CacheError                   a cache that cannot be built or used
    ├── BundleError                      (training/export issues)
    ├── ServeError                       the inference service (mlaas.serve)
    │   ├── BadRequest(ValueError)       400: malformed JSON, a missing field
    │   ├── RequestTooLarge              413: a body above the server's limit
    │   ├── ModelNotFound(KeyError)      404: unknown model, version or alias
    │   ├── InvalidName(ValueError)      400: a model name or alias that is not allowed
    │   ├── ProtocolError(ValueError)    400: a KServe v2 request that does not fit
    │   ├── Overloaded                   503: too many requests waiting for a model
    │   └── InferenceError               500: ONNX Runtime failed on a batch
    └── PlatformError                    (platform issues)
        ├── NotFound(KeyError)           404: missing, or not readable by the caller
        ├── Forbidden(PermissionError)   403: readable but not writable by the caller
        ├── Unauthorized(PermissionError) 401: no valid credentials
        ├── Conflict                     409: a state change that is not allowed now
        ├── QuotaExceeded                413/429-ish: a byte or job quota is full
        ├── PathError(ValueError)        400: a path that leaves its root or is malformed
        └── RateLimited                  429, with ``retry_after`` seconds

Messages say what failed first, with the offending value in ``repr``; then
context lines ``in file <url>``, ``in tree <name>``, ``at spec field <path>``.
The same context is kept as attributes so an HTTP API can return it as JSON.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MlaasError",
    "SpecError",
    "ExpressionError",
    "ConfigError",
    "DataError",
    "SourceError",
    "TreeNotFound",
    "BranchNotFound",
    "UnsupportedBranch",
    "BadValues",
    "CacheError",
    "BundleError",
    "ServeError",
    "BadRequest",
    "RequestTooLarge",
    "ModelNotFound",
    "InvalidName",
    "ProtocolError",
    "Overloaded",
    "InferenceError",
    "PlatformError",
    "NotFound",
    "Forbidden",
    "Unauthorized",
    "Conflict",
    "QuotaExceeded",
    "PathError",
    "RateLimited",
    "close_names",
]


def close_names(name: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """The candidates nearest to ``name``, best first, so an error can say 'did you mean'."""
    pool = list(candidates)
    near = difflib.get_close_matches(name, pool, n=limit, cutoff=0.5)
    lowered = [c for c in pool if c.lower() == name.lower() and c not in near]
    return (lowered + near)[:limit]


class MlaasError(Exception):
    """Base of every mlaas error; carries context attributes for APIs."""

    exit_code = 1  # what the CLI exits with; preemption has its own code

    def __init__(self, message: str, **context: Any) -> None:
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}
        for key, value in self.context.items():
            setattr(self, key, value)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [self.message]
        labels = {
            "file_path": "in file",
            "tree": "in tree",
            "branch": "in branch",
            "field_path": "at spec field",
            "job_id": "for job",
        }
        for key, label in labels.items():
            if key in self.context:
                lines.append(f"{label} {self.context[key]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, **self.context}


class SpecError(MlaasError, ValueError):
    """A pipeline spec that does not validate; ``problems`` lists ``(path, message)``."""

    def __init__(
        self, message: str, problems: list[tuple[str, str]] | None = None, **context: Any
    ) -> None:
        self.problems = problems or []
        super().__init__(message, **context)

    def _render(self) -> str:
        text = super()._render()
        if self.problems:
            text += "".join(f"\n  {path}: {msg}" for path, msg in self.problems)
        return text


class ExpressionError(SpecError):
    """An expression that does not parse, or names an unknown branch or function."""


class ConfigError(SpecError):
    """Server settings (a ``--config`` file or a flag) that do not validate.

    Like :class:`SpecError`, ``problems`` lists ``(field, message)``, e.g.
    ``("cpus", "Input should be greater than or equal to 1")``.
    """


class DataError(MlaasError, ValueError):
    """The data does not fit the spec."""


class SourceError(DataError, OSError):
    """A file or server that cannot be opened or read (after retries)."""


class TreeNotFound(DataError, KeyError):
    """The requested TTree is not in the file."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self._render()


class BranchNotFound(DataError, KeyError):
    """A branch (or derived name) the spec asks for does not exist."""

    def __str__(self) -> str:
        return self._render()


class UnsupportedBranch(DataError, TypeError):
    """A branch whose type cannot become a numeric feature (strings, nested objects)."""


class BadValues(DataError):
    """NaN or infinite values in a feature while ``data.nan.policy`` is ``error``."""

    #: pass 1's statistics when pass 1 found the values (``mlaas stats`` shows them)
    stats: Any = None


class CacheError(DataError):
    """A preprocessed-data cache that does not fit or cannot be written."""


class BundleError(MlaasError, ValueError):
    """A model bundle that is corrupt, incomplete or inconsistent."""


class ServeError(MlaasError):
    """Inference service errors (:mod:`mlaas.serve`)."""


class BadRequest(ServeError, ValueError):
    """A request the server cannot read: malformed JSON, a missing field (HTTP 400)."""


class RequestTooLarge(ServeError):
    """A request body above the server's limit (HTTP 413)."""


class ModelNotFound(ServeError, KeyError):
    """An unknown model, version or alias (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self._render()


class InvalidName(ServeError, ValueError):
    """A model name or alias that does not match the registry's name pattern (HTTP 400)."""


class ProtocolError(ServeError, ValueError):
    """A request that does not follow the protocol or does not fit the model (HTTP 400).

    ``tensor`` names the offending input or output when there is one.
    """


class Overloaded(ServeError):
    """Too many requests are waiting for a model (HTTP 503); retry later."""


class InferenceError(ServeError):
    """ONNX Runtime failed while scoring a batch (HTTP 500)."""


class PlatformError(MlaasError):
    """Platform (jobs, queues, storage) errors."""


class NotFound(PlatformError, KeyError):
    """A job, file or model that does not exist, or that the caller may not read.

    The two cases are one class on purpose: answering 404 for both means ids
    cannot be probed.
    """

    def __str__(self) -> str:
        return self._render()


class Forbidden(PlatformError, PermissionError):
    """The caller may read the object but not change it."""


class Unauthorized(PlatformError, PermissionError):
    """No credentials, or credentials that do not validate (HTTP 401)."""


class Conflict(PlatformError):
    """A state change that the object's current state does not allow (cancel a finished job)."""


class QuotaExceeded(PlatformError):
    """A per-user byte quota or a similar limit is full."""


class PathError(PlatformError, ValueError):
    """A path that is absolute, contains ``..``, or otherwise leaves its root."""


class RateLimited(PlatformError):
    """Too many requests; ``retry_after`` says how many seconds to wait."""
