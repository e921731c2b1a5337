"""mlaas.serve.protocol: KServe v2 codecs, JSON and binary, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlaas.serve.protocol import (
    ProtocolError,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    model_metadata,
)

INPUTS = [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("mask", "FP32", (-1, 2))]
OUTPUTS = [TensorSpec("score", "FP32", (-1, 1))]
X = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
MASK = np.array([[1, 0], [1, 1]], dtype=np.float32)


def _json_body(**over: object) -> dict:
    doc = {"id": "r1", "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": X.ravel().tolist()},
        {"name": "mask", "shape": [2, 2], "datatype": "FP32", "data": MASK.tolist()}]}
    doc.update(over)
    return doc


def _decode(doc: dict) -> object:
    return decode_infer_request(json.dumps(doc).encode(), INPUTS, OUTPUTS)


def test_json_round_trip() -> None:
    req = _decode(_json_body())
    assert req.id == "r1" and req.outputs == ["score"] and req.binary == set()
    np.testing.assert_array_equal(req.inputs["x"], X)
    np.testing.assert_array_equal(req.inputs["mask"], MASK)
    assert req.inputs["x"].dtype == np.float32
    scores = np.array([[0.25], [0.5]], dtype=np.float32)
    body, header = encode_infer_response("m", 3, {"score": scores}, request_id=req.id)
    assert header is None
    assert json.loads(body) == {"model_name": "m", "model_version": "3", "id": "r1", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [2, 1], "data": [0.25, 0.5]}]}


@pytest.mark.parametrize("datatype,values", [
    ("FP64", [[0.5, 1.5, 2.0], [3.0, 4.0, 5.0]]),
    ("INT32", [[0, 1, 2], [3, 4, 5]]),
    ("INT64", [[0, 1, 2], [3, 4, 5]]),
    ("BOOL", [[True, False, True], [False, False, True]]),
])
def test_json_datatypes_become_float32(datatype: str, values: list) -> None:
    doc = _json_body()
    doc["inputs"][0].update(datatype=datatype, data=values)
    req = _decode(doc)
    np.testing.assert_array_equal(req.inputs["x"], np.asarray(values, dtype=np.float32))
    assert req.inputs["x"].dtype == np.float32


@pytest.mark.parametrize("datatype,dtype", [("FP32", "<f4"), ("FP64", "<f8"), ("INT32", "<i4"),
                                            ("INT64", "<i8"), ("BOOL", "?")])
def test_binary_inputs(datatype: str, dtype: str) -> None:
    x = (X * 7).astype(dtype)
    raw_x, raw_m = x.tobytes(), MASK.astype("<f4").tobytes()
    header = json.dumps({"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": datatype,
         "parameters": {"binary_data_size": len(raw_x)}},
        {"name": "mask", "shape": [2, 2], "datatype": "FP32",
         "parameters": {"binary_data_size": len(raw_m)}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}).encode()
    req = decode_infer_request(header + raw_x + raw_m, INPUTS, OUTPUTS,
                               header_length=str(len(header)))
    np.testing.assert_array_equal(req.inputs["x"], x.astype(np.float32))
    np.testing.assert_array_equal(req.inputs["mask"], MASK)
    assert req.binary == {"score"}


def test_mixed_binary_and_json_inputs() -> None:
    raw_m = MASK.tobytes()
    doc = _json_body()
    doc["inputs"][1] = {"name": "mask", "shape": [2, 2], "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw_m)}}
    header = json.dumps(doc).encode()
    req = decode_infer_request(header + raw_m, INPUTS, OUTPUTS, header_length=len(header))
    np.testing.assert_array_equal(req.inputs["mask"], MASK)
    np.testing.assert_array_equal(req.inputs["x"], X)


def test_binary_output_round_trip() -> None:
    scores = np.array([[0.125], [np.nan]], dtype=np.float32)
    body, n = encode_infer_response("m", 1, {"score": scores}, binary={"score"})
    assert n is not None
    doc = json.loads(body[:n])
    (out,) = doc["outputs"]
    assert out["parameters"] == {"binary_data_size": 8} and "data" not in out
    got = np.frombuffer(body[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_array_equal(got, scores)


@pytest.mark.parametrize("doc,binary", [
    ({"parameters": {"binary_data_output": True}}, {"score"}),
    ({"parameters": {"binary_data_output": True},
      "outputs": [{"name": "score", "parameters": {"binary_data": False}}]}, set()),
    ({"outputs": [{"name": "score"}]}, set()),
])
def test_binary_output_requests(doc: dict, binary: set) -> None:
    assert _decode(_json_body(**doc)).binary == binary


def test_metadata() -> None:
    meta = model_metadata("m", [1, 2], INPUTS, OUTPUTS)
    assert meta == {"name": "m", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "mask", "datatype": "FP32", "shape": [-1, 2]}],
                    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}]}


def _with_x(**fields: object) -> dict:
    doc = _json_body()
    doc["inputs"][0].update(fields)
    return doc


@pytest.mark.parametrize("doc,tensor,words", [
    (_json_body(inputs=[{"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]),
     "y", "unknown input"),
    (_json_body(inputs=_json_body()["inputs"][:1]), "mask", "missing input"),
    (_with_x(shape=[3, 2]), "x", "does not match the model's [-1, 3]"),
    (_with_x(shape=[6]), "x", "does not match"),
    (_with_x(datatype="BYTES"), "x", "datatype 'BYTES'"),
    (_with_x(datatype="INT64"), "x", "not INT64"),
    (_with_x(data=["a", "b", "c", "d", "e", "f"]), "x", "not FP32"),
    (_with_x(data=[1.0, 2.0]), "x", "needs 6"),
    (_with_x(data=[[1.0], [2.0, 3.0]]), "x", "not a regular array"),
    (_with_x(data=None), "x", "not a list"),
    (_json_body(outputs=[{"name": "prob"}]), "prob", "unknown output"),
])
def test_errors_name_the_tensor(doc: dict, tensor: str, words: str) -> None:
    with pytest.raises(ProtocolError, match=f"'{tensor}'") as info:
        _decode(doc)
    assert words in str(info.value)
    assert info.value.tensor == tensor
    assert isinstance(info.value, ValueError)


def test_binary_size_errors_name_the_tensor() -> None:
    header = json.dumps({"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 20}},
        {"name": "mask", "shape": [2, 2], "datatype": "FP32", "data": MASK.ravel().tolist()}]})
    body = header.encode() + bytes(24)
    with pytest.raises(ProtocolError, match="input 'x': binary_data_size is 20 bytes"):
        decode_infer_request(body, INPUTS, OUTPUTS, header_length=len(header))
    with pytest.raises(ProtocolError, match="input 'x': binary_data_size 20 goes past"):
        decode_infer_request(header.encode() + bytes(4), INPUTS, OUTPUTS,
                             header_length=len(header))


@pytest.mark.parametrize("body,header,words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "not an object"),
    (b"{}", None, "no 'inputs' list"),
    (b"{}", "abc", "not an integer"),
    (b"{}", "99", "the body has 2 bytes"),
])
def test_malformed_requests(body: bytes, header: str | None, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_infer_request(body, INPUTS, OUTPUTS, header_length=header)


def test_trailing_binary_bytes_are_an_error() -> None:
    body = json.dumps(_json_body()).encode()
    with pytest.raises(ProtocolError, match="3 bytes of binary data that no input claims"):
        decode_infer_request(body + b"abc", INPUTS, OUTPUTS, header_length=len(body))


# -- remembered headers (binary inputs only) and the orjson response header -----------------


def _binary_body(x: np.ndarray, mask: np.ndarray, extra: bytes = b"",
                 **over: object) -> tuple[bytes, int]:
    doc = {"inputs": [
        {"name": "x", "shape": list(x.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": x.nbytes}},
        {"name": "mask", "shape": list(mask.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": mask.nbytes}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}
    doc.update(over)
    header = json.dumps(doc).encode()
    return header + x.tobytes() + mask.tobytes() + extra, len(header)


def test_a_remembered_header_decodes_like_a_new_one() -> None:
    from mlaas.serve import protocol

    protocol._PLANS.clear()
    first_body, n = _binary_body(X, MASK, parameters={"binary_data_output": True}, id="a")
    first = decode_infer_request(first_body, INPUTS, OUTPUTS, header_length=n)
    assert len(protocol._PLANS) == 1
    plan = next(iter(protocol._PLANS.values()))
    assert plan.request.inputs == {}  # keeps no body alive
    first.parameters["changed"] = True
    first.outputs.append("other")
    second_body, _ = _binary_body(X + 1, MASK * 0, parameters={"binary_data_output": True},
                                  id="a")
    second = decode_infer_request(second_body, INPUTS, OUTPUTS, header_length=n)
    assert len(protocol._PLANS) == 1  # the same header: remembered, not added
    np.testing.assert_array_equal(second.inputs["x"], X + 1)
    np.testing.assert_array_equal(second.inputs["mask"], MASK * 0)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in second.inputs.values())
    assert (second.outputs, second.binary, second.id) == (["score"], {"score"}, "a")
    assert second.parameters == {"binary_data_output": True}  # not the first caller's edits


def test_a_remembered_header_with_the_wrong_length_errs_as_before() -> None:
    from mlaas.serve import protocol

    body, n = _binary_body(X, MASK)
    for remembered in (False, True):
        protocol._PLANS.clear()
        if remembered:
            decode_infer_request(body, INPUTS, OUTPUTS, header_length=n)
            assert protocol._PLANS
        with pytest.raises(ProtocolError, match="3 bytes of binary data that no input claims"):
            decode_infer_request(body + b"abc", INPUTS, OUTPUTS, header_length=n)
        with pytest.raises(ProtocolError, match="input 'mask': binary_data_size 16 goes past"):
            decode_infer_request(body[:-1], INPUTS, OUTPUTS, header_length=n)


def test_other_model_tensors_do_not_share_a_remembered_header() -> None:
    from mlaas.serve import protocol

    protocol._PLANS.clear()
    body, n = _binary_body(X, MASK)
    decode_infer_request(body, INPUTS, OUTPUTS, header_length=n)
    other = [TensorSpec("x", "FP32", (-1, 4)), INPUTS[1]]
    with pytest.raises(ProtocolError, match="input 'x': shape \\[2, 3\\] does not match"):
        decode_infer_request(body, other, OUTPUTS, header_length=n)


def test_json_data_inputs_are_not_remembered() -> None:
    from mlaas.serve import protocol

    protocol._PLANS.clear()
    body = json.dumps(_json_body()).encode()
    decode_infer_request(body, INPUTS, OUTPUTS, header_length=len(body))
    assert not protocol._PLANS


@pytest.mark.parametrize("request_id", [None, "plain", 'q"uo\\te', "\x7fdel", "caf\u00e9",
                                        "".join(map(chr, range(32)))])
def test_binary_response_header_is_what_json_dumps_writes(request_id: str | None) -> None:
    scores = np.arange(4, dtype=np.float32).reshape(4, 1)
    body, n = encode_infer_response("m", 3, {"score": scores}, request_id=request_id,
                                    binary={"score"})
    doc = {"model_name": "m", "model_version": "3", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [4, 1],
         "parameters": {"binary_data_size": 16}}]}
    if request_id is not None:
        doc = {"model_name": "m", "model_version": "3", "id": request_id,
               "outputs": doc["outputs"]}
    assert body[:n] == json.dumps(doc, separators=(",", ":")).encode()
    assert body[n:] == scores.tobytes()
