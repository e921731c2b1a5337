"""``mlaas queues``, ``mlaas queues set`` and ``mlaas nodes`` against a real ``mlaas server``.

Layer: CLI over HTTP. One server process per module on 127.0.0.1 (single-user
mode: the caller is the local admin), started with ``--cpus 2 --gpu-devices 0
--gpu-flavor test-gpu`` (no GPU here: "0" is only a slot name). The commands
run in-process through typer's runner and talk real HTTP to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mlaas import cli
from mlaas._local_server import LocalServer
from mlaas.cli_farm import read_queue_file
from mlaas.errors import ConfigError, SpecError

pytestmark = [pytest.mark.slow, pytest.mark.network]

WIDE = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}


def run(server: LocalServer, *args: str) -> Any:
    return CliRunner().invoke(cli.app, [*args], env={**WIDE, "MLAAS_SERVER": server.url})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    work = tmp_path_factory.mktemp("farm-cli")
    with LocalServer(work / "server", log=work / "server.log",
                     args=["--cpus", "2", "--gpu-devices", "0", "--gpu-flavor",
                           "test-gpu"]) as running:
        yield running


def test_nodes_table_and_json(server: LocalServer) -> None:
    result = run(server, "nodes")
    assert result.exit_code == 0, result.output + server.log_tail()
    assert "local" in result.output and "test-gpu 1/1" in result.output
    assert "cpu 2/2" in result.output and "local executor" in result.output
    body = json.loads(run(server, "nodes", "--json").output)
    assert body["nodes"][0]["flavors"]["test-gpu"] == {"capacity": 1, "free": 1}


def test_queues_default_then_set_from_a_file(server: LocalServer, tmp_path: Path) -> None:
    result = run(server, "queues")
    assert result.exit_code == 0, result.output + server.log_tail()
    assert "default *" in result.output and "unlimited" in result.output
    path = tmp_path / "queues.yaml"
    path.write_text("queues:\n  - {name: physics, group: '*', cohort: farm,\n"
                    "     quotas: {test-gpu: {nominal: 1, borrowing_limit: 0}}}\n")
    result = run(server, "queues", "set", str(path))
    assert result.exit_code == 0, result.output + server.log_tail()
    assert "physics" in result.output and "test-gpu=1 (+0)" in result.output
    body = json.loads(run(server, "queues", "--json").output)
    assert [q["name"] for q in body["queues"]] == ["physics"]
    assert body["configured"][0]["cohort"] == "farm"


def test_queues_set_refuses_bad_queues_naming_the_field(server: LocalServer,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"name": "x", "group": "g",
                                 "quotas": {"nvidia-h100": {"nominal": 1}}}]))
    result = run(server, "queues", "set", str(path))
    assert result.exit_code != 0
    assert isinstance(result.exception, SpecError)
    assert result.exception.problems[0][0] == "queues.0.quotas.nvidia-h100"


@pytest.mark.parametrize("text, message", [
    ("name: x\n", "must hold a list of queues"),
    ("[1, 2]\n", "must hold a list of queues"),
    ("queues: [\n", "does not parse"),
])
def test_bad_queue_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_queue_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_queue_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("args", [["--executor", "ray"], ["--executor", "slurm"]])
def test_server_executor_flags_are_checked(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(cli.app, ["server", "--data-dir", str(tmp_path), *args],
                                env=WIDE)
    assert isinstance(result.exception, ConfigError), result.output
    assert [p for p, _ in result.exception.problems] == ["executor"]
