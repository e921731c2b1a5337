"""``mlaas token create|list|revoke``: personal API tokens on an ``mlaas server``.

Layer: client (CLI). Registered on the main typer app by :func:`register`
as the ``token`` command group. Each command opens one
:class:`mlaas.client.Client` (``--server`` or ``MLAAS_SERVER``; the login
token from ``MLAAS_TOKEN``), calls one method and prints the answer. Only
``create`` ever prints a secret, once, on stdout, so it can be captured
(``MLAAS_TOKEN=$(mlaas token create ... --quiet)``); everything else goes to
stderr. A token cannot create tokens: ``create`` needs an OIDC login token in
``MLAAS_TOKEN`` (or a server in single-user mode, which has no tokens: 409).
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlaas._progress import console, err_console
from mlaas.cli_client import Server
from mlaas.client import DEFAULT_SERVER, Client

__all__ = ["register", "token_app"]

token_app = typer.Typer(name="token", help="Personal API tokens for scripts and CI: create, "
                        "list, revoke.", no_args_is_help=True)


def _when(value: object) -> str:
    return str(value or "").replace("T", " ")[:16]


@token_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="A label for the token, e.g. ci.")],
    scope: Annotated[list[str], typer.Option("--scope", help="read, submit or predict (repeatable).")],
    expires_days: Annotated[Optional[float], typer.Option("--expires-days", min=0.0, help="Lifetime in days (default: the server's, 30; at most 365).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the secret.")] = False,
    server: Server = DEFAULT_SERVER,
) -> None:
    """Create a token; its secret is printed this once and cannot be shown again."""
    with Client(server) as client:
        new = client.create_token(name, scope, expires_in_days=expires_days)
    secret = new.pop("token")
    if not quiet:
        err_console.print(f"token {new['id']} ({new['name']}): scopes "
                          f"{', '.join(new['scopes'])}, expires {_when(new['expires_at'])}. "
                          "The secret below is shown only now: store it (e.g. as MLAAS_TOKEN).",
                          markup=False, highlight=False)
    console.print(secret, markup=False, highlight=False, soft_wrap=True)


@token_app.command("list")
def list_tokens(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    server: Server = DEFAULT_SERVER,
) -> None:
    """List your tokens (never their secrets), newest first."""
    with Client(server) as client:
        tokens = client.list_tokens()
    if as_json:
        console.print_json(json.dumps(tokens))
        return
    table = Table(title=f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}",
                  title_justify="left")
    for col in ("id", "name", "scopes", "created", "expires", "last used"):
        table.add_column(col, overflow="fold")
    for t in tokens:
        table.add_row(str(t["id"]), str(t["name"]), ", ".join(t["scopes"]),
                      _when(t["created_at"]), _when(t["expires_at"]), _when(t["last_used_at"]))
    console.print(table)


@token_app.command()
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id, as `mlaas token list` shows it.")],
    server: Server = DEFAULT_SERVER,
) -> None:
    """Revoke one of your tokens; it stops working at once."""
    with Client(server) as client:
        client.revoke_token(token_id)
    err_console.print(f"revoked token {token_id}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``token`` command group to ``app``."""
    app.add_typer(token_app, name="token")
