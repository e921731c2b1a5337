"""The progress bar of long data work fits one line of an 80-column terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mlaas import _progress


def test_a_bar_of_millions_of_events_fits_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    clock = iter([0.0] + [3.0] * 1000)  # the bar's clock: the work takes 3 s
    console = Console(file=out, width=80, force_terminal=False, get_time=lambda: next(clock))
    monkeypatch.setattr(_progress, "err_console", console)
    with _progress.event_progress("datagen", 20_000_000) as advance:
        advance(12_345_678, 1_234_000_000)  # 4.1M events/s, 411 MB/s: the widest numbers
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, out.getvalue()  # "MB/s" wrapped onto a second line before
    assert "12,345,678 events" in lines[0] and " ev/s " in lines[0] and "MB/s" in lines[0]
    assert len(lines[0]) <= 80
