"""Open Inference Protocol (KServe v2) codecs: request bodies in, numpy arrays out, and back.

Layer: serving, protocol only. Pure functions over bytes, dicts and numpy
arrays; no HTTP, no ONNX Runtime. :mod:`mlaas.serve.routes_v2` wires them to
routes and :mod:`mlaas.serve.runtime` runs the model.

Supported:

* JSON tensors (``"data"`` flat or nested, row-major) of datatype ``FP32``,
  ``FP64``, ``INT32``, ``INT64`` and ``BOOL``, converted to the model's float32;
* the binary tensor data extension: with ``Inference-Header-Content-Length: N``
  the first N bytes of the body are the JSON header and each input with
  ``"parameters": {"binary_data_size": k}`` takes the next k bytes of the rest
  (little-endian, row-major, in input order); outputs are returned the same
  way when the request asks for ``binary_data`` (per output) or
  ``binary_data_output`` (request parameter).

Every problem with a request is a :class:`ProtocolError` (HTTP 400) whose
message names the tensor; its ``tensor`` attribute carries the name too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlaas.errors import ProtocolError, close_names
from mlaas.serve import jsonio

__all__ = [
    "ProtocolError",
    "TensorSpec",
    "InferRequest",
    "DATATYPES",
    "HEADER_LENGTH",
    "PLATFORM",
    "model_tensors",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "onnxruntime_onnx"

#: KServe datatype -> little-endian numpy dtype accepted for inputs.
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_DATATYPE = {np.dtype(v).newbyteorder("="): k for k, v in DATATYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the protocol shows it: name, datatype, shape (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferRequest:
    """A decoded infer request.

    ``inputs`` maps each model input to a float32 C-contiguous array of its
    declared shape; ``outputs`` lists the requested output names (all model
    outputs when the request names none); ``binary`` the outputs to send as
    binary data.
    """

    inputs: dict[str, np.ndarray]
    outputs: list[str]
    binary: set[str] = field(default_factory=set)
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def model_tensors(bundle: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of a :class:`mlaas.bundle.Bundle` as :class:`TensorSpec` lists.

    Args:
        bundle: a loaded bundle (``input_names``, ``spec`` with ``feature_names`` and
            ``mask_names``, ``n_outputs``).
    """
    widths = {"x": len(bundle.spec["feature_names"]), "mask": len(bundle.spec["mask_names"])}
    inputs = [TensorSpec(name, "FP32", (-1, widths[name])) for name in bundle.input_names]
    outputs = [TensorSpec("score", "FP32", (-1, int(bundle.n_outputs)))]
    return inputs, outputs


def model_metadata(name: str, versions: Sequence[int | str], inputs: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec], platform: str = PLATFORM) -> dict[str, Any]:
    """The model metadata response.

    Args:
        name: the model name.
        versions: its versions (sent as strings, as the protocol says).
        inputs, outputs: from :func:`model_tensors`.
        platform: the platform string.
    """
    return {"name": name, "versions": [str(v) for v in versions], "platform": platform,
            "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]}


# -- requests -------------------------------------------------------------------------------


def _loads(text: bytes, what: str) -> Any:
    try:
        return jsonio.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None


def _shape(entry: Mapping[str, Any], spec: TensorSpec) -> tuple[int, ...]:
    shape = entry.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                               and d >= 0 for d in shape)):
        raise ProtocolError(f"input {spec.name!r}: shape {shape!r} is not a list of "
                            "non-negative integers", tensor=spec.name)
    want = list(spec.shape)
    if len(shape) != len(want) or any(w != -1 and w != d for w, d in zip(want, shape)):
        raise ProtocolError(f"input {spec.name!r}: shape {shape!r} does not match the model's "
                            f"{want}", tensor=spec.name)
    return tuple(shape)


def _from_json(data: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: data is {type(data).__name__}, not a list",
                            tensor=name)
    try:
        arr = np.asarray(data)
    except ValueError as exc:  # ragged nested lists
        raise ProtocolError(f"input {name!r}: data is not a regular array: {exc}",
                            tensor=name) from None
    if arr.size:
        kind = arr.dtype.kind
        ok = {"BOOL": kind == "b", "INT32": kind in "iu", "INT64": kind in "iu"}.get(
            datatype, kind in "iuf")
        if not ok:
            raise ProtocolError(f"input {name!r}: data holds {arr.dtype.name} values, which are "
                                f"not {datatype}", tensor=name)
    n = math.prod(shape)
    if arr.size != n:
        raise ProtocolError(f"input {name!r}: data has {arr.size} values but shape "
                            f"{list(shape)} needs {n}", tensor=name)
    return arr.reshape(shape)


def _from_bytes(raw: bytes | memoryview, name: str, datatype: str,
                shape: tuple[int, ...]) -> np.ndarray:
    dtype = DATATYPES[datatype]
    n = math.prod(shape)
    if len(raw) != n * dtype.itemsize:
        raise ProtocolError(f"input {name!r}: binary_data_size is {len(raw)} bytes but shape "
                            f"{list(shape)} of {datatype} needs {n * dtype.itemsize}",
                            tensor=name)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_infer_request(body: bytes, inputs: Sequence[TensorSpec],
                         outputs: Sequence[TensorSpec], *,
                         header_length: int | str | None = None) -> InferRequest:
    """Decode an infer request body against the model's tensors.

    Args:
        body: the raw HTTP body.
        inputs, outputs: the model's tensors (:func:`model_tensors`).
        header_length: the ``Inference-Header-Content-Length`` header, if any.

    Raises :class:`ProtocolError` for malformed JSON, unknown, missing or
    repeated inputs, a wrong datatype or shape, or data that does not fill the shape.

    A header whose inputs are all binary data is remembered once it decoded
    without error (see :class:`_Plan`): a later body with the same header bytes,
    model tensors and length of binary data is not parsed again. Anything else
    (another length above all) takes the full path, so errors do not change.
    """
    key: tuple[Any, ...] | None = None
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not an integer") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        header, rest = body[:n], memoryview(body)[n:]
        key = (bytes(header), tuple(inputs), tuple(outputs))
        plan = _PLANS.get(key)
        if plan is not None and plan.size == len(rest):
            return plan.apply(body, n)
    else:
        header, rest = body, memoryview(b"")
    doc = _loads(header, "the request")
    if not isinstance(doc, dict):
        raise ProtocolError(f"the request is a JSON {type(doc).__name__}, not an object")
    entries = doc.get("inputs")
    if not isinstance(entries, list):
        raise ProtocolError("the request has no 'inputs' list")
    specs = {t.name: t for t in inputs}
    decoded: dict[str, np.ndarray] = {}
    offset = 0
    layout: list[tuple[str, np.dtype[Any], tuple[int, ...], int]] = []
    binary_only = True
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"an input is {entry!r}, not an object with a 'name'")
        name = entry["name"]
        if name not in specs:
            near = close_names(name, specs)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise ProtocolError(f"unknown input {name!r}; the model takes "
                                f"{', '.join(map(repr, specs))}{hint}", tensor=name)
        if name in decoded:
            raise ProtocolError(f"input {name!r} is given twice", tensor=name)
        spec = specs[name]
        datatype = entry.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not supported (the "
                                f"model takes {spec.datatype}; also accepted: "
                                f"{', '.join(DATATYPES)})", tensor=name)
        shape = _shape(entry, spec)
        params = entry.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if "data" in entry:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size",
                                    tensor=name)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} is not a "
                                    "non-negative integer", tensor=name)
            if offset + size > len(rest):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} goes past the end "
                                    f"of the body ({len(rest) - offset} bytes left)", tensor=name)
            arr = _from_bytes(rest[offset:offset + size], name, datatype, shape)  # no copy
            layout.append((name, DATATYPES[datatype], shape, offset))
            offset += size
        else:
            binary_only = False
            if "data" not in entry:
                raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size",
                                    tensor=name)
            arr = _from_json(entry["data"], name, datatype, shape)
        decoded[name] = np.ascontiguousarray(arr, dtype=np.float32)
    if offset != len(rest):
        raise ProtocolError(f"the body has {len(rest) - offset} bytes of binary data that no "
                            "input claims")
    missing = [n for n in specs if n not in decoded]
    if missing:
        raise ProtocolError(f"missing input {missing[0]!r}; the model takes "
                            f"{', '.join(map(repr, specs))}", tensor=missing[0])
    rows = {n: a.shape[0] for n, a in decoded.items()}
    if len(set(rows.values())) > 1:
        name = list(rows)[-1]
        raise ProtocolError(f"input {name!r}: the inputs have different batch sizes {rows}",
                            tensor=name)
    request_params = doc.get("parameters") or {}
    if not isinstance(request_params, dict):
        raise ProtocolError("the request's 'parameters' is not an object")
    default_binary = bool(request_params.get("binary_data_output", False))
    out_names = [t.name for t in outputs]
    requested = doc.get("outputs")
    wanted: list[str] = []
    binary: set[str] = set()
    if requested is None:
        wanted = out_names
        binary = set(out_names) if default_binary else set()
    else:
        if not isinstance(requested, list):
            raise ProtocolError("the request's 'outputs' is not a list")
        for out in requested:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError(f"an output is {out!r}, not an object with a 'name'")
            name = out["name"]
            if name not in out_names:
                raise ProtocolError(f"unknown output {name!r}; the model gives "
                                    f"{', '.join(map(repr, out_names))}", tensor=name)
            params = out.get("parameters") or {}
            if not isinstance(params, dict):
                raise ProtocolError(f"output {name!r}: 'parameters' is not an object",
                                    tensor=name)
            if name not in wanted:
                wanted.append(name)
            if bool(params.get("binary_data", default_binary)):
                binary.add(name)
    request_id = doc.get("id")
    request = InferRequest(inputs=decoded, outputs=wanted, binary=binary,
                           id=None if request_id is None else str(request_id),
                           parameters=request_params)
    if key is not None and binary_only and all(
            isinstance(v, (str, int, float, bool)) or v is None for v in request_params.values()):
        _remember(key, _Plan(tuple(layout), offset, InferRequest(  # no arrays: no body kept
            inputs={}, outputs=list(wanted), binary=set(binary), id=request.id,
            parameters=dict(request_params))))
    return request


@dataclass(frozen=True)
class _Plan:
    """What a request header decoded to when every input was binary data: the next
    body with the same header (and the same model tensors) and as many bytes after
    it needs only views of its bytes, every check having passed already."""

    layout: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]  # name, dtype, shape, offset
    size: int  # bytes of binary data after the header
    request: InferRequest  # outputs, binary, id, parameters; no inputs

    def apply(self, body: bytes, start: int) -> InferRequest:
        inputs = {}
        for name, dtype, shape, offset in self.layout:
            arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape),
                                offset=start + offset).reshape(shape)
            inputs[name] = np.ascontiguousarray(arr, dtype=np.float32)
        r = self.request
        return InferRequest(inputs=inputs, outputs=list(r.outputs), binary=set(r.binary),
                            id=r.id, parameters=dict(r.parameters))


#: Plans by (header bytes, model inputs, model outputs); a header is ~200 bytes, decoding
#: it again took ~5 us of a 1024-event request. Bounded: the oldest goes first.
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_PLANS_MAX = 256


def _remember(key: tuple[Any, ...], plan: _Plan) -> None:
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS)), None)
    _PLANS[key] = plan


# -- responses ------------------------------------------------------------------------------


def _plain(text: str | None) -> bool:
    """None, or a string that json.dumps and orjson write alike (ASCII, no DEL)."""
    return text is None or (text.isascii() and "\x7f" not in text)


def encode_infer_response(model_name: str, model_version: int | str,
                          outputs: Mapping[str, np.ndarray], *, request_id: str | None = None,
                          binary: set[str] | frozenset[str] = frozenset()
                          ) -> tuple[bytes, int | None]:
    """Encode an infer response.

    Args:
        model_name, model_version: echoed back (the version as a string).
        outputs: output name -> array (float32 ``[B, K]`` for ``score``), in order.
        request_id: the request's ``id``, echoed when given.
        binary: output names to send as binary data after the JSON header.

    Returns ``(body, header_length)``; ``header_length`` is None without binary
    outputs, else the value for the ``Inference-Header-Content-Length`` header.
    Non-finite values in JSON data are written as ``NaN``/``Infinity``.
    """
    doc: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request_id is not None:
        doc["id"] = request_id
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        arr = np.asarray(array)
        datatype = _NUMPY_TO_DATATYPE.get(arr.dtype.newbyteorder("="))
        if datatype is None:
            arr, datatype = arr.astype(np.float32), "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if name in binary:
            raw = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        tensors.append(entry)
    doc["outputs"] = tensors
    if len(blobs) == len(tensors) and _plain(model_name) and _plain(request_id):
        # no numbers in the header to write as NaN/Infinity, nothing that json.dumps
        # escapes and orjson does not: the same bytes, in ~1 us instead of ~4
        header = jsonio.dumps(doc)
    else:
        header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join((header, *blobs)), len(header)
