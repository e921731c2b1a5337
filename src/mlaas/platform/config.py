"""The platform server's settings: one pydantic model, read from a file, then flags.

Layer: platform (configuration). ``mlaas server`` builds one
:class:`PlatformConfig` with :func:`load_config` (a YAML or TOML file given
with ``--config``, then the command-line flags on top) and hands it to
:func:`mlaas.platform.app.create_platform_app`; nothing reads the
environment or a global settings object behind its back. Every problem is
reported as one error naming each bad field (``cpus: Input should be
greater than or equal to 1``).

The defaults are the embedded single-user server: SQLite and local storage
under ``~/.local/share/mlaas``, the local executor with every CPU, bound to
127.0.0.1. The ``auth`` section keeps room for the multi-user modes (OIDC
issuers, a trusted proxy, rate limits); left at its defaults it means
single-user mode.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from mlaas.errors import ConfigError

__all__ = ["PlatformConfig", "JobDefaults", "AuthConfig", "QuotaConfig", "QueueConfig",
           "FlavorConfig", "SchedulerConfig", "check_queues", "load_config", "DEFAULT_DATA_DIR",
           "CPU_FLAVOR", "EVERYONE"]

DEFAULT_DATA_DIR = Path("~/.local/share/mlaas")

CPU_FLAVOR = "cpu"
"""The flavor of CPU slots: a job's ``cpus`` are charged to it like devices."""

EVERYONE = "*"
"""A queue ``group`` meaning every user (the default queue's)."""

_NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class JobDefaults(_Model):
    """Limits a job gets when its spec does not ask for others."""

    memory_bytes: int | None = Field(default=None, gt=0, description=(
        "Address-space limit of a job process (RLIMIT_AS); none by default."))
    max_time_s: float | None = Field(default=None, gt=0, description=(
        "Wall-clock limit of one job attempt in seconds; the job is stopped (SIGTERM, "
        "then SIGKILL) when it passes. None: no limit."))
    threads: int | None = Field(default=None, ge=1, description=(
        "CPU threads of a job's thread pools (torch, BLAS); default: its CPU slots."))


class AuthConfig(_Model):
    """Who the callers are. All defaults: single-user mode (every request is the local admin)."""

    oidc_issuers: list[str] = Field(default_factory=list, description=(
        "Accepted OpenID Connect issuer URLs; empty: no OIDC login."))
    audience: str | None = Field(default=None, description="Required ``aud`` of OIDC tokens.")
    admin_group: str | None = Field(default=None, description=(
        "Members of this group get the admin role."))
    trusted_proxies: list[str] = Field(default_factory=list, description=(
        "Addresses of reverse proxies whose identity headers are trusted."))
    rate_limit_per_minute: int | None = Field(default=None, ge=1, description=(
        "Job submissions, and separately inference requests, per user per minute "
        "before 429; none: unlimited."))
    pass_token_to_jobs: bool = Field(default=False, description=(
        "Hand the submitter's OIDC access token to the job (BEARER_TOKEN_FILE, for "
        "XRootD); see docs/auth.md for the trade-offs."))

    @property
    def single_user(self) -> bool:
        """True when no way of logging in is configured: everyone is the local user."""
        return not self.oidc_issuers and not self.trusted_proxies


class _Problems(ValueError):
    """Cross-field problems, each with its own field path (unpacked by :func:`_problems`)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


class QuotaConfig(_Model):
    """A queue's share of one flavor (Kueue's nominal quota and borrowing limit)."""

    nominal: int = Field(ge=0, description="Devices (or CPU slots) guaranteed to the queue.")
    borrowing_limit: int | None = Field(default=None, ge=0, description=(
        "How many more it may borrow from its cohort's unused quota; none: no limit."))


class QueueConfig(_Model):
    """One group's queue; see docs/scheduler.md (Concepts) for the words."""

    name: str = Field(pattern=_NAME_RE, description="The queue's name (resources.queue).")
    group: str = Field(min_length=1, description=(
        "Members of this group (as the identity provider spells it) may submit here; "
        "'*': everybody."))
    quotas: dict[str, QuotaConfig] = Field(default_factory=dict, description=(
        "Per flavor. A request for a flavor not listed is refused, except 'cpu', which "
        "is unlimited when not listed."))
    cohort: str | None = Field(default=None, description=(
        "Queues of one cohort lend each other unused nominal quota."))
    strategy: Literal["BestEffortFIFO", "StrictFIFO"] = "BestEffortFIFO"
    priority_classes: dict[str, int] = Field(default_factory=dict, description=(
        "Named priorities (resources.priority may name one); higher goes first."))
    preempt_within_queue: bool = Field(default=False, description=(
        "A higher-priority job may evict lower-priority ones of this queue."))


class FlavorConfig(_Model):
    """A kind of device a node can offer (nvidia-a100, nvidia-a100-mig-1g.10gb, ...)."""

    name: str = Field(pattern=_NAME_RE)
    parent: str | None = Field(default=None, description="For a MIG slice: the whole-GPU flavor.")
    description: str = ""


class SchedulerConfig(_Model):
    """The scheduling policy and its knobs (docs/scheduler.md, The policies)."""

    policy: Literal["fifo", "quota", "fair"] = Field(default="fair", description=(
        "fifo: one line, quotas ignored; quota: Kueue without fair sharing; fair: ours."))
    half_life_s: float | None = Field(default=None, gt=0, description=(
        "Half-life of users' decayed usage (fair share); default one day."))
    fair_share_charge_s: float | None = Field(default=None, ge=0)
    age_boost_s: float | None = Field(default=None, ge=0, description=(
        "A job waiting longer goes first within its priority; default 6 h."))
    no_age_boost: bool = Field(default=False, description="Turn the age boost off.")
    reclaim: bool | None = Field(default=None, description=(
        "A queue waiting inside its nominal quota evicts borrowers (default: on for fair)."))
    priority_preemption: bool | None = Field(default=None, description=(
        "Higher priority evicts lower in queues with preempt_within_queue."))

    def policy_config(self) -> Any:
        """The :class:`mlaas.platform.scheduler.PolicyConfig` these settings give."""
        from mlaas.platform.scheduler import policy

        changes: dict[str, Any] = {k: getattr(self, k) for k in (
            "half_life_s", "fair_share_charge_s", "age_boost_s", "reclaim",
            "priority_preemption") if getattr(self, k) is not None}
        if self.no_age_boost:
            changes["age_boost_s"] = None
        return policy(self.policy, **changes)


def check_queues(queues: list[QueueConfig], known_flavors: set[str],
                 where: str = "queues") -> list[tuple[str, str]]:
    """Problems ``(field path, message)`` of a queue list: repeated names, unknown
    flavors. Empty when the list is fine (used for the file and for PUT /api/queues)."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, q in enumerate(queues):
        if q.name in seen:
            problems.append((f"{where}.{i}.name", f"queue {q.name!r} is defined twice"))
        seen.add(q.name)
        for flavor in q.quotas:
            if flavor not in known_flavors:
                problems.append((f"{where}.{i}.quotas.{flavor}",
                                 f"unknown flavor {flavor!r}; known: "
                                 f"{', '.join(sorted(known_flavors))}"))
    return problems


class PlatformConfig(_Model):
    """Everything ``mlaas server`` needs; see the module docstring for where it comes from."""

    data_dir: Path = Field(default=DEFAULT_DATA_DIR, validate_default=True, description=(
        "Root of platform storage: the SQLite file, workspaces, job directories, models."))
    db_url: str | None = Field(default=None, description=(
        "SQLAlchemy URL (sqlite:///..., postgresql://...); default: DATA_DIR/mlaas.db."))
    host: str = Field(default="127.0.0.1", description=(
        "Address to bind; keep 127.0.0.1 behind a reverse proxy."))
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on.")
    executor: Literal["local", "ray"] = Field(default="local", description=(
        "Where jobs run: 'local' (processes on this machine, one node) or 'ray' (the "
        "nodes of the Ray cluster at ray_address)."))
    ray_address: str | None = Field(default=None, description=(
        "The Ray head's GCS address host:port, for executor 'ray'."))
    cpus: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, description=(
        "CPU slots of the local executor: jobs running at once, one slot each."))
    gpu_devices: list[str] = Field(default_factory=list, description=(
        "GPU device ids handed to jobs through CUDA_VISIBLE_DEVICES."))
    gpu_flavor: str = Field(default="gpu", pattern=_NAME_RE, description=(
        "The flavor of the local executor's gpu_devices (e.g. nvidia-t4)."))
    flavors: list[FlavorConfig] = Field(default_factory=list, description=(
        "Device flavors of the pool besides 'cpu' and gpu_flavor (for Ray nodes)."))
    queues: list[QueueConfig] = Field(default_factory=list, description=(
        "The queues; none: one queue 'default' for everybody with no quota limits. "
        "Replaced at runtime by PUT /api/queues (kept in DATA_DIR/queues.json)."))
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description=(
        "The scheduling policy."))
    jobs: JobDefaults = Field(default_factory=JobDefaults, description="Default job limits.")
    grace_s: float = Field(default=10.0, ge=0, description=(
        "Cancel: seconds between SIGTERM and SIGKILL."))
    poll_interval: float = Field(default=0.5, gt=0, description=(
        "Seconds between the job manager's looks at running jobs and the queue."))
    workspace_quota_bytes: int = Field(default=1024**3, ge=0, description=(
        "Bytes of workspace files per user (413 above)."))
    max_body_bytes: int = Field(default=64 * 1024**2, ge=1, description=(
        "Largest request body accepted (413 above)."))
    auth: AuthConfig = Field(default_factory=AuthConfig, description=(
        "Authentication; the defaults mean single-user mode."))
    metrics_from: list[str] = Field(default_factory=lambda: ["127.0.0.1/32"], description=(
        "With logins: networks (CIDR) whose peers may read /metrics without logging in "
        "(a local Prometheus); admins always may. Single-user mode: open to all."))

    @field_validator("metrics_from", mode="after")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr.strip(), strict=True)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a network in CIDR notation: {exc}") from None
        return [cidr.strip() for cidr in value]

    @field_validator("gpu_devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        """Accept ``"0,1"`` (as the flag gives it) and integers as well as a list of strings."""
        if isinstance(value, str):
            return [d.strip() for d in value.split(",") if d.strip()]
        if isinstance(value, (list, tuple)):
            return [str(d) for d in value]
        return value

    @field_validator("gpu_devices", mode="after")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({d for d in value if value.count(d) > 1})
        if repeated:
            raise ValueError(f"device(s) {', '.join(repeated)} listed more than once")
        return value

    @field_validator("flavors", mode="before")
    @classmethod
    def _flavor_names(cls, value: Any) -> Any:
        """Accept bare names (``[nvidia-t4]``) as well as ``{name, parent}`` mappings."""
        if isinstance(value, (list, tuple)):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> PlatformConfig:
        problems = check_queues(self.queues, self.known_flavors)
        names = [f.name for f in self.flavors]
        for i, f in enumerate(self.flavors):
            if names.count(f.name) > 1 or f.name == CPU_FLAVOR:
                problems.append((f"flavors.{i}.name", f"flavor {f.name!r} is defined twice "
                                 "(cpu is always there)"))
        if self.executor == "ray" and not self.ray_address:
            problems.append(("executor", "executor 'ray' needs ray_address (host:port of "
                             "the Ray head, --ray-address)"))
        if problems:
            raise _Problems(problems)
        return self

    @property
    def known_flavors(self) -> set[str]:
        """cpu, the local GPUs' flavor and the configured flavors."""
        return {CPU_FLAVOR, self.gpu_flavor, *(f.name for f in self.flavors)}

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def database_url(self) -> str:
        """``db_url``, or the SQLite file in the data directory."""
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'mlaas.db').resolve()}"


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in exc.errors():
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, _Problems):
            out.extend(inner.problems)
            continue
        path = ".".join(str(p) for p in e["loc"]) or "(top)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        out.append((path, msg))
    return out


def read_document(path: Path, what: str) -> Any:
    """A YAML, JSON or TOML file (by suffix) of the server's (``what``: config, queue);
    errors are :class:`ConfigError` naming the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {str(path)!r}: {exc.strerror}",
                          file_path=str(path)) from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} file {str(path)!r} does not parse: {exc}",
                          file_path=str(path)) from None


def _read_file(path: Path) -> dict[str, Any]:
    data = read_document(path, "config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top, "
                          f"not {type(data).__name__}", file_path=str(path))
    return data


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> PlatformConfig:
    """Build the server's configuration: the file's settings, then ``overrides`` on top.

    Args:
        path (str, PathLike or None): a YAML (``.yaml``/``.yml``), TOML (``.toml``) or
            JSON (``.json``) file with the fields of :class:`PlatformConfig`.
        overrides: field values from command-line flags; ``None`` values are ignored
            (a flag that was not given). ``auth`` is a mapping merged into the
            file's ``auth`` section field by field (a list given on the command
            line replaces the file's list).

    Raises :class:`mlaas.errors.ConfigError` naming every bad field (and the file).
    """
    data: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    auth = overrides.pop("auth", None) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    auth = {k: v for k, v in auth.items() if v is not None}
    if auth:
        section = data.get("auth")
        if section is None or isinstance(section, dict):
            data["auth"] = {**(section or {}), **auth}  # else: reported as invalid below
    try:
        return PlatformConfig.model_validate(data)
    except ValidationError as exc:
        where = f" in {str(path)!r}" if path is not None else ""
        problems = _problems(exc)
        raise ConfigError(f"invalid server configuration{where}", problems,
                          file_path=str(path) if path is not None else None) from None
