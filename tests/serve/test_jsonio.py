"""The serving JSON codec accepts and refuses exactly what ``json`` does (orjson or not)."""

from __future__ import annotations

import json
import math

import pytest

from mlaas.serve import jsonio


@pytest.mark.parametrize("text", [
    b'[{"MET_pt": 20.5, "Jet_pt": [1, 2.5e3]}]', b'{"a": NaN}', b"[Infinity, -Infinity]",
    b"[123456789012345678901234567890]", b"[9223372036854775808]",  # ints beyond 64 bits
    b"[-12345678901234567890, 0.1234567890123456789012]",
    b"[0.1234567890123456789012, 12345678901234567890]", '{"\u00e9": "x"}'.encode()])
def test_loads_accepts_what_json_accepts(text: bytes) -> None:
    got, want = jsonio.loads(text), json.loads(text)
    assert json.dumps(got) == json.dumps(want)  # NaN compares unequal; their text does not


@pytest.mark.parametrize("text", [b"{not json", b"", b"[1,]", b"\xff\xfe"])
def test_loads_refuses_what_json_refuses(text: bytes) -> None:
    with pytest.raises(ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        jsonio.loads(text)
    with pytest.raises(ValueError):
        json.loads(text)


def test_dumps_is_compact_json() -> None:
    value = {"model": "m", "version": 2, "outputs": [0.25, None, [1.0, 2.0]]}
    assert json.loads(jsonio.dumps(value)) == value
    assert b" " not in jsonio.dumps(value)
    assert math.isclose(json.loads(jsonio.dumps([0.1]))[0], 0.1)
