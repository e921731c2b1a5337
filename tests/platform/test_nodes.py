"""Flavor detection and node resources (mlaas.platform.nodes), and ``mlaas node join --dry-run``.

There is no GPU on this machine. The ``nvidia-smi -L`` outputs below are
captured text from real machines (A100 40 GB and 80 GB with and without MIG,
T4, V100, H100, L40S, RTX A6000, GeForce); :func:`detect_devices` is run
against a stand-in ``nvidia-smi`` script that prints them, a real process
found through ``which=``. That stand-in is the only test double, because no
GPU driver can run here.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mlaas.cli_node import default_node_name, register
from mlaas.errors import ConfigError, PlatformError
from mlaas.platform.nodes import (
    Device,
    NodeInfo,
    check_node_name,
    detect_devices,
    device_table,
    flavor_counts,
    flavor_of_model,
    node_resources,
    parse_flavor_args,
    parse_nvidia_smi,
    read_node_resources,
)

A100_WHOLE = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-1e3a6b1f-7c2d-4f7e-9b55-0c3c8f2a6d10)
"""

A100_MIG = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c98e5b1a)
  MIG 1g.10gb     Device  0: (UUID: MIG-4f1bd32a-8b56-5b4c-9a3e-2f5b1d3e7c01)
  MIG 1g.10gb     Device  1: (UUID: MIG-8c2d1e4f-6a7b-5c8d-9e0f-1a2b3c4d5e02)
  MIG 3g.40gb     Device  2: (UUID: MIG-0a1b2c3d-4e5f-5a6b-8c7d-9e0f1a2b3c03)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-2b3c4d5e-6f70-4182-93a4-b5c6d7e8f904)
"""

MIXED = """\
GPU 0: Tesla T4 (UUID: GPU-aaaaaaaa-0000-1111-2222-333333333333)
GPU 1: Tesla V100-SXM2-16GB (UUID: GPU-bbbbbbbb-0000-1111-2222-333333333333)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-cccccccc-0000-1111-2222-333333333333)
GPU 3: NVIDIA L40S (UUID: GPU-dddddddd-0000-1111-2222-333333333333)
"""

NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


@pytest.mark.parametrize(("name", "flavor"), [
    ("NVIDIA A100-SXM4-40GB", "nvidia-a100"),
    ("NVIDIA A100 80GB PCIe", "nvidia-a100"),
    ("Tesla T4", "nvidia-t4"),
    ("Tesla V100-SXM2-16GB", "nvidia-v100"),
    ("NVIDIA H100 80GB HBM3", "nvidia-h100"),
    ("NVIDIA H100 NVL", "nvidia-h100"),
    ("NVIDIA L40S", "nvidia-l40s"),
    ("NVIDIA RTX A6000", "nvidia-rtx-a6000"),
    ("NVIDIA GeForce RTX 3090", "nvidia-rtx-3090"),
])
def test_flavor_of_model(name: str, flavor: str) -> None:
    assert flavor_of_model(name) == flavor


def test_a_name_without_a_model_is_refused() -> None:
    with pytest.raises(PlatformError, match="cannot tell the GPU model from the name 'NVIDIA'"):
        flavor_of_model("NVIDIA")


def test_whole_gpus_by_uuid() -> None:
    assert parse_nvidia_smi(A100_WHOLE) == [
        Device("nvidia-a100", "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77"),
        Device("nvidia-a100", "GPU-1e3a6b1f-7c2d-4f7e-9b55-0c3c8f2a6d10")]


def test_a_gpu_with_mig_slices_offers_only_its_slices() -> None:
    devices = parse_nvidia_smi(A100_MIG)
    assert flavor_counts(devices) == {"nvidia-a100": 1, "nvidia-a100-mig-1g.10gb": 2,
                                      "nvidia-a100-mig-3g.40gb": 1}
    assert devices[0] == Device("nvidia-a100-mig-1g.10gb",
                                "MIG-4f1bd32a-8b56-5b4c-9a3e-2f5b1d3e7c01")
    assert devices[-1] == Device("nvidia-a100", "GPU-2b3c4d5e-6f70-4182-93a4-b5c6d7e8f904")


def test_mixed_models_and_noise_lines() -> None:
    text = "Warning: persistence mode is disabled\n" + MIXED
    assert flavor_counts(parse_nvidia_smi(text)) == {
        "nvidia-h100": 1, "nvidia-l40s": 1, "nvidia-t4": 1, "nvidia-v100": 1}
    assert parse_nvidia_smi("") == []
    # an old driver prints no UUID: the index is the id
    assert parse_nvidia_smi("GPU 3: Tesla T4\n") == [Device("nvidia-t4", "3")]


def _fake_nvidia_smi(tmp_path: Path, output: str, code: int = 0) -> Path:
    """A stand-in nvidia-smi (no GPU here): prints captured output, exits with ``code``."""
    (tmp_path / "out.txt").write_text(output)
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat {tmp_path / 'out.txt'}\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_detect_devices_runs_nvidia_smi(tmp_path: Path) -> None:
    exe = _fake_nvidia_smi(tmp_path, A100_MIG)
    devices = detect_devices(which=lambda name: str(exe) if name == "nvidia-smi" else None)
    assert flavor_counts(devices)["nvidia-a100-mig-1g.10gb"] == 2


def test_no_nvidia_smi_means_no_devices() -> None:
    assert detect_devices(which=lambda name: None) == []


def test_a_failing_nvidia_smi_is_an_error_not_zero_gpus(tmp_path: Path) -> None:
    exe = _fake_nvidia_smi(tmp_path, NO_DRIVER, code=9)
    with pytest.raises(PlatformError, match="failed with code 9: NVIDIA-SMI has failed"):
        detect_devices(which=lambda name: str(exe))


def test_flavor_args() -> None:
    assert parse_flavor_args(["nvidia-t4=2", "nvidia-a100-mig-1g.10gb=7"]) == {
        "nvidia-t4": 2, "nvidia-a100-mig-1g.10gb": 7}
    assert parse_flavor_args([]) == {}


@pytest.mark.parametrize(("items", "message"), [
    (["nvidia-t4"], "'nvidia-t4' is not NAME=COUNT"),
    (["nvidia-t4=0"], "the count must be a positive integer"),
    (["nvidia-t4=two"], "the count must be a positive integer"),
    (["nvidia-t4=-1"], "the count must be a positive integer"),
    (["NVIDIA T4=1"], "flavor name 'NVIDIA T4'"),
    (["../x=1"], "flavor name '../x'"),
    (["nvidia-t4=1", "nvidia-t4=2"], "'nvidia-t4' is given twice"),
])
def test_bad_flavor_args(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_flavor_args(items)


def test_node_resources_round_trip() -> None:
    res = node_resources("gpu-01", {"nvidia-t4": 2, "nvidia-a100": 1})
    assert res == {"mlaas-node:gpu-01": 1.0, "flavor:nvidia-a100": 1.0, "flavor:nvidia-t4": 2.0}
    ray_view = {**res, "CPU": 8.0, "memory": 1e9, "node:127.0.0.1": 1.0,
                "flavor:nvidia-x": 0.0}
    assert read_node_resources(ray_view) == ("gpu-01", {"nvidia-a100": 1, "nvidia-t4": 2})
    assert read_node_resources({"CPU": 1.0}) == (None, {})


@pytest.mark.parametrize("name", ["", "a b", "../etc", "-x", "x" * 64, "n\x00"])
def test_bad_node_names(name: str) -> None:
    with pytest.raises(ConfigError, match="node name"):
        check_node_name(name)
    with pytest.raises(ConfigError, match="node name"):
        node_resources(name, {})


def test_node_resources_refuse_empty_flavors() -> None:
    with pytest.raises(ConfigError, match="flavor 'nvidia-t4' with 0 devices"):
        node_resources("n", {"nvidia-t4": 0})


def test_device_table_maps_numbers_to_ids() -> None:
    detected = parse_nvidia_smi(A100_MIG)
    table = device_table({"nvidia-a100-mig-1g.10gb": 2, "nvidia-a100": 1}, detected)
    assert table == {"nvidia-a100": ["GPU-2b3c4d5e-6f70-4182-93a4-b5c6d7e8f904"],
                     "nvidia-a100-mig-1g.10gb": ["MIG-4f1bd32a-8b56-5b4c-9a3e-2f5b1d3e7c01",
                                                 "MIG-8c2d1e4f-6a7b-5c8d-9e0f-1a2b3c4d5e02"]}
    # configured, not detected (this machine): indices counted across flavors
    assert device_table({"test-gpu": 2, "other": 1}, []) == {"other": ["0"],
                                                             "test-gpu": ["1", "2"]}


def test_node_info_to_scheduler_node() -> None:
    info = NodeInfo("gpu-01", "ab" * 28, "127.0.0.1", True, 8.0, 30.0, {"nvidia-t4": 2})
    node = info.to_scheduler_node()
    assert (node.name, dict(node.gpus), node.cpus, node.memory) == (
        "gpu-01", {"nvidia-t4": 2}, 8.0, 30.0)


# -- mlaas node join --dry-run ------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    register(app)
    return app


def test_join_dry_run_with_configured_flavors() -> None:
    result = CliRunner().invoke(_app(), ["node", "join", "127.0.0.1:6379", "--flavor",
                                         "nvidia-t4=2", "--name", "gpu-01", "--cpus", "4",
                                         "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["resources"] == {"mlaas-node:gpu-01": 1.0, "flavor:nvidia-t4": 2.0}
    assert (plan["flavors_from"], plan["cpus"], plan["node_ip"]) == ("configured", 4, "127.0.0.1")


def test_join_dry_run_detects_without_flavors(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path, MIXED)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    result = CliRunner().invoke(_app(), ["node", "join", "127.0.0.1:6379", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["flavors"] == {"nvidia-h100": 1, "nvidia-l40s": 1, "nvidia-t4": 1,
                               "nvidia-v100": 1}
    assert plan["name"] == default_node_name()


@pytest.mark.parametrize(("args", "error"), [
    (["--flavor", "nvidia-t4"], ConfigError),
    (["--name", "a/b"], ConfigError),
])
def test_join_bad_input(args: list[str], error: type[Exception]) -> None:
    result = CliRunner().invoke(_app(), ["node", "join", "127.0.0.1:6379", *args, "--dry-run"])
    assert isinstance(result.exception, error), result.output


def test_join_refuses_a_zero_cpu_count() -> None:
    result = CliRunner().invoke(_app(), ["node", "join", "127.0.0.1:6379", "--cpus", "0"])
    assert result.exit_code == 2 and "--cpus" in result.output


# -- the node launcher's input and the optional import ---------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("10.0.0.5", False),
    ("gpu-01.example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    from mlaas.platform.raynode import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("text", "message"), [
    ("{", "is not JSON"),
    ("[1]", "must be a JSON object"),
    ('{"flavor:x": -1}', "must be a JSON object"),
    ('{"flavor:x": true}', "must be a JSON object"),
    ('{"flavor:x": "2"}', "must be a JSON object"),
])
def test_raynode_refuses_bad_resources(text: str, message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from mlaas.platform.raynode import main

    assert main(["--head", "--resources", text]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ConfigError: --resources ") and message in err


def test_raynode_needs_a_role(capsys: pytest.CaptureFixture[str]) -> None:
    from mlaas.platform.raynode import main

    with pytest.raises(SystemExit) as info:
        main(["--num-cpus", "1"])
    assert info.value.code == 2 and "--head" in capsys.readouterr().err


def test_missing_ray_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mlaas.extras import ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does for a missing package
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'mlaas\[ray\]'") as info:
        ray()
    assert info.value.name == "ray"
