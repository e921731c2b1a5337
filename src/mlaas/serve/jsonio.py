"""JSON in and out of the serving hot path: orjson when installed, the standard library else.

Layer: serving, encoding only. A single-event predict request spends most of
its server time in Python per request, not in the model; ``json.loads`` of a
1.5 kB event was ~18 us of it, orjson's ~2 us (measured on this 2-core
machine). Decoding falls back to :func:`json.loads` for anything orjson
refuses (the ``NaN``/``Infinity`` literals Python clients write, integers
beyond 64 bits), and orjson is not asked at all about a body with an integer
of 19 or more digits (it reads integers beyond 64 bits as floats, where Python
keeps them exact), so what is accepted, its values and the error messages do
not change.
"""

from __future__ import annotations

import json
from typing import Any

try:  # optional: a speed-up, not a requirement
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None  # type: ignore[assignment]

__all__ = ["loads", "dumps"]

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_RUN = b"0" * 19
_ZERO, _DOT = ord("0"), ord(".")


def _long_integer(raw: bytes) -> bool:
    """True if ``raw`` may hold an integer of 19+ digits: a run of 19 digits not after a
    '.' (a fraction's digits). A false alarm (an exponent's digits) only costs the
    slower parser. ``bytes.find`` on digits mapped to '0': ~1 us for a 1.5 kB event,
    where regular expressions took 2 to 20 us."""
    text = raw.translate(_DIGITS_AS_ZERO)
    start = text.find(_RUN)
    while start != -1:
        if start == 0 or text[start - 1] != _DOT:
            return True
        end = start + len(_RUN)
        while end < len(text) and text[end] == _ZERO:
            end += 1
        start = text.find(_RUN, end)
    return False


def loads(body: bytes | str) -> Any:
    """Parse JSON like :func:`json.loads` (raising ``ValueError``/``UnicodeDecodeError``)."""
    if orjson is not None and not _long_integer(body.encode() if isinstance(body, str)
                                                else bytes(body)):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # let the standard library accept NaN literals or word the error
    return json.loads(body)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of plain JSON types (no NaN: callers send ``null``)."""
    if orjson is not None:
        return orjson.dumps(value)
    return json.dumps(value, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()
