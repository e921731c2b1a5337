"""The test tree itself: rules pytest does not check until collection breaks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).parent


def test_test_file_basenames_are_unique() -> None:
    # tests/ has no __init__.py files (rootdir import mode), so two test modules
    # with one basename in different folders stop the whole collection.
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, k in names.items() if k > 1] == []
