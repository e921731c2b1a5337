"""Nodes of the GPU pool: which flavors a machine offers, and how a Ray node advertises them.

Layer: platform (the elastic pool). Pure apart from :func:`detect_devices`,
which runs ``nvidia-smi -L``. Used by ``mlaas node join``
(:mod:`mlaas.cli_node`) to start a Ray worker node with its flavors, and by the
Ray executor (:mod:`mlaas.platform.executors.ray_executor`) to read them back.

Flavor names (Kueue's ResourceFlavor, see docs/scheduler.md): a whole GPU is
``nvidia-<model>`` (``nvidia-a100``, ``nvidia-t4``, ``nvidia-h100``), the model
taken from the name ``nvidia-smi`` prints without the vendor words (NVIDIA,
Tesla), memory sizes and form factors (``A100-SXM4-40GB`` -> ``a100``); a MIG
slice is ``<gpu flavor>-mig-<profile>`` (``nvidia-a100-mig-1g.10gb``). A GPU
with MIG slices offers only its slices.

Ray custom resources (the only way a Ray node says what it has):

- ``flavor:<name>`` = number of devices of that flavor on the node;
- ``mlaas-node:<name>`` = 1, the node's name, unique in the pool (Ray's own
  node name is its IP, and several nodes may share one).

Devices are numbered ``0..n-1`` per flavor on a node, as the scheduler's
``Admit.devices`` names them; :func:`device_table` maps those numbers to the
``CUDA_VISIBLE_DEVICES`` ids of the node (UUIDs from ``nvidia-smi``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlaas.errors import ConfigError, PlatformError

__all__ = ["Device", "NodeInfo", "FLAVOR_PREFIX", "NODE_PREFIX", "FLAVOR_NAME",
           "flavor_of_model", "parse_nvidia_smi", "detect_devices", "flavor_counts",
           "parse_flavor_args", "check_node_name", "node_resources", "read_node_resources",
           "device_table"]

FLAVOR_PREFIX = "flavor:"
"""Ray custom resource prefix of a flavor: ``flavor:nvidia-a100`` = device count."""

NODE_PREFIX = "mlaas-node:"
"""Ray custom resource prefix of the node name: ``mlaas-node:gpu-01`` = 1."""

FLAVOR_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
"""Flavor and node names: lower-case letters, digits, ``.``, ``_``, ``-``; at most 63."""

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro"}
_FORM_WORDS = re.compile(r"^(\d+gb|pcie|sxm\d*|hbm\d*e?|nvl|mig|smx\d*)$")
_GPU_LINE = re.compile(r"^GPU (?P<index>\d+): (?P<name>.+?)(?: \(UUID: (?P<uuid>[^)]+)\))?$")
_MIG_LINE = re.compile(
    r"^\s+MIG (?P<profile>\S+)\s+Device\s+(?P<index>\d+):(?: \(UUID: (?P<uuid>[^)]+)\))?")


@dataclass(frozen=True)
class Device:
    """One device a job can be given.

    Args:
        flavor (str): its flavor (``nvidia-a100``, ``nvidia-a100-mig-1g.10gb``).
        id (str): what ``CUDA_VISIBLE_DEVICES`` takes for it (a ``GPU-``/``MIG-``
            UUID, or the index when the UUID is not known).
    """

    flavor: str
    id: str


@dataclass(frozen=True)
class NodeInfo:
    """A node of the Ray pool as the executor sees it.

    Args:
        name (str): the pool-wide name (resource ``mlaas-node:<name>``; for a node
            started without one, ``ray-<first 12 hex of its Ray node id>``).
        node_id (str): Ray's node id (hex).
        address (str): the node's IP.
        alive (bool): Ray still hears from it.
        cpus (float): CPUs it offers.
        memory_gib (float): memory Ray gives its tasks, in GiB.
        flavors (dict): devices per flavor (resources ``flavor:<name>``).
    """

    name: str
    node_id: str
    address: str
    alive: bool
    cpus: float
    memory_gib: float
    flavors: Mapping[str, int] = field(default_factory=dict)

    def to_scheduler_node(self) -> Any:
        """The :class:`mlaas.platform.scheduler.Node` for the policy's snapshot."""
        from mlaas.platform.scheduler import Node

        return Node(self.name, dict(self.flavors), cpus=self.cpus, memory=self.memory_gib)


def flavor_of_model(name: str) -> str:
    """``NVIDIA A100-SXM4-40GB`` -> ``nvidia-a100``; ``Tesla T4`` -> ``nvidia-t4``.

    Vendor words, memory sizes and form factors are dropped; what is left is
    lower-cased and joined with ``-``. Raises :class:`PlatformError` for a
    name with no model left in it.
    """
    words = [w for w in re.split(r"[\s\-_/]+", name.strip().lower()) if w]
    model = [w for w in words if w not in _VENDOR_WORDS and not _FORM_WORDS.match(w)]
    model = [re.sub(r"[^a-z0-9.]", "", w) for w in model]
    model = [w for w in model if w]
    if not model:
        raise PlatformError(f"cannot tell the GPU model from the name {name!r} "
                            "(printed by nvidia-smi); give the node's flavors with --flavor")
    return "nvidia-" + "-".join(model)


def parse_nvidia_smi(text: str) -> list[Device]:
    """The devices listed by ``nvidia-smi -L``: whole GPUs, or the MIG slices of a GPU.

    A GPU followed by ``MIG <profile> Device <n>`` lines offers those slices
    only (flavor ``<gpu flavor>-mig-<profile>``). Lines that are neither are
    ignored (driver warnings).
    """
    devices: list[Device] = []
    gpu: tuple[str, str] | None = None  # (flavor, id) of the GPU being read
    slices: list[Device] = []

    def close() -> None:
        if gpu is not None:
            devices.extend(slices if slices else [Device(*gpu)])

    for line in text.splitlines():
        m = _GPU_LINE.match(line.rstrip())
        if m:
            close()
            gpu = (flavor_of_model(m["name"]), m["uuid"] or m["index"])
            slices = []
            continue
        m = _MIG_LINE.match(line)
        if m and gpu is not None:
            profile = m["profile"].lower()
            slices.append(Device(f"{gpu[0]}-mig-{profile}",
                                 m["uuid"] or f"{gpu[1]}:{m['index']}"))
    close()
    return devices


def detect_devices(*, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
                   which: Callable[[str], str | None] = shutil.which) -> list[Device]:
    """The devices of this machine from ``nvidia-smi -L``; ``[]`` when there is no nvidia-smi.

    Raises :class:`PlatformError` when nvidia-smi is there but fails (a driver
    problem the operator must see, not a machine without GPUs).
    """
    exe = which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PlatformError(f"cannot run {exe!r} -L to detect GPUs: {exc}") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise PlatformError(f"{exe!r} -L failed with code {done.returncode}: "
                            f"{why[-1] if why else 'no output'}; give the node's flavors "
                            "with --flavor or fix the driver")
    return parse_nvidia_smi(done.stdout)


def flavor_counts(devices: Iterable[Device]) -> dict[str, int]:
    """Devices per flavor, sorted by flavor name."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.flavor] = counts.get(d.flavor, 0) + 1
    return dict(sorted(counts.items()))


def _check_flavor(name: str, where: str) -> str:
    if not FLAVOR_NAME.match(name):
        raise ConfigError(f"flavor name {name!r} in {where} is not allowed: use lower-case "
                          "letters, digits, '.', '_' and '-' (at most 63, starting with a "
                          "letter or digit), e.g. nvidia-a100", field_path="flavor")
    return name


def parse_flavor_args(items: Sequence[str]) -> dict[str, int]:
    """``["nvidia-t4=2", "nvidia-a100-mig-1g.10gb=7"]`` -> ``{flavor: count}``.

    Raises :class:`ConfigError` naming the item for a missing ``=``, a bad
    name, a count that is not a positive integer, or a flavor given twice.
    """
    flavors: dict[str, int] = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep:
            raise ConfigError(f"--flavor {item!r} is not NAME=COUNT (e.g. nvidia-t4=2)",
                              field_path="flavor")
        _check_flavor(name.strip(), f"--flavor {item!r}")
        if not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"--flavor {item!r}: the count must be a positive integer",
                              field_path="flavor")
        if name.strip() in flavors:
            raise ConfigError(f"--flavor {name.strip()!r} is given twice", field_path="flavor")
        flavors[name.strip()] = int(count)
    return flavors


def check_node_name(name: str) -> str:
    """A node name is letters, digits, ``.``, ``_``, ``-`` (at most 63); :class:`ConfigError` if not."""
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise ConfigError(f"node name {name!r} is not allowed: use letters, digits, '.', '_' "
                          "and '-' (at most 63, starting with a letter or digit)",
                          field_path="name")
    return name


def node_resources(name: str, flavors: Mapping[str, int]) -> dict[str, float]:
    """The Ray custom resources a node starts with: its name and its flavors."""
    resources: dict[str, float] = {NODE_PREFIX + check_node_name(name): 1.0}
    for flavor, count in sorted(flavors.items()):
        _check_flavor(flavor, "the node's flavors")
        if count < 1:
            raise ConfigError(f"flavor {flavor!r} with {count} devices; at least 1",
                              field_path="flavor")
        resources[FLAVOR_PREFIX + flavor] = float(count)
    return resources


def read_node_resources(resources: Mapping[str, float]) -> tuple[str | None, dict[str, int]]:
    """``(name or None, {flavor: count})`` from a Ray node's resources (others ignored)."""
    names = sorted(k[len(NODE_PREFIX):] for k in resources if k.startswith(NODE_PREFIX))
    flavors = {k[len(FLAVOR_PREFIX):]: int(v) for k, v in resources.items()
               if k.startswith(FLAVOR_PREFIX) and int(v) > 0}
    return (names[0] if names else None), dict(sorted(flavors.items()))


def device_table(flavors: Mapping[str, int], detected: Sequence[Device]) -> dict[str, list[str]]:
    """For each flavor a node advertises, the ``CUDA_VISIBLE_DEVICES`` id of device ``0..n-1``.

    Detected devices of the flavor come first, in ``nvidia-smi`` order. A
    flavor that was configured, not detected (no nvidia-smi, as on this
    project's CI machines), gets the indices ``"0".."n-1"`` counted across the
    configured flavors in name order, so two flavors never share an id.
    """
    by_flavor: dict[str, list[str]] = {}
    for d in detected:
        by_flavor.setdefault(d.flavor, []).append(d.id)
    table: dict[str, list[str]] = {}
    next_index = 0
    for flavor, count in sorted(flavors.items()):
        ids = by_flavor.get(flavor, [])[:count]
        while len(ids) < count:
            ids.append(str(next_index))
            next_index += 1
        table[flavor] = ids
    return table
