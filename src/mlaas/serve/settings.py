"""Per-model dynamic batching settings: the one validator, and how the sources combine.

Layer: serving (validation only: no HTTP, no storage, no batching). Two
settings say how :class:`mlaas.serve.runtime.Runtime` merges concurrent
requests of a model:

==================  =================  ============================================
field               type               meaning
==================  =================  ============================================
``max_batch_size``  int >= 1           most events (rows) merged into one ONNX
                                       Runtime call; a larger request runs alone
``max_delay_ms``    finite float >= 0  longest wait, after the first request of a
                                       batch, for others to join it
==================  =================  ============================================

They come from three places; per field, the first that sets it wins:

1. the operator's settings of the model, ``PUT /api/models/{name}/serving``
   (:mod:`mlaas.serve.app`), kept by the registry next to the model's
   versions (:meth:`mlaas.serve.registry.Registry.set_serving`) and applied to
   the batches formed after the change, without a restart;
2. the bundle's own ``serving`` object in its spec.json (per version),
   checked when the bundle is uploaded;
3. the server's defaults (``mlaas serve --max-batch-size --max-delay-ms``).

Both sources that come from outside (a request body, a bundle) go through
:func:`parse_settings`, so they are refused the same way: strict types (no
``"8"`` for 8, no ``true`` for 1), no unknown fields, and an error naming
the field. So does the operator's stored file when it is read back: one
edited by hand into something invalid is reported, not applied (see
:meth:`mlaas.serve.registry.Registry.serving`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlaas.errors import BadRequest, BundleError, MlaasError

__all__ = ["ServingSettings", "Batching", "parse_settings", "bundle_settings", "combine",
           "effective", "FIELDS",
           "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_DELAY_MS"]

DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_DELAY_MS = 2.0


class ServingSettings(BaseModel):
    """The settings as given: a field left out (None) falls through to the next source."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_batch_size: int | None = Field(
        default=None, ge=1, description="Most events (rows) merged into one ONNX Runtime call.")
    max_delay_ms: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="Longest wait, in ms, after a batch's first request for others to join.")


FIELDS = tuple(ServingSettings.model_fields)


@dataclass(frozen=True)
class Batching:
    """The settings a batcher runs with, every field decided."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS

    def to_dict(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "max_delay_ms": self.max_delay_ms}


def parse_settings(data: Any, *, error: type[MlaasError] = BadRequest,
                   prefix: str = "") -> dict[str, Any]:
    """The fields ``data`` sets, validated; raises ``error`` naming the first bad field.

    Args:
        data: a JSON object (a request body, a bundle's ``serving``).
        error: the error class to raise (:class:`BadRequest` for a request, 400;
            :class:`~mlaas.errors.BundleError` for a bundle, also 400).
        prefix: put before field names in the error (``"serving."`` for a bundle's).
    """
    where = prefix.rstrip(".") or "the body"
    if not isinstance(data, Mapping):
        raise error(f"{where} must be a JSON object with {' and/or '.join(FIELDS)}, not "
                    f"{type(data).__name__}", field=prefix.rstrip(".") or None)
    try:
        parsed = ServingSettings.model_validate(dict(data))
    except ValidationError as exc:
        problems = [(prefix + ".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()]
        text = "; ".join(f"{field}: {message}" for field, message in problems)
        raise error(f"invalid serving settings: {text}", field=problems[0][0]) from None
    return parsed.model_dump(exclude_none=True)


def bundle_settings(bundle_spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields a bundle's own ``serving`` object sets, validated (a bundle may have
    been put in the registry directory by hand, past the upload's check).

    Args:
        bundle_spec: the bundle's spec.json (None: a bundle without one sets nothing).

    Raises :class:`~mlaas.errors.BundleError` naming ``serving.<field>``. Its own
    function so a server parses each bundle once, when it loads it, not per batch.
    """
    own_raw = (bundle_spec or {}).get("serving")
    return {} if own_raw is None else parse_settings(own_raw, error=BundleError,
                                                     prefix="serving.")


def combine(stored: Mapping[str, Any], own: Mapping[str, Any], defaults: Batching) -> Batching:
    """The settings of one model version from sources already valid: per field the
    operator's (``stored``), else the bundle's (``own``, from :func:`bundle_settings`),
    else ``defaults``. No validation, so it is cheap enough for every request."""
    merged = {**defaults.to_dict(), **own, **stored}
    return Batching(int(merged["max_batch_size"]), float(merged["max_delay_ms"]))


def effective(stored: Mapping[str, Any], bundle_spec: Mapping[str, Any] | None,
              defaults: Batching) -> Batching:
    """The settings of one model version: the operator's (``stored``, already valid),
    else the bundle's own ``serving`` (validated here: a bundle may have been put in
    the registry directory by hand), else ``defaults``."""
    return combine(stored, bundle_settings(bundle_spec), defaults)
