"""The farm simulator: invariants on a small scenario, metrics, scenario files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from mlaas import cli_simulate
from mlaas.errors import SpecError
from mlaas.platform.simulate import Scenario, jain, load_scenario, simulate, water_fill

SMALL = {
    "seed": 3,
    "nodes": [
        {"name": "a100", "count": 2, "gpus": {"nvidia-a100": 4}},
        {"name": "t4", "count": 2, "gpus": {"nvidia-t4": 2},
         "absent": [{"from_s": 0, "to_s": 3600}]},
    ],
    "groups": [
        {"name": "alice", "users": 3, "load": 3.0, "preempt_within_queue": True,
         "quotas": {"nvidia-a100": {"nominal": 4, "borrowing_limit": 2},
                    "nvidia-t4": {"nominal": 2}}},
        {"name": "bob", "users": 2, "load": 1.0,
         "quotas": {"nvidia-a100": {"nominal": 4}, "nvidia-t4": {"nominal": 2}}},
    ],
    "jobs": {"count": 240, "span_s": 20_000, "duration_median_s": 1200,
             "burst_fraction": 0.5, "burst_size_mean": 15,
             "flavors": {"nvidia-a100": {"weight": 2, "gpus": {1: 0.6, 2: 0.3, 4: 0.1}},
                         "nvidia-t4": {"weight": 1}},
             "high_priority_fraction": 0.1},
    "failures": {"mtbf_s": 20_000, "repair_s": 1_800},
}


@pytest.fixture(scope="module")
def small() -> Scenario:
    return Scenario.model_validate(SMALL)


@pytest.fixture(scope="module")
def fair(small: Scenario):
    return simulate(small, "fair")


def test_every_job_finishes_and_fair_keeps_the_quotas(fair) -> None:
    assert fair.finished == fair.jobs == 240
    assert fair.quota_violations == 0
    assert 0.5 < fair.utilisation <= 1.0 + 1e-9
    assert 0.0 < fair.jain_fairness <= 1.0
    assert fair.node_failures > 0  # the scenario exercises requeue after failures
    assert set(fair.per_group) == {"alice", "bob"}


def test_the_same_seed_gives_the_same_run(small: Scenario, fair) -> None:
    again = simulate(small, "fair")
    strip = lambda d: {k: v for k, v in d.items()  # noqa: E731
                       if k not in ("sim_seconds", "cpu_seconds")}
    assert strip(again.summary()) == strip(fair.summary())
    other = simulate(small, "fair", seed=4)
    assert strip(other.summary()) != strip(fair.summary())


def test_fifo_ignores_quotas_and_the_quota_policy_does_not_reclaim(small: Scenario) -> None:
    fifo = simulate(small, "fifo")
    quota = simulate(small, "quota")
    assert fifo.finished == quota.finished == 240
    assert fifo.limit_violations > 0  # alice goes beyond nominal + borrowing limit
    assert quota.limit_violations == 0
    assert fifo.preemptions == quota.preemptions == 0


def test_the_horizon_stops_a_run_that_cannot_finish(small: Scenario) -> None:
    short = small.model_copy(update={"max_time_s": 5_000.0})
    result = simulate(short, "fair")
    assert 0 < result.finished < result.jobs
    assert result.makespan_s <= 5_000.0


def test_preempted_and_failed_work_is_lost_only_since_the_last_checkpoint(fair) -> None:
    # every lost second is below the longest checkpoint interval, per run stopped
    assert fair.lost_gpu_hours >= fair.lost_gpu_hours_failures >= 0
    stops = fair.preemptions + fair.node_failures * 8  # at most 8 devices per node here
    assert fair.lost_gpu_hours <= stops * 4 * 3_600 / 3_600


WATER = {
    "enough for everyone: everyone gets their demand": (10, {"a": 2, "b": 3}, {"a": 1, "b": 1},
                                                        {"a": 2, "b": 3}),
    "scarce, equal weights: equal split": (4, {"a": 5, "b": 5}, {"a": 1, "b": 1},
                                           {"a": 2, "b": 2}),
    "scarce, weights 3:1": (8, {"a": 10, "b": 10}, {"a": 3, "b": 1}, {"a": 6, "b": 2}),
    "a small demand is met and the rest is shared": (6, {"a": 1, "b": 10, "c": 10},
                                                     {"a": 1, "b": 1, "c": 1},
                                                     {"a": 1, "b": 2.5, "c": 2.5}),
}


@pytest.mark.parametrize("case", list(WATER), ids=list(WATER))
def test_water_fill(case: str) -> None:
    cap, demand, weight, want = WATER[case]
    got = water_fill(cap, demand, weight)
    assert got == pytest.approx(want)


def test_jain_index() -> None:
    assert jain([1, 1, 1]) == pytest.approx(1.0)
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([]) == 1.0


SCENARIO_ERRORS = {
    "an unknown key names its path": ({"jobs": {"cunt": 5}}, "jobs.cunt"),
    "a job flavor no node offers": ({"jobs": {"flavors": {"nvidia-h100": {"weight": 1}}}},
                                    "nvidia-h100"),
    "a quota on a flavor no node offers": (
        {"groups": [{"name": "g", "quotas": {"nvidia-v100": {"nominal": 1}}}]}, "nvidia-v100"),
    "a negative nominal quota": (
        {"groups": [{"name": "g", "quotas": {"nvidia-t4": {"nominal": -1}}}]},
        "groups.0.quotas.nvidia-t4.nominal"),
    "a window that ends before it starts": (
        {"nodes": [{"name": "n", "count": 1, "gpus": {"nvidia-t4": 1},
                    "absent": [{"from_s": 10, "to_s": 5}]}]}, "to_s"),
    "an unknown policy override": ({"policy": {"half_lfe_s": 10}}, "half_lfe_s"),
    "duplicate group names": ({"groups": [{"name": "g", "quotas": {}},
                                          {"name": "g", "quotas": {}}]}, "unique"),
    "a job larger than every node": (
        {"jobs": {"flavors": {"nvidia-t4": {"weight": 1, "gpus": {8: 1.0}}}}},
        "jobs.flavors.nvidia-t4 asks for 8 devices, but the largest node has 4"),
    "a group without quota for a flavor its jobs use": (
        {"groups": [{"name": "g", "quotas": {"nvidia-t4": {"nominal": 1}}}]},
        "no 'nvidia-a100'"),
}


@pytest.mark.parametrize("case", list(SCENARIO_ERRORS), ids=list(SCENARIO_ERRORS))
def test_scenario_errors_name_the_field(case: str, tmp_path: Path) -> None:
    raw, needle = SCENARIO_ERRORS[case]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as exc:
        load_scenario(path)
    assert needle in str(exc.value)
    assert exc.value.file_path == str(path)


def test_scenario_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read scenario file"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_scenario(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping at the top"):
        load_scenario(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_scenario(empty).jobs.count == 10_000  # the default scenario


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    cli_simulate.register(app)
    return app


def test_cli_json_for_one_policy(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(json.loads(Scenario.model_validate(SMALL).model_dump_json())))
    result = CliRunner().invoke(_app(), ["simulate", "--scenario", str(path), "--policy", "fair",
                                         "--json", "--jobs", "120"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    for key in ("utilisation", "jain_fairness", "wait_p50_s", "wait_p95_s", "quota_violations",
                "preemptions", "lost_gpu_hours", "sim_seconds", "per_group"):
        assert key in out
    assert out["jobs"] == 120 and out["policy"] == "fair"
    assert set(out["per_group"]["alice"]) >= {"wait_p50_s", "wait_p95_s"}


def test_cli_table_compares_the_three_policies_and_writes_plots(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(json.loads(Scenario.model_validate(SMALL).model_dump_json())))
    result = CliRunner().invoke(_app(), ["simulate", "--scenario", str(path), "--jobs", "80",
                                         "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    for name in ("fifo", "quota", "fair", "Jain fairness", "quota violations"):
        assert name in result.output
    for png in ("utilisation.png", "queues.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_show_scenario_round_trips_and_bad_policy_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["simulate", "--show-scenario"])
    assert result.exit_code == 0
    path = tmp_path / "default.yaml"
    path.write_text(result.output)
    assert load_scenario(path) == Scenario()
    bad = CliRunner().invoke(_app(), ["simulate", "--policy", "lottery", "--jobs", "10"])
    assert isinstance(bad.exception, SpecError) and "lottery" in str(bad.exception)
