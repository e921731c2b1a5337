"""``mlaas usage``: GPU-hours, CPU-hours, jobs, preemptions and queue waits from a server.

Layer: client (CLI). Registered on the main typer app by :func:`register`.
It opens one :class:`mlaas.client.Client` (``--server`` or ``MLAAS_SERVER``,
token from ``MLAAS_TOKEN``), calls :meth:`~mlaas.client.Client.usage` and
prints the answer: a table per user and per group with a total line, or the
server's JSON with ``--json``. Whose usage is the server's decision (your
own; a group's for its members; anyone's for admins), see docs/accounting.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from mlaas._progress import console
from mlaas.cli_client import Server
from mlaas.client import DEFAULT_SERVER, Client

__all__ = ["register", "usage"]


def _hours(value: float) -> str:
    return f"{value:.2f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def usage_table(title: str, rows: Mapping[str, Mapping[str, Any]],
                total: Mapping[str, Any] | None) -> Table:
    """One table: a row per name (user or group), GPU-hours per flavor as columns."""
    flavors = sorted({f for r in rows.values() for f in r["gpu_hours"]}
                     | set(total["gpu_hours"] if total else ()))
    table = Table(title=title, title_justify="left")
    table.add_column("name", overflow="fold")
    for col in ("jobs", "attempts", "running"):
        table.add_column(col, justify="right")
    for flavor in flavors:
        table.add_column(f"{flavor} GPU-h", justify="right")
    for col in ("CPU-h", "preempted", "failed", "wait p50", "wait p95"):
        table.add_column(col, justify="right")

    def add(name: str, r: Mapping[str, Any], **style: Any) -> None:
        table.add_row(name, str(r["jobs"]), str(r["attempts"]), str(r["running"]),
                      *(_hours(r["gpu_hours"].get(f, 0.0)) for f in flavors),
                      _hours(r["cpu_hours"]), str(r["preemptions"]),
                      str(r["outcomes"].get("failed", 0)), _seconds(r["wait_s"]["p50"]),
                      _seconds(r["wait_s"]["p95"]), **style)

    for name, r in rows.items():
        add(name, r)
    if total is not None and len(rows) > 1:
        add("total", total, style="bold")
    return table


def usage(
    since: Annotated[Optional[str], typer.Option("--since", help="Start of the window: ISO 8601 (2026-11-01) or a duration ago (7d, 12h, 30m).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="End of the window (same forms); default now.")] = None,
    user: Annotated[Optional[str], typer.Option("--user", help="One user's usage (admins; yourself otherwise).")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="One group's usage (its members and admins).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of tables.")] = False,
    server: Server = DEFAULT_SERVER,
) -> None:
    """Your GPU-hours by flavor, CPU-hours, jobs, preemptions and queue waits (admins: everyone's)."""
    with Client(server) as client:
        answer = client.usage(since=since, until=until, user=user, group=group)
    if as_json:
        console.print_json(json.dumps(answer))
        return
    window = f"{answer['since'] or 'the beginning'} to {answer['until']}".replace("T", " ")
    console.print(f"usage from {window}", markup=False, highlight=False)
    if not answer["users"]:
        console.print("no jobs ran in this window", markup=False, highlight=False)
        return
    console.print(usage_table("per user", answer["users"], answer["total"]))
    console.print(usage_table("per group", answer["groups"], answer["total"]))


def register(app: typer.Typer) -> None:
    """Add the ``usage`` command to ``app``."""
    app.command("usage")(usage)
