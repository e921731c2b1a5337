"""``mlaas queues`` and ``mlaas nodes``: the farm's queues and nodes from a server.

Layer: CLI (a thin shell over :class:`mlaas.client.Client`). Registered on
the main typer app by :func:`register`:

- ``mlaas queues [--json]``: every queue with its group, cohort, quotas,
  usage and pending/running jobs (``GET /api/queues``);
- ``mlaas queues set FILE``: replace the queues (admins; ``PUT /api/queues``)
  from a YAML or JSON file holding a list of queues, or ``{queues: [...]}``;
- ``mlaas nodes [--json]``: the pool's nodes with each flavor's free and
  total devices (``GET /api/nodes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mlaas.cli_client import Server, _client
from mlaas.client import DEFAULT_SERVER
from mlaas.errors import ConfigError
from mlaas.platform.config import read_document

__all__ = ["register", "read_queue_file"]

console = Console()
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _quota(q: dict[str, Any]) -> str:
    nominal = "unlimited" if q.get("nominal") is None else str(q["nominal"])
    limit = q.get("borrowing_limit")
    return nominal if limit is None else f"{nominal} (+{limit})"


def _queues_table(body: dict[str, Any]) -> Table:
    queues = body.get("queues") or []
    table = Table(title=f"{len(queues)} queue{'s' if len(queues) != 1 else ''} "
                        f"(policy {body.get('policy')})", title_justify="left")
    for col in ("queue", "group", "cohort", "quotas (nominal +borrow)", "in use", "pending",
                "running"):
        table.add_column(col, overflow="fold")
    for q in queues:
        quotas = ", ".join(f"{f}={_quota(v)}" for f, v in sorted((q.get("quotas") or {}).items()))
        usage = ", ".join(f"{f}={n}" for f, n in sorted((q.get("usage") or {}).items()))
        name = f"{q.get('name')}{' *' if q.get('mine') else ''}"
        table.add_row(name, str(q.get("group")), str(q.get("cohort") or "-"), quotas,
                      usage or "-", str(q.get("pending")), str(q.get("running")))
    table.caption = "* a queue you may submit to"
    return table


def read_queue_file(path: Path) -> list[dict[str, Any]]:
    """The queue list of a YAML/JSON file: a list, or a mapping with ``queues``."""
    data = read_document(path, "queue")
    if isinstance(data, dict) and set(data) == {"queues"}:
        data = data["queues"]
    if not isinstance(data, list) or not all(isinstance(q, dict) for q in data):
        raise ConfigError(f"queue file {str(path)!r} must hold a list of queues (or "
                          "{queues: [...]})", file_path=str(path))
    return data


def register(app: typer.Typer) -> None:
    """Add ``queues`` (with ``set``) and ``nodes`` to ``app``."""
    queues_app = typer.Typer(help="The farm's queues: quotas, usage, pending and running jobs.",
                             invoke_without_command=True, no_args_is_help=False)

    @queues_app.callback()
    def queues(ctx: typer.Context, as_json: AsJson = False,
               server: Server = DEFAULT_SERVER) -> None:
        """List the queues: group, cohort, quotas, what is in use, pending and running jobs."""
        if ctx.invoked_subcommand is not None:
            return
        with _client(server) as client:
            body = client.queues()
        if as_json:
            console.print_json(json.dumps(body))
        else:
            console.print(_queues_table(body))

    @queues_app.command("set")
    def set_queues(file: Annotated[Path, typer.Argument(help="YAML or JSON: a list of queues.",
                                                        exists=True, dir_okay=False)],
                   server: Server = DEFAULT_SERVER) -> None:
        """Replace the queue configuration (admins); the server keeps it across restarts."""
        with _client(server) as client:
            body = client.set_queues(read_queue_file(file))
        console.print(_queues_table(body))

    app.add_typer(queues_app, name="queues")

    @app.command()
    def nodes(as_json: AsJson = False, server: Server = DEFAULT_SERVER) -> None:
        """List the pool's nodes: free and total devices per flavor, CPUs, running jobs."""
        with _client(server) as client:
            body = client.nodes()
        if as_json:
            console.print_json(json.dumps(body))
            return
        found = body.get("nodes") or []
        table = Table(title=f"{len(found)} node{'s' if len(found) != 1 else ''} "
                            f"({body.get('executor')} executor)", title_justify="left")
        for col in ("node", "flavors (free/total)", "cpus free", "memory GiB", "running"):
            table.add_column(col, overflow="fold")
        for n in found:
            flavors = ", ".join(f"{f} {v.get('free')}/{v.get('capacity')}"
                                for f, v in sorted((n.get("flavors") or {}).items()))
            table.add_row(str(n.get("name")), flavors, f"{n.get('free_cpus'):g}/{n.get('cpus'):g}",
                          f"{n.get('memory_gib'):.1f}", str(n.get("running")))
        console.print(table)
