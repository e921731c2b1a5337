"""``mlaas simulate``: the farm simulator from the command line.

Registered on the main typer app by :func:`register`. Runs the scheduling
policies on one scenario and prints a comparison table (or JSON), and with
``--plots`` writes utilisation and queue-length plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlaas._progress import console

__all__ = ["register"]

_POLICIES = ("fifo", "quota", "fair")


def register(app: typer.Typer) -> None:
    """Add ``simulate`` to ``app``."""

    @app.command()
    def simulate(
        scenario: Annotated[Optional[Path], typer.Option(
            "--scenario", help="Scenario YAML (default: the built-in 100-GPU farm).",
            exists=True, dir_okay=False)] = None,
        policy: Annotated[str, typer.Option(
            help="fifo, quota, fair, or all (compare the three).")] = "all",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
        seed: Annotated[Optional[int], typer.Option(help="Override the scenario's seed.")] = None,
        jobs: Annotated[Optional[int], typer.Option(
            min=1, help="Override the number of jobs (the arrival span scales with it).")] = None,
        plots: Annotated[Optional[Path], typer.Option(
            "--plots", help="Write utilisation.png and queues.png into this directory.",
            file_okay=False)] = None,
        show_scenario: Annotated[bool, typer.Option(
            "--show-scenario", help="Print the scenario as YAML and exit.")] = False,
    ) -> None:
        """Simulate the GPU farm under fifo, quota-only and fair scheduling; compare them.

        Metrics: utilisation against a work-conserving ideal, Jain fairness over
        groups, waits, quota violations, preemptions and lost GPU-hours (see
        docs/scheduler.md).
        """
        from mlaas.errors import SpecError
        from mlaas.platform.simulate import load_scenario, scenario_yaml
        from mlaas.platform.simulate import simulate as run
        from mlaas.platform.simulate import write_plots

        sc = load_scenario(scenario)
        if jobs is not None:
            scale = jobs / sc.jobs.count
            sc = sc.model_copy(update={"jobs": sc.jobs.model_copy(
                update={"count": jobs, "span_s": sc.jobs.span_s * scale})})
        if show_scenario:
            typer.echo(scenario_yaml(sc), nl=False)
            return
        if policy != "all" and policy not in _POLICIES:
            raise SpecError(f"unknown policy {policy!r}; choose one of "
                            f"{', '.join(_POLICIES)} or all", field_path="--policy")
        names = list(_POLICIES) if policy == "all" else [policy]
        results = [run(sc, name, seed=seed) for name in names]
        if plots is not None:
            for path in write_plots(results, plots):
                console.print(f"wrote {path}", highlight=False)
        if as_json:
            out = results[0].summary() if len(results) == 1 else {
                r.policy: r.summary() for r in results}
            typer.echo(json.dumps(out, indent=2))
            return
        console.print(_table(results))
        console.print(_group_table(results))

    _ = simulate


def _table(results: list) -> Table:
    t = Table(title="Farm simulator", title_justify="left")
    rows = [
        ("utilisation (of ideal)", lambda r: f"{r.utilisation:.3f}"),
        ("goodput (of ideal)", lambda r: f"{r.goodput:.3f}"),
        ("Jain fairness (groups)", lambda r: f"{r.jain_fairness:.3f}"),
        ("wait p50 (s)", lambda r: f"{r.wait_p50_s:,.0f}"),
        ("wait p95 (s)", lambda r: f"{r.wait_p95_s:,.0f}"),
        ("quota violations", lambda r: f"{r.quota_violations} "
                                       f"({r.limit_violations} limit, {r.guarantee_violations} guarantee)"),
        ("preemptions", lambda r: f"{r.preemptions:,}"),
        ("lost GPU-hours", lambda r: f"{r.lost_gpu_hours:,.1f} ({r.lost_gpu_hours_failures:,.1f} failures)"),
        ("makespan (h)", lambda r: f"{r.makespan_s / 3600:,.1f}"),
        ("jobs finished", lambda r: f"{r.finished:,}/{r.jobs:,}"),
        ("sim seconds (wall / CPU)", lambda r: f"{r.sim_seconds:.2f} / {r.cpu_seconds:.2f}"),
    ]
    t.add_column("metric")
    for r in results:
        t.add_column(r.policy, justify="right")
    for label, fmt in rows:
        t.add_row(label, *[fmt(r) for r in results])
    return t


def _group_table(results: list) -> Table:
    t = Table(title="Per group: wait p50 / p95 (s), x received / fair GPU-time",
              title_justify="left")
    t.add_column("group")
    for r in results:
        t.add_column(r.policy, justify="right")
    for g in results[0].per_group:
        t.add_row(g, *[f"{r.per_group[g]['wait_p50_s']:,.0f} / {r.per_group[g]['wait_p95_s']:,.0f}"
                       f"  x{r.per_group[g]['ratio']:.2f}" for r in results])
    return t


if __name__ == "__main__":  # ``python -m mlaas.cli_simulate simulate ...`` before registration
    _app = typer.Typer(add_completion=False)

    @_app.callback()
    def _root() -> None:
        """The farm simulator alone."""

    register(_app)
    _app()
