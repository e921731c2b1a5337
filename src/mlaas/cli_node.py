"""``mlaas node join``: add this machine to the Ray pool with its GPU flavors.

Registered on the main typer app by :func:`register`. The command works out
the node's flavors (``--flavor NAME=COUNT``, or ``nvidia-smi -L`` when there
is one, see :mod:`mlaas.platform.nodes`), turns them and the node's name into
Ray custom resources (``flavor:<name>``, ``mlaas-node:<name>``) and runs a Ray
worker node in the foreground (:func:`mlaas.platform.raynode.run_node`) until
SIGTERM or Ctrl-C, like ``ray start --block``: a service manager (systemd, a
Kubernetes pod) keeps it running. ``--dry-run`` prints what it would start.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["register", "default_node_name"]


def default_node_name() -> str:
    """This machine's host name, reduced to the characters a node name may have."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname().split(".")[0]).strip("-._")
    return (name or "node")[:63]


def register(app: typer.Typer) -> None:
    """Add the ``node`` command group (``mlaas node join``) to ``app``."""
    node_app = typer.Typer(help="Nodes of the Ray GPU pool (the ray executor).",
                           no_args_is_help=True)

    @node_app.callback()
    def _node() -> None:
        """Nodes of the Ray GPU pool (the ray executor)."""

    @node_app.command("join")
    def join(
        address: Annotated[str, typer.Argument(
            help="The Ray head's GCS address, host:port (what `mlaas server --ray-address` uses).")],
        flavor: Annotated[Optional[list[str]], typer.Option(
            "--flavor", help="NAME=COUNT devices this node offers (repeat); "
            "default: detected with nvidia-smi, none without it.")] = None,
        cpus: Annotated[Optional[int], typer.Option(
            min=1, help="CPUs to offer (default: all of this machine's).")] = None,
        name: Annotated[Optional[str], typer.Option(
            help="The node's name in the pool (default: the host name).")] = None,
        node_ip: Annotated[str, typer.Option(
            "--node-ip-address", help="The address this node's Ray servers bind and "
            "advertise; in a real pool the machine's cluster-network IP.")] = "127.0.0.1",
        object_store_memory: Annotated[int, typer.Option(
            min=78_643_200, help="Bytes of Ray object store (jobs pass no data through it).")
        ] = 100_000_000,
        temp_dir: Annotated[Optional[Path], typer.Option(
            help="Root of Ray's session and log directory (default: Ray's).")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Print the node's name, flavors and Ray resources as JSON; "
            "start nothing.")] = False,
    ) -> None:
        """Start a Ray worker node that offers this machine's GPU flavors to the pool.

        Runs in the foreground until SIGTERM or Ctrl-C. Platform storage must be
        mounted on this machine at the server's data directory path.
        """
        from mlaas.platform.nodes import (
            check_node_name,
            detect_devices,
            flavor_counts,
            node_resources,
            parse_flavor_args,
        )
        from mlaas.platform.raynode import NodeOptions, run_node

        node_name = check_node_name(name if name is not None else default_node_name())
        if flavor:
            flavors, source = parse_flavor_args(flavor), "configured"
        else:
            flavors, source = flavor_counts(detect_devices()), "nvidia-smi"
        resources = node_resources(node_name, flavors)
        plan = {"name": node_name, "address": address, "node_ip": node_ip, "cpus": cpus,
                "flavors": flavors, "flavors_from": source, "resources": resources}
        if dry_run:
            typer.echo(json.dumps(plan, indent=2))
            return
        options = NodeOptions(node_ip=node_ip, address=address, num_cpus=cpus,
                              resources=resources, object_store_memory=object_store_memory,
                              temp_dir=temp_dir)
        typer.echo(f"joining {address} as node {node_name!r} with "
                   f"{', '.join(f'{f}={c}' for f, c in flavors.items()) or 'no GPUs'} "
                   f"({source})", err=True)
        run_node(options, ready=lambda gcs: typer.echo(
            f"node {node_name!r} is up in the Ray cluster at {gcs}; Ctrl-C or SIGTERM stops it",
            err=True))

    app.add_typer(node_app, name="node")


def main() -> None:
    """``python -m mlaas.cli_node node join ...``: the command without the main CLI.

    The same as ``mlaas node join``; MlaasError becomes a one-line message and exit 1.
    """
    import sys

    from mlaas.errors import MlaasError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """mlaas node commands."""

    register(app)
    try:
        app()
    except MlaasError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
