"""The client half of the CLI: commands that talk to an ``mlaas server``.

Registered on the main typer app by :func:`register`, so ``mlaas --help``
lists them beside the local commands. Each command opens one
:class:`mlaas.client.Client` (``--server`` or ``MLAAS_SERVER``, token from
``MLAAS_TOKEN``), calls one method and prints the answer. Errors the server
sends arrive as :mod:`mlaas.errors` exceptions, which ``mlaas.cli.main``
prints as ``ErrorClass: message`` with exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mlaas._progress import console, err_console
from mlaas.client import DEFAULT_SERVER, Client

__all__ = ["register", "Server", "print_job_result", "wait_with_status"]

Server = Annotated[str, typer.Option(
    "--server", envvar="MLAAS_SERVER", show_envvar=True,
    help="URL of the mlaas server (token, if any, from MLAAS_TOKEN).")]
JobId = Annotated[str, typer.Argument(help="Job id, as printed by `mlaas submit` or `mlaas jobs`.")]


def _client(server: str) -> Client:
    return Client(server or DEFAULT_SERVER)


def _when(value: Any) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM`` (UTC as the server sent it)."""
    return str(value or "").replace("T", " ")[:16]


def _progress(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    parts = []
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}/{p.get('epochs') or '?'}")
    elif p.get("phase"):
        parts.append(str(p["phase"]))
    if p.get("events_per_s"):
        parts.append(f"{p['events_per_s']:,.0f} ev/s")
    return ", ".join(parts)


def _model(job: dict[str, Any]) -> str:
    name, version = job.get("model_name") or "", job.get("model_version")
    return f"{name} v{version}" if version is not None else name


def print_job_result(job: dict[str, Any]) -> None:
    """One line for a finished job on stdout; failures and cancellations to stderr."""
    state = job.get("state")
    if state == "succeeded":
        console.print(f"job {job['id']} succeeded: model {_model(job)}", markup=False,
                      highlight=False)
        return
    reason = job.get("reason") or ""
    code = job.get("exit_code")
    err_console.print(f"job {job['id']} {state}" + (f" (exit code {code})" if code is not None
                                                      else "") + (f": {reason}" if reason else ""),
                      markup=False, highlight=False)


def wait_with_status(client: Client, job_id: str, poll: float = 1.0,
                     reconnect: float = 60.0) -> dict[str, Any]:
    """Wait for the job, showing its state and progress on one stderr status line.

    A server that stops answering (a restart) is polled again for up to
    ``reconnect`` seconds before :class:`~mlaas.client.ServerUnreachable`.
    """
    import time

    from mlaas.client import FINAL_STATES, ServerUnreachable

    down_since: float | None = None
    with err_console.status(f"job {job_id}: submitted") as shown:
        while True:
            try:
                job = client.job(job_id)
            except ServerUnreachable:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect:
                    raise
                shown.update(f"job {job_id}: the server does not answer; retrying")
                time.sleep(poll)
                continue
            down_since = None
            if job.get("state") in FINAL_STATES:
                return job
            where = f" (queue position {job['position']})" if job.get("position") is not None else ""
            detail = _progress(job)
            shown.update(f"job {job_id}: {job.get('state')}{where}" + (f", {detail}" if detail else ""))
            time.sleep(poll)


def _stream_logs(client: Client, job_id: str) -> None:
    for text in client.logs(job_id, follow=True):
        sys.stdout.write(text)
        sys.stdout.flush()


def submit(
    spec: Annotated[Path, typer.Argument(metavar="PIPELINE", help="Pipeline spec, YAML or JSON.",
                                         exists=True, dir_okay=False)],
    name: Annotated[Optional[str], typer.Option(help="Job name (default: the spec's name, "
                                                "else the file name).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job is final; exit 1 "
                                       "unless it succeeded.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the job's log until it "
                                         "ends (implies --wait).")] = False,
    visibility: Annotated[Optional[str], typer.Option(
        help="Who may read the job and the model it registers (if new): private (default), "
             "group:NAME (a group you are in) or public.")] = None,
    server: Server = DEFAULT_SERVER,
) -> None:
    """Submit a pipeline to the server as a job and print its id.

    Local files the spec names (data.sources[].files, globs expanded here,
    and model.file) are uploaded to your workspace under submit/<sha256>/ and
    the spec is sent pointing there; root:// and https:// URLs pass unchanged.
    """
    with _client(server) as client:
        job = client.submit(spec, name=name, visibility=visibility)
        console.print(job["id"], markup=False, highlight=False)
        if not (wait or follow):
            return
        if follow:
            _stream_logs(client, job["id"])
            final = client.wait(job["id"])
        else:
            final = wait_with_status(client, job["id"])
    print_job_result(final)
    if final.get("state") != "succeeded":
        raise typer.Exit(1)


def jobs(
    state: Annotated[Optional[str], typer.Option(help="Only jobs in this state: queued, running, "
                                                 "preempted, succeeded, failed, cancelled.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Only jobs with this name.")] = None,
    mine: Annotated[bool, typer.Option("--mine", help="Only my own jobs.")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most this many, newest first.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    server: Server = DEFAULT_SERVER,
) -> None:
    """List jobs on the server, newest first: state, model, progress, queue position or reason."""
    with _client(server) as client:
        found = client.jobs(state=state, name=name, mine=mine, limit=limit)
    if as_json:
        console.print_json(json.dumps(found))
        return
    table = Table(title=f"{len(found)} job{'s' if len(found) != 1 else ''}", title_justify="left")
    for col in ("id", "name", "owner", "state", "model", "created", "progress", "note"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "state", "created"))
    for j in found:
        note = f"queue #{j['position']}" if j.get("position") is not None else (j.get("reason") or "")
        table.add_row(str(j.get("id")), escape(str(j.get("name") or "")),  # users' words:
                      escape(str(j.get("owner") or "")),  # not rich markup
                      str(j.get("state") or ""), escape(_model(j)), _when(j.get("created_at")),
                      _progress(j), escape(str(note)))
    console.print(table)


def status(job_id: JobId, server: Server = DEFAULT_SERVER) -> None:
    """Show one job as JSON: state, timestamps, queue position, progress, model version."""
    with _client(server) as client:
        console.print_json(json.dumps(client.job(job_id)))


def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job "
                                         "ends.")] = False,
    server: Server = DEFAULT_SERVER,
) -> None:
    """Print a job's log (its stdout and stderr); -f streams it until the job ends."""
    with _client(server) as client:
        for text in client.logs(job_id, follow=follow):
            sys.stdout.write(text)
            sys.stdout.flush()


def cancel(job_id: JobId, server: Server = DEFAULT_SERVER) -> None:
    """Cancel a queued or running job (SIGTERM, then SIGKILL after a grace period)."""
    with _client(server) as client:
        job = client.cancel(job_id)
    console.print(f"job {job['id']}: {job.get('state')}", markup=False, highlight=False)


def download(
    job_id: JobId,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Directory (created); "
                                                   "default ./JOB_ID.")] = None,
    server: Server = DEFAULT_SERVER,
) -> None:
    """Download every artifact of a job: bundle.tar.gz, bundle/, plots, metrics.json, history.json."""
    dest = output or Path(job_id)
    with _client(server) as client:
        written = client.download(job_id, dest)
    for path in written:
        console.print(str(path), markup=False, highlight=False)


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    server: Server = DEFAULT_SERVER,
) -> None:
    """List the models registered on the server: versions, latest, aliases."""
    with _client(server) as client:
        found = client.models()
    if as_json:
        console.print_json(json.dumps(found))
        return
    table = Table(title=f"{len(found)} model{'s' if len(found) != 1 else ''}", title_justify="left")
    for col in ("name", "versions", "latest", "aliases"):
        table.add_column(col, overflow="fold")
    for m in found:
        versions = m.get("versions")
        count = len(versions) if isinstance(versions, list) else versions
        aliases = m.get("aliases") or {}
        table.add_row(escape(str(m.get("name"))), str(count), str(m.get("latest")),
                      escape(", ".join(f"{k}={v}" for k, v in sorted(aliases.items()))))
    console.print(table)


def share(
    model: Annotated[str, typer.Argument(help="Registered model name (yours, or any as admin).")],
    visibility: Annotated[str, typer.Argument(
        help="private, group:NAME (a group you are in, e.g. group:/cms) or public.")],
    server: Server = DEFAULT_SERVER,
) -> None:
    """Set who may read (and run inference on) a model: private, group:NAME or public."""
    with _client(server) as client:
        got = client.set_model_visibility(model, visibility)
    console.print(f"model {got['name']}: {got['visibility']} (owner {got['owner']})",
                  markup=False, highlight=False)


def predict_remote(model: str, input: Path, server: str, version: int | None,
                   alias: str | None) -> list[Any]:
    """``mlaas predict`` for a model name: read the events file and ask the server."""
    from mlaas.errors import DataError

    try:
        events = json.loads(sys.stdin.read() if str(input) == "-" else input.read_text())
    except OSError as exc:
        raise DataError(f"cannot read events file: {exc}", file_path=str(input)) from exc
    except ValueError as exc:
        raise DataError(f"events file is not valid JSON: {exc}", file_path=str(input)) from exc
    with _client(server) as client:
        return client.predict(model, events, version=version, alias=alias)


def register(app: typer.Typer) -> None:
    """Add the client commands to ``app``."""
    for command in (submit, jobs, status, logs, cancel, download, models, share):
        app.command()(command)
