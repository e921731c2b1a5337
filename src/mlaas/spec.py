"""The pipeline spec: the one place a pipeline's shape is defined.

Layer: spec. The CLI, the HTTP API and the trainer all call
:func:`mlaas.spec.load`; pydantic does the validation and every problem is
reported as one :class:`mlaas.errors.SpecError` listing ``dotted.path: message``.
Expressions are parsed (never evaluated) here, so a typo in a cut fails at
load time, before any file is opened. Whether a name is a real branch is
checked later, against the tree (``mlaas.data.layout``).

Sections: ``data``, ``task``, ``model``, ``train`` and ``resources`` (what a
platform job asks for; ``mlaas run`` ignores it). Unknown keys are errors, so typos do not pass silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mlaas import expr
from mlaas.errors import ExpressionError, SpecError, close_names

__all__ = [
    "Pipeline",
    "DataSpec",
    "Source",
    "JaggedFeature",
    "SplitSpec",
    "NormalizeSpec",
    "NanSpec",
    "CacheSpec",
    "RetrySpec",
    "ModelSpec",
    "TrainSpec",
    "EarlyStopping",
    "ResourcesSpec",
    "load",
    "canonical_data",
    "collection_of",
    "parse_step_size",
    "DEFAULT_IDENTIFIERS",
]

DEFAULT_IDENTIFIERS = ["run", "event", "luminosityBlock"]
NormalizeKind = Literal["standard", "minmax", "none"]
_STEP_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?B|B)\s*$")
_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "kiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def collection_of(name: str) -> str:
    """The collection a jagged branch belongs to: NanoAOD's prefix before the first ``_``.

    Branches of one collection (``Jet_pt``, ``Jet_eta``) share their
    multiplicity, so sorting, truncation and the padding mask are decided once
    per collection and applied to all of its branches alike.
    """
    return name.split("_", 1)[0] if "_" in name else name


def parse_step_size(value: str | int) -> str | int:
    """Check a chunk size: an entry count (int) or a memory size such as ``"100 MB"``."""
    if isinstance(value, bool):
        raise ValueError("step_size must be a number of entries or a size like '100 MB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("step_size must be positive")
        return value
    m = _STEP_RE.match(value)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(
            f"step_size {value!r} is not a size; write e.g. '100 MB', '512 MiB' or an entry count"
        )
    if float(m.group(1)) * _UNITS[m.group(2)] < 1024:
        raise ValueError(f"step_size {value!r} is too small (at least 1 kB)")
    return f"{m.group(1)} {m.group(2)}"


def step_size_bytes(value: str | int) -> int | None:
    """The memory size in bytes, or None when the step is an entry count."""
    if isinstance(value, int):
        return None
    m = _STEP_RE.match(value)
    assert m is not None
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class Source(_Model):
    """One group of files sharing a label (e.g. all signal samples)."""

    files: list[str] = Field(
        min_length=1,
        description="Paths, globs, root://host:port//path or https:// URLs, or logical "
        "names (/store/...) resolved through data.redirector.",
    )
    # finite: a NaN or infinite fixed label passed pass 1 and failed only at the first
    # batch, naming data.label instead of this field
    label: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        default=None, description="Label of every event of these files (unless data.label)."
    )
    name: str | None = Field(default=None, description="Name shown in reports.")

    @field_validator("files")
    @classmethod
    def _no_empty(cls, files: list[str]) -> list[str]:
        for f in files:
            if not f.strip():
                raise ValueError("file names must not be empty")
        return files


class JaggedFeature(_Model):
    """A variable-length collection branch, padded or truncated to a fixed length."""

    branch: str = Field(description="Jagged branch or derived name, e.g. Jet_pt.")
    max_len: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Slots kept per event; default: the 95th percentile of the "
        "collection's multiplicity seen in pass 1.",
    )
    pad: float = Field(default=0.0, description="Raw value written into empty slots.")
    sort_by: str | None = Field(
        default=None,
        description="Branch of the same collection to sort by, descending, before "
        "truncation; applies to the whole collection.",
    )
    collection: str | None = Field(
        default=None,
        description="The collection it is padded, sorted and masked with. Default: a "
        "derived name or expression takes that of the jagged branches it is computed "
        "from (log_Jet_pt: log(Jet_pt) is Jet), a branch its prefix before the first _.",
    )

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str | None) -> str | None:
        if value is not None and not expr.is_identifier(value):
            raise ValueError(f"collection {value!r} must be a name (letters, digits, _)")
        return value


Feature = Union[str, JaggedFeature]


class NormalizeSpec(_Model):
    """How features are scaled; constants come from pass 1 over the whole selection."""

    default: NormalizeKind = Field(default="standard", description="standard, minmax or none.")
    per_feature: dict[str, NormalizeKind] = Field(
        default_factory=dict, description="Feature (or jagged branch) name -> method."
    )


class SplitSpec(_Model):
    """Deterministic train/validation/test split by a hash of (file name, entry, seed)."""

    validation: float = Field(default=0.2, ge=0.0, lt=1.0)
    test: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = Field(default=42)

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave events for training (sum < 1)")
        return self


class NanSpec(_Model):
    """What to do with NaN or infinite feature values: fail (default) or replace."""

    policy: Literal["error", "replace"] = Field(default="error")
    value: float = Field(default=0.0, description="Replacement under policy: replace.")


class CacheSpec(_Model):
    """Keep preprocessed float32 arrays after the first epoch."""

    kind: Literal["none", "memory", "disk"] = "none"
    path: str | None = Field(default=None, description="Directory for kind: disk.")
    max_bytes: int | None = Field(
        default=None, ge=1, description="Refuse a cache larger than this (default: what fits); "
        "bytes, or a size like '20 GB' as for step_size."
    )

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().isdigit():
            m = _STEP_RE.match(value)
            if not m or m.group(2) not in _UNITS:
                raise ValueError(f"max_bytes {value!r} is not a size; write e.g. '20 GB', "
                                 "'512 MiB' or a number of bytes")
            return int(float(m.group(1)) * _UNITS[m.group(2)])
        return value

    @model_validator(mode="after")
    def _path(self) -> CacheSpec:
        if self.kind == "disk" and not self.path:
            raise ValueError("a disk cache needs a directory: cache: {disk: DIR}")
        return self


class RetrySpec(_Model):
    """Bounded retries with exponential backoff for transient read failures."""

    attempts: int = Field(default=3, ge=1, le=20)
    backoff: float = Field(default=0.5, ge=0.0, le=60.0, description="First wait, seconds.")
    timeout: float = Field(default=30.0, gt=0.0, description="Per-request timeout, seconds.")


class DataSpec(_Model):
    """Where the events come from and how they become ML-ready arrays."""

    tree: str | None = Field(default=None, description="TTree name; default: the only tree.")
    redirector: str | None = Field(
        default=None, description="root://host:port prefix for logical names like /store/..."
    )
    sources: list[Source] = Field(min_length=1)
    label: str | None = Field(
        default=None, description="Expression giving the label (instead of per-source labels)."
    )
    features: list[Feature] | Literal["all"] = Field(
        description="Branch names, expressions, {branch, max_len, pad, sort_by} for jagged "
        "branches, or 'all'."
    )
    exclude: list[str] = Field(default_factory=list, description="Names left out of 'all'.")
    identifiers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IDENTIFIERS),
        description="Event identifiers, never features under 'all' (in any case: Run, run).",
    )
    derived: dict[str, str] = Field(
        default_factory=dict, description="New names defined by expressions, in order."
    )
    cut: str | None = Field(default=None, description="Boolean expression applied first.")
    weight: str | None = Field(default=None, description="Event weight branch or expression.")
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec)
    split: SplitSpec = Field(default_factory=SplitSpec)
    step_size: str | int = Field(
        default="100 MB",
        description="How much is read at a time: a size is the memory of the arrays in "
                    "flight (chunks of a quarter of it), an entry count the chunk length.")
    balance: Literal["proportional", "equal"] = Field(default="proportional")
    cache: CacheSpec = Field(default_factory=CacheSpec)
    nan: NanSpec = Field(default_factory=NanSpec)
    max_events: int | None = Field(
        default=None, ge=1, description="Read at most this many entries per source."
    )
    retries: RetrySpec = Field(default_factory=RetrySpec)

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_short(cls, value: Any) -> Any:
        return {"default": value} if isinstance(value, str) else value

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_short(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if isinstance(value, dict) and "disk" in value:
            rest = {k: v for k, v in value.items() if k != "disk"}
            return {"kind": "disk", "path": value["disk"], **rest}
        return value

    @field_validator("step_size")
    @classmethod
    def _step(cls, value: str | int) -> str | int:
        return parse_step_size(value)

    @field_validator("redirector")
    @classmethod
    def _redirector(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("root://"):
            raise ValueError(f"redirector {value!r} must start with root://")
        return value.rstrip("/") if value else value

    @field_validator("features")
    @classmethod
    def _features(cls, value: list[Feature] | str) -> list[Feature] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError("at least one feature is needed (or 'all')")
            names = [f if isinstance(f, str) else f.branch for f in value]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"features listed twice: {', '.join(dup)}")
        return value

    @model_validator(mode="after")
    def _labels(self) -> DataSpec:
        labelled = [s.label is not None for s in self.sources]
        if self.label is not None and any(labelled):
            given = [f"data.sources[{i}].label" for i, has in enumerate(labelled) if has]
            raise ValueError(
                f"give either data.label or a label per source, not both (data.label is "
                f"{self.label!r} and {', '.join(given)} {'is' if len(given) == 1 else 'are'} set)"
            )
        if self.label is None and not all(labelled):
            missing = [f"data.sources[{i}]" for i, has in enumerate(labelled) if not has]
            raise ValueError(
                f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no label; "
                "give each source a label or an expression in data.label"
            )
        return self

    @model_validator(mode="after")
    def _collections(self) -> DataSpec:
        """Jagged features of one collection must agree on length and sort key.

        Checked here for branches and explicit collections; a derived name
        takes its inputs' collection, known only with the tree, and the data
        layer checks those (``mlaas.data.layout``).
        """
        if not isinstance(self.features, list):
            return self
        seen: dict[str, JaggedFeature] = {}
        for f in self.features:
            if not isinstance(f, JaggedFeature):
                continue
            if f.collection is None and (f.branch in self.derived
                                         or not expr.is_identifier(f.branch)):
                continue
            coll = f.collection or collection_of(f.branch)
            first = seen.setdefault(coll, f)
            for attr in ("max_len", "sort_by"):
                a, b = getattr(first, attr), getattr(f, attr)
                if a is not None and b is not None and a != b:
                    raise ValueError(
                        f"{attr} differs within collection {coll!r}: {first.branch} has {a!r}, "
                        f"{f.branch} has {b!r}; one collection is padded and sorted as one"
                    )
        return self


Activation = Literal["relu", "gelu", "tanh", "silu", "elu"]


class ModelSpec(_Model):
    """The network: a builtin (``mlp``, ``deepsets``) or a user file with ``build()``."""

    builtin: Literal["mlp", "deepsets"] | None = Field(
        default=None, description="mlp or deepsets; default mlp unless file is given."
    )
    file: str | None = Field(
        default=None,
        description="Python file defining build(n_features, spec) -> torch.nn.Module.",
    )
    hidden: list[int] = Field(default_factory=lambda: [128, 64],
                              description="mlp: hidden layer widths.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    activation: Activation = Field(default="relu", description="Activation function.")
    batchnorm: bool = Field(default=False, description="mlp: batch normalisation after each layer.")
    phi: list[int] = Field(default_factory=lambda: [64, 64],
                           description="deepsets: per-object network widths.")
    rho: list[int] = Field(default_factory=lambda: [128, 64],
                           description="deepsets: network on pooled + flat features.")
    pool: Literal["sum", "mean", "max"] = Field(default="sum", description="deepsets: pooling.")

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if self.builtin is not None and self.file is not None:
            raise ValueError("give either model.builtin or model.file, not both")
        if self.builtin is None and self.file is None:
            self.builtin = "mlp"
        return self


class EarlyStopping(_Model):
    """Stop when the validation loss has not improved for ``patience`` epochs."""

    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest improvement that counts.")


class TrainSpec(_Model):
    """How the network is trained."""

    epochs: int = Field(default=10, ge=1, le=100_000)
    batch_size: int = Field(default=1024, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0, description="Learning rate.")
    lr_schedule: Literal["none", "cosine", "plateau"] = "none"
    weight_decay: float = Field(default=0.0, ge=0.0)
    early_stopping: EarlyStopping | None = Field(default=None)
    class_weights: Literal["none", "balanced"] = Field(
        default="none", description="balanced: weight classes inversely to their counts."
    )
    seed: int = Field(default=0, description="Seeds weights, shuffling and dropout.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
    num_workers: int = Field(default=0, ge=0, le=64, description="DataLoader worker processes.")
    checkpoint_every: int = Field(default=1, ge=1, description="Epochs between checkpoints.")
    max_time: float | None = Field(
        default=None, gt=0.0, description="Wall-clock limit in seconds; then checkpoint and stop."
    )


class ResourcesSpec(_Model):
    """What a job asks of the platform (``mlaas submit``); ``mlaas run`` ignores it.

    Read by the platform's job manager and scheduler (docs/scheduler.md): the
    queue it waits in, the CPU slots, memory and devices per flavor it needs
    on one node, its priority and a wall-time limit per attempt.
    """

    queue: str | None = Field(default=None, min_length=1, description=(
        "The queue (one of your groups'); default: your group's first queue."))
    cpus: int | None = Field(default=None, ge=1, description="CPU slots (default 1).")
    memory: float | None = Field(default=None, gt=0.0, description=(
        "GiB of memory the job needs on its node (placement only)."))
    gpus: dict[str, Annotated[int, Field(ge=0)]] | Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Devices per flavor ({nvidia-a100: 1}), or a count of "
        "the server's default GPU flavor.")
    priority: int | str | None = Field(default=None, description=(
        "An integer, or a priority class name of the queue; higher goes first."))
    max_time: float | None = Field(default=None, gt=0.0, description=(
        "Wall-clock limit of one attempt in seconds; then SIGTERM, SIGKILL after a grace."))


class Pipeline(_Model):
    """One pipeline: data, task, model, training and the resources a platform job asks for."""

    version: Literal[1] = 1
    name: str | None = Field(default=None, description="A name for reports and the registry.")
    task: Literal["binary", "multiclass", "regression"] = Field(
        default="binary", description="binary (default), multiclass (integer labels 0..K-1), "
        "or regression (the label is the target)."
    )
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec | None = Field(default=None, description=(
        "What a platform job asks for (queue, cpus, memory, gpus, priority, max_time)."))

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """Directory that relative file names in the spec are relative to."""
        return self._base_dir

    def expressions(self) -> dict[str, str]:
        """Every expression in the spec, keyed by its field path."""
        d = self.data
        out: dict[str, str] = {f"data.derived.{k}": v for k, v in d.derived.items()}
        for key in ("cut", "weight", "label"):
            if getattr(d, key) is not None:
                out[f"data.{key}"] = getattr(d, key)
        if isinstance(d.features, list):
            for i, f in enumerate(d.features):
                if isinstance(f, str):
                    out[f"data.features[{i}]"] = f
        return out

    def digest(self) -> str:
        """A stable hash of the spec's content, for provenance (``resources`` left out:
        where a job ran does not change what it trains)."""
        dumped = self.model_dump(mode="json", exclude={"resources"})
        dumped["data"] = canonical_data(dumped["data"])
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()

    def data_digest(self) -> str:
        """A stable hash of what in ``data`` decides the preprocessed arrays and pass 1.

        The disk cache's key and the reuse of a saved stats.json (``mlaas run
        --resume``) both rest on it, so a field that changes neither must be
        left out: with it, a new value wrote a second full copy of the cache
        and redid pass 1 for the same arrays. Left out:

        - ``retries``: how often a read is tried again, not what it returns;
        - ``cache``: where and whether arrays are kept (``kind``, ``path``
          however written, ``max_bytes``), not what they hold;
        - ``balance``: applied per epoch to arrays read from the cache (it
          subsamples them, the cached chunks stay whole); pass 1 counts
          events without it.

        Every other field stays in: ``tree``, ``redirector`` (the URLs),
        ``sources`` (files, labels; names are in pass 1's results),
        ``label``, ``features``, ``exclude``, ``identifiers`` (both pick
        ``features: all``), ``derived``, ``cut``, ``weight``, ``normalize``,
        ``split``, ``nan`` (a replaced value is in the arrays; ``error``
        must still fail), ``max_events``, and ``step_size``: it sets the
        chunks' entry ranges, and pass 1 sums its moments chunk by chunk,
        so their last bits depend on it.
        """
        kept = self.data.model_dump(mode="json", exclude={"retries", "cache", "balance"})
        blob = json.dumps(canonical_data(kept), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def legacy_data_digest(self) -> str:
        """:meth:`data_digest` as mlaas computed it before ``derived`` kept its order.

        A stats.json of such a run is still this spec's pass 1 (it ignored the
        order, as the data layer's checks then did): ``mlaas run --resume``
        accepts it rather than read a large dataset again after an upgrade.
        """
        kept = self.data.model_dump(mode="json", exclude={"retries", "cache", "balance"})
        kept = {**canonical_data(kept), "derived": kept.get("derived", {})}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def canonical_data(data: dict[str, Any]) -> dict[str, Any]:
    """A dumped ``data`` section to hash or compare with ``sort_keys``: ``derived`` as pairs.

    Sorting keys would sort the derived names, but their order is meaning:
    an expression sees the names defined before it, and a derived name may
    shadow a branch, so two orders can give other values. A jagged
    feature's ``collection`` left unset is left out, so specs, checkpoints
    and caches from before that field existed compare and hash as they did.
    """
    out = dict(data)
    if isinstance(out.get("features"), list):
        out["features"] = [
            {k: v for k, v in f.items() if not (k == "collection" and v is None)}
            if isinstance(f, dict) else f for f in out["features"]]
    if out.get("derived"):  # an empty mapping stays one: most specs hash as before
        out["derived"] = [[k, v] for k, v in out["derived"].items()]
    return out


def _path_of(loc: tuple[Any, ...]) -> str:
    """pydantic's location tuple as ``data.sources[0].files``, without union tags."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and (
            item in {"str", "int", "float", "JaggedFeature", "list[union[str,JaggedFeature]]"}
            or item.startswith(("function-", "literal[", "list[", "union[", "dict[",
                                "constrained-"))
        ):
            continue
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where pydantic found ``loc[-1]``, to suggest one for a typo."""
    model: type[BaseModel] = Pipeline
    for item in loc[:-1]:
        field = model.model_fields.get(item) if isinstance(item, str) else None
        if field is not None:
            model = _model_in(field.annotation) or model
    return list(model.model_fields)


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as ``(path, message)``, without the noise of union members.

    A feature may be a string or a mapping, so a bad mapping also fails as "not
    a valid string" (and the list as "not 'all'"); such a type error is dropped
    when another error points inside the same value.
    """
    found: list[tuple[str, str, str]] = []
    for e in exc.errors():
        path = _path_of(e["loc"]) or "(top)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"] and isinstance(e["loc"][-1], str):
            key = e["loc"][-1]
            near = close_names(key, _keys_at(e["loc"]), limit=3)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            msg = f"unknown key {key!r}{hint}"
        found.append((path, msg, e["type"]))
    kept = []
    for path, msg, kind in found:
        deeper = any(p.startswith((path + ".", path + "[")) for p, _, _ in found)
        if deeper and (kind.endswith("_type") or kind == "literal_error"):
            continue
        kept.append((path, msg))
    return kept


def _check_expressions(pipeline: Pipeline) -> None:
    problems: list[tuple[str, str]] = []
    for path, source in pipeline.expressions().items():
        try:
            expr.parse(source, field_path=path)
        except ExpressionError as exc:
            problems.append((path, exc.message))
    if problems:
        raise ExpressionError("invalid expressions in the pipeline spec", problems)


def read_spec_file(path: Path) -> dict[str, Any]:
    """A spec file (YAML, or JSON by its suffix) as a mapping, not yet validated; the
    client reads local specs with it too, so both name a bad file the same way."""
    where = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec file {where!r}: {exc.strerror}",
                        file_path=where) from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"spec file {where!r} is not valid {path.suffix[1:] or 'YAML'}: {exc}",
                        file_path=where) from exc
    if not isinstance(data, dict):
        raise SpecError(f"spec file {where!r} must hold a mapping at the top, "
                        f"not {type(data).__name__}", file_path=where)
    return data


def load(source: str | os.PathLike[str] | dict[str, Any] | Pipeline,
         *, base_dir: str | os.PathLike[str] | None = None) -> Pipeline:
    """Load and validate a pipeline spec.

    Args:
        source (str, PathLike, dict or Pipeline): a YAML or JSON file, or the
            already-parsed mapping.
        base_dir (str or PathLike): directory relative file names are resolved
            against; default: the spec file's directory (or the current one).

    Raises :class:`mlaas.errors.SpecError` listing every problem by field path.
    """
    if isinstance(source, Pipeline):
        return source
    if isinstance(source, dict):
        raw, origin = source, Path(base_dir or Path.cwd())
    else:
        path = Path(source)
        raw, origin = read_spec_file(path), Path(base_dir or path.resolve().parent)
    try:
        pipeline = Pipeline.model_validate(raw)
    except ValidationError as exc:
        raise SpecError("invalid pipeline spec", _problems(exc)) from None
    _check_expressions(pipeline)
    pipeline._base_dir = origin.resolve()
    return pipeline
