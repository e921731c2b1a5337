"""The farm's configuration as the scheduler sees it: queues, flavors, nodes, requests.

Layer: platform (between the configuration and the pure policy). The config
file and ``PUT /api/queues`` speak :class:`~mlaas.platform.config.QueueConfig`;
the policy (:mod:`mlaas.platform.scheduler`) speaks ``Queue``, ``Flavor``,
``Node`` and ``Workload``. This module translates, in one place:

- CPU slots are the flavor ``cpu`` (a job's ``cpus`` are charged to it like
  devices), so one local machine with ``--cpus 4`` is a node of four ``cpu``
  slots and a queue may have a CPU quota. A queue that does not list ``cpu``
  has no CPU limit.
- Without configured queues there is one queue ``default`` for everybody
  (group ``*``), StrictFIFO (the single-user server's first-come first-served)
  with no quota limit on any flavor.
- A job's queue must belong to one of the submitter's groups (admins may use
  any); without one it goes to the first queue of the submitter's groups.
- The queue list set with ``PUT /api/queues`` is kept in ``DATA_DIR/queues.json``
  (written atomically), so a restart keeps it; it wins over the config file's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from mlaas.errors import ConfigError, Forbidden, SpecError
from mlaas.platform.config import CPU_FLAVOR, EVERYONE, FlavorConfig, QueueConfig, check_queues
from mlaas.platform.principal import Principal
from mlaas.platform.scheduler import Flavor, Node, Queue, Quota

__all__ = ["UNLIMITED", "DEFAULT_QUEUE", "QUEUES_FILE", "Request", "scheduler_queues",
           "scheduler_flavors", "local_node", "parse_request", "choose_queue",
           "resolve_priority", "validate_queues", "load_queue_file", "save_queue_file"]

UNLIMITED = 10**9
"""The nominal quota standing for "no limit" (more devices than any pool has)."""

DEFAULT_QUEUE = "default"
QUEUES_FILE = "queues.json"
_GIB = 2**30


def scheduler_flavors(gpu_flavor: str, flavors: Sequence[FlavorConfig]) -> list[Flavor]:
    """``cpu``, the local GPUs' flavor and the configured ones."""
    out = {CPU_FLAVOR: Flavor(CPU_FLAVOR, description="CPU slots"),
           gpu_flavor: Flavor(gpu_flavor)}
    for f in flavors:
        out[f.name] = Flavor(f.name, f.parent, f.description)
    return list(out.values())


def scheduler_queues(queues: Sequence[QueueConfig], flavor_names: Iterable[str]) -> list[Queue]:
    """The policy's queues; without any, the one ``default`` queue with no limits."""
    names = sorted(set(flavor_names))
    if not queues:
        return [Queue(DEFAULT_QUEUE, EVERYONE, {f: Quota(UNLIMITED) for f in names},
                      strategy="StrictFIFO")]
    out = []
    for q in queues:
        quotas = {f: Quota(c.nominal, c.borrowing_limit) for f, c in q.quotas.items()}
        quotas.setdefault(CPU_FLAVOR, Quota(UNLIMITED))
        out.append(Queue(q.name, q.group, quotas, cohort=q.cohort, strategy=q.strategy,
                         priority_classes=q.priority_classes,
                         preempt_within_queue=q.preempt_within_queue))
    return out


def local_node(name: str, cpus: int, gpu_flavor: str, gpus: int) -> Node:
    """This machine as one node: ``cpus`` slots of flavor ``cpu`` and its GPUs."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _GIB
    except (ValueError, OSError, AttributeError):
        memory = 512.0
    flavors = {CPU_FLAVOR: cpus}
    if gpus:
        flavors[gpu_flavor] = gpus
    return Node(name, flavors, cpus=float(cpus), memory=float(memory))


@dataclass(frozen=True)
class Request:
    """What one job asks for, normalised from its ``resources`` and the defaults."""

    cpus: int
    gpus: dict[str, int]  # flavor -> devices (no cpu)
    memory_gib: float
    memory_bytes: int | None
    max_time_s: float | None
    threads: int | None

    @property
    def flavors(self) -> dict[str, int]:
        """The scheduler's request: devices per flavor, CPU slots as ``cpu``."""
        return {CPU_FLAVOR: self.cpus, **self.gpus}

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())


def parse_request(resources: Mapping[str, Any], gpu_flavor: str) -> Request:
    """The request of a job from its merged resources; :class:`ValueError` naming the field.

    ``gpus`` is a count (of ``gpu_flavor``) or ``{flavor: count}``; ``memory``
    (GiB, what the scheduler places by) and ``memory_bytes`` (the process's
    address-space limit) are both optional.
    """
    try:
        cpus = int(resources["cpus"])
        raw = resources.get("gpus") or 0
        if isinstance(raw, Mapping):
            gpus = {str(f): int(n) for f, n in raw.items() if int(n) != 0}
        else:
            gpus = {gpu_flavor: int(raw)} if int(raw) else {}
        memory_bytes = None if resources.get("memory_bytes") is None \
            else int(resources["memory_bytes"])
        memory = float(resources.get("memory") or 0.0)
        max_time = None if resources.get("max_time_s") is None \
            else float(resources["max_time_s"])
        threads = None if resources.get("threads") is None else int(resources["threads"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"invalid resources {dict(resources)!r}: {exc}") from exc
    if cpus < 1 or any(n < 0 for n in gpus.values()) or memory < 0 \
            or (memory_bytes is not None and memory_bytes <= 0) \
            or (max_time is not None and max_time <= 0) or (threads is not None and threads < 1):
        raise ValueError(f"invalid resources {dict(resources)!r}: cpus and threads must "
                         "be >= 1, gpus >= 0, memory >= 0, memory_bytes and max_time_s > 0")
    return Request(cpus, gpus, memory, memory_bytes, max_time, threads)


def may_use(principal: Principal, queue: Queue) -> bool:
    return queue.group == EVERYONE or principal.in_group(queue.group) or principal.is_admin


def choose_queue(principal: Principal, wanted: str | None, queues: Mapping[str, Queue]) -> Queue:
    """The queue a job of ``principal`` goes to.

    ``wanted`` must exist (:class:`SpecError` at ``resources.queue``) and
    belong to one of the principal's groups (:class:`Forbidden`, admins may
    use any). Without it: the first queue of the principal's primary group,
    else of any of their groups, else for everybody.
    """
    if wanted is not None:
        queue = queues.get(wanted)
        if queue is None:
            raise SpecError(f"unknown queue {wanted!r}",
                            [("resources.queue", f"no queue {wanted!r}; queues: "
                              f"{', '.join(sorted(queues))}")], field_path="resources.queue")
        if not may_use(principal, queue):
            raise Forbidden(f"queue {wanted!r} (resources.queue) belongs to group "
                            f"{queue.group!r}, which user {principal.user!r} is not in",
                            field_path="resources.queue")
        return queue
    ordered = list(queues.values())
    for test in (lambda q: q.group == principal.primary_group,
                 lambda q: principal.in_group(q.group), lambda q: q.group == EVERYONE):
        for q in ordered:
            if test(q):
                return q
    raise Forbidden(f"user {principal.user!r} is in no group with a queue (groups "
                    f"{', '.join(principal.groups) or 'none'}); ask an admin for one",
                    field_path="resources.queue")


def resolve_priority(value: Any, queue: Queue) -> int:
    """An integer priority, or a priority class name of ``queue``; :class:`SpecError` if not."""
    if value is None:
        return 0
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in queue.priority_classes:
        return int(queue.priority_classes[value])
    classes = ", ".join(sorted(queue.priority_classes)) or "none"
    raise SpecError(f"unknown priority {value!r} for queue {queue.name!r}",
                    [("resources.priority", f"an integer or a priority class of queue "
                      f"{queue.name!r} ({classes})")], field_path="resources.priority")


def check_admissible(request: Request, queue: Queue) -> None:
    """:class:`SpecError` when ``queue`` has no quota for a flavor the request asks for."""
    for flavor in sorted(request.gpus):
        if flavor not in queue.quotas:
            raise SpecError(f"queue {queue.name!r} has no quota for flavor {flavor!r}",
                            [("resources.gpus", f"flavor {flavor!r} is not available in queue "
                              f"{queue.name!r} (it has {', '.join(sorted(queue.quotas))})")],
                            field_path="resources.gpus")


_QUEUE_LIST = TypeAdapter(list[QueueConfig])


def validate_queues(data: Any, known_flavors: set[str], where: str = "queues"
                    ) -> list[QueueConfig]:
    """A queue list from JSON data (``PUT /api/queues`` or the file); :class:`SpecError`
    listing every problem by field path."""
    try:
        queues = _QUEUE_LIST.validate_python(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            path = ".".join([where, *(str(p) for p in e["loc"])])
            problems.append((path, "unknown setting" if e["type"] == "extra_forbidden"
                             else e["msg"].removeprefix("Value error, ")))
        raise SpecError("invalid queue configuration", problems) from None
    problems = check_queues(queues, known_flavors, where)
    if problems:
        raise SpecError("invalid queue configuration", problems)
    return queues


def load_queue_file(data_dir: Path, known_flavors: set[str]) -> list[QueueConfig] | None:
    """The queues last set through the API, or ``None`` when none were."""
    path = Path(data_dir) / QUEUES_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}",
                          file_path=str(path)) from None
    try:
        data = json.loads(text)
        return validate_queues(data.get("queues") if isinstance(data, dict) else data,
                               known_flavors)
    except (ValueError, SpecError) as exc:
        raise ConfigError(f"the queue configuration saved in {str(path)!r} is not valid "
                          f"(fix or remove it): {exc}", file_path=str(path)) from None


def save_queue_file(data_dir: Path, queues: Sequence[QueueConfig]) -> Path:
    """Write the queue list atomically to ``DATA_DIR/queues.json``."""
    from mlaas.platform.jobrun import write_json_atomic

    path = Path(data_dir) / QUEUES_FILE
    write_json_atomic(path, {"queues": [q.model_dump(mode="json") for q in queues]})
    return path
