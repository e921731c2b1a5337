"""Networks for training: the input layout, builtin models, user model files, devices.

Layer: train. Every model here maps ``(x, mask)`` to raw outputs ``[B, n_outputs]``
(logits for classification; the export adds the sigmoid or softmax), where ``x``
and ``mask`` are the loader's batches (``mlaas.data.RootDataset``): ``x`` float32
``[B, n_features]`` already normalised and ``mask`` float32 ``[B, n_slots]``.

The models only use ops that ``torch.onnx.export`` (opset 17) handles: index_select,
matmul, elementwise ops, sum/amax reductions, where, cat.

User model files
----------------
A user file defines ``build(n_features, spec)`` returning a ``torch.nn.Module``.
Its ``forward`` may take ``x`` only (the natural choice: a flat vector of
``n_features`` per event, with padded jagged slots already holding their pad
value), or ``(x, mask)`` to know which jagged slots are real. :class:`UserModel`
wraps it so the rest of mlaas always calls ``model(x, mask)``; an output of
shape ``[B]`` becomes ``[B, 1]``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlaas.errors import SpecError

__all__ = [
    "build_model",
    "CollectionSlots",
    "InputLayout",
    "MLP",
    "DeepSets",
    "UserModel",
    "BUILTIN_MODELS",
    "ACTIVATIONS",
    "build_builtin",
    "load_user_model",
    "select_device",
    "user_frame",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}

POOLS = ("sum", "mean", "max")
_NEG = -1.0e9  # padded slots under max pooling; far below any activation


# -- input layout ------------------------------------------------------------------


@dataclass(frozen=True)
class CollectionSlots:
    """Where one collection's objects live in ``x`` and ``mask``.

    ``columns[b][i]`` is the ``x`` column of branch ``b`` at slot ``i``;
    ``mask_columns[i]`` the ``mask`` column of slot ``i``.
    """

    name: str
    max_len: int
    columns: list[list[int]]
    mask_columns: list[int]

    @property
    def n_branches(self) -> int:
        return len(self.columns)


@dataclass(frozen=True)
class InputLayout:
    """The column structure of ``x`` and ``mask``, without the data-layer objects.

    JSON-able through :meth:`to_dict` (it goes into the bundle's spec.json),
    so a served model is rebuilt without reading any ROOT file.
    """

    n_features: int
    flat: list[int] = field(default_factory=list)
    collections: list[CollectionSlots] = field(default_factory=list)
    n_mask: int = 0

    @classmethod
    def from_layout(cls, layout: Any) -> InputLayout:
        """From a ``mlaas.data.layout.Layout`` whose collections' ``max_len`` are known."""
        lengths: dict[str, int] = {}
        for c in layout.collections.values():
            if c.max_len is None:
                raise ValueError(f"max_len of collection {c.name!r} is not known yet "
                                 "(run pass 1, e.g. build a RootDataset, first)")
            lengths[c.name] = int(c.max_len)
        flat: list[int] = []
        branch_cols: dict[str, list[list[int]]] = {name: [] for name in lengths}
        col = 0
        for f in layout.features:
            if f.jagged:
                n = lengths[f.collection]
                branch_cols[f.collection].append(list(range(col, col + n)))
                col += n
            else:
                flat.append(col)
                col += 1
        slots: list[CollectionSlots] = []
        m = 0
        for name, n in lengths.items():
            slots.append(CollectionSlots(name, n, branch_cols[name], list(range(m, m + n))))
            m += n
        return cls(n_features=col, flat=flat, collections=slots, n_mask=m)

    @classmethod
    def flat_only(cls, n_features: int) -> InputLayout:
        """A layout of ``n_features`` flat columns and no collections."""
        return cls(n_features=n_features, flat=list(range(n_features)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "flat": list(self.flat),
            "collections": [
                {"name": c.name, "max_len": c.max_len, "columns": [list(r) for r in c.columns],
                 "mask_columns": list(c.mask_columns)}
                for c in self.collections
            ],
            "n_mask": self.n_mask,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputLayout:
        colls = [
            CollectionSlots(name=str(c["name"]), max_len=int(c["max_len"]),
                            columns=[[int(i) for i in row] for row in c["columns"]],
                            mask_columns=[int(i) for i in c["mask_columns"]])
            for c in d.get("collections", [])
        ]
        return cls(n_features=int(d["n_features"]), flat=[int(i) for i in d.get("flat", [])],
                   collections=colls, n_mask=int(d.get("n_mask", 0)))


# -- builtin models ----------------------------------------------------------------------


def _activation(name: str) -> Callable[[], nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of "
                         f"{', '.join(ACTIVATIONS)}") from None


def _stack(n_in: int, hidden: Sequence[int], n_out: int | None, activation: str,
           dropout: float, batchnorm: bool = False) -> tuple[nn.Sequential, int]:
    """Linear layers with activations; a last linear to ``n_out`` unless it is None."""
    act = _activation(activation)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {dropout!r}")
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        if int(h) < 1:
            raise ValueError(f"layer widths must be positive, not {h!r}")
        layers.append(nn.Linear(width, int(h)))
        if batchnorm:
            layers.append(nn.BatchNorm1d(int(h)))
        layers.append(act())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    if n_out is not None:
        layers.append(nn.Linear(width, n_out))
        width = n_out
    return nn.Sequential(*layers), width


class MLP(nn.Module):
    """A fully connected network on every column of ``x``; ``mask`` is ignored."""

    def __init__(self, layout: InputLayout, n_outputs: int, hidden: Sequence[int] = (128, 64),
                 dropout: float = 0.0, activation: str = "relu", batchnorm: bool = False) -> None:
        super().__init__()
        self.net, _ = _stack(layout.n_features, hidden, n_outputs, activation, dropout, batchnorm)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x)


class DeepSets(nn.Module):
    """Permutation-invariant network over each collection, plus the flat features.

    Per collection ``c``: gather its objects to ``[B, max_len, n_branches]``, apply
    the per-object network ``phi_c`` (shared by the slots), zero the padded
    slots, pool over slots (``sum``; ``mean`` over real objects; ``max`` over
    real objects, 0 for an event with none). The pooled vectors and the flat
    features go through ``rho`` to ``n_outputs``. Values in padded slots never
    reach the output.
    """

    def __init__(self, layout: InputLayout, n_outputs: int, phi: Sequence[int] = (64, 64),
                 rho: Sequence[int] = (128, 64), pool: str = "sum", dropout: float = 0.0,
                 activation: str = "relu") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
        if not phi:
            raise ValueError("phi needs at least one layer width")
        self.pool = pool
        self.max_lens = [c.max_len for c in layout.collections]
        self.n_branches = [c.n_branches for c in layout.collections]
        self.has_flat = bool(layout.flat)  # a Python bool: no tensor test in forward (tracing)
        self.register_buffer("flat_idx", torch.tensor(layout.flat, dtype=torch.long),
                             persistent=False)
        self.phis = nn.ModuleList()
        width = len(layout.flat)
        for i, c in enumerate(layout.collections):
            # slot-major order, so a reshape gives [B, max_len, n_branches]
            cols = [c.columns[b][s] for s in range(c.max_len) for b in range(c.n_branches)]
            self.register_buffer(f"cols_{i}", torch.tensor(cols, dtype=torch.long),
                                 persistent=False)
            self.register_buffer(f"mask_{i}", torch.tensor(c.mask_columns, dtype=torch.long),
                                 persistent=False)
            net, out = _stack(c.n_branches, phi, None, activation, dropout)
            self.phis.append(net)
            width += out
        if width == 0:
            raise ValueError("DeepSets needs at least one flat feature or one collection")
        self.rho, _ = _stack(width, rho, n_outputs, activation, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        parts: list[Tensor] = []
        if self.has_flat:
            parts.append(torch.index_select(x, 1, self.flat_idx))
        for i, phi in enumerate(self.phis):
            cols: Tensor = getattr(self, f"cols_{i}")
            mcols: Tensor = getattr(self, f"mask_{i}")
            objs = torch.index_select(x, 1, cols).reshape(-1, self.max_lens[i], self.n_branches[i])
            m = torch.index_select(mask, 1, mcols).unsqueeze(-1)  # [B, L, 1]
            # padded inputs are zeroed too, so NaN/inf there cannot leak through 0 * h
            h = phi(torch.where(m > 0, objs, torch.zeros_like(objs)))
            h = torch.where(m > 0, h, torch.zeros_like(h))
            if self.pool == "sum":
                pooled = h.sum(dim=1)
            elif self.pool == "mean":
                pooled = h.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            else:
                filled = torch.where(m > 0, h, torch.full_like(h, _NEG))
                pooled = torch.where(m.sum(dim=1) > 0, filled.amax(dim=1),
                                     torch.zeros_like(filled[:, 0]))
            parts.append(pooled)
        return self.rho(torch.cat(parts, dim=1))


BUILTIN_MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "deepsets": DeepSets}


def _options(cls: type[nn.Module]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [n for n in params if n not in ("self", "layout", "n_outputs")]


def build_builtin(name: str, layout: InputLayout, n_outputs: int, **options: Any) -> nn.Module:
    """A builtin model by name (``mlp`` or ``deepsets``, case-insensitive) with its options."""
    cls = BUILTIN_MODELS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown builtin model {name!r}; use one of "
                         f"{', '.join(BUILTIN_MODELS)}")
    valid = _options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for model "
                         f"{name!r}; valid options: {', '.join(valid)}")
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be positive, not {n_outputs}")
    return cls(layout, n_outputs, **options)


# -- user model files ----------------------------------------------------------------------


class UserModel(nn.Module):
    """Wraps a user's module so it is called as ``model(x, mask)`` like the builtins.

    ``takes_mask`` is found from the wrapped ``forward``'s signature: one
    positional parameter means ``forward(x)``; two or more (or ``*args``)
    mean ``forward(x, mask)``. An output ``[B]`` is returned as ``[B, 1]``.
    """

    def __init__(self, inner: nn.Module, takes_mask: bool | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.takes_mask = forward_takes_mask(inner) if takes_mask is None else takes_mask

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = self.inner(x, mask) if self.takes_mask else self.inner(x)
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return out


def forward_takes_mask(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``(x, mask)`` rather than ``(x)``."""
    params = list(inspect.signature(module.forward).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise ValueError("forward takes no positional argument; define forward(self, x) "
                         "or forward(self, x, mask)")
    return len(positional) >= 2


def _user_error(path: Path, what: str, exc: BaseException) -> SpecError:
    """A SpecError naming the file, the exception, and the failing line in the user's file."""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        where = f" (line {exc.lineno}: {(exc.text or '').strip()!r})"
    else:
        where = user_frame(exc, path)
    return SpecError(f"user model {str(path)!r}: {what}: {type(exc).__name__}: {exc}{where}",
                     file_path=str(path))


def user_frame(exc: BaseException, path: Path) -> str:
    """`` (line N of model.py: 'code')`` for the innermost frame of ``exc`` in the user's file.

    Empty when the traceback never enters ``path``. Errors about a user's
    model point at the user's line, not at torch's internals.
    """
    mine = [f for f in traceback.extract_tb(exc.__traceback__) if _same_file(f.filename, path)]
    if not mine:
        return ""
    last = mine[-1]
    return f" (line {last.lineno} of {path.name}: {(last.line or '').strip()!r})"


def _same_file(name: str, path: Path) -> bool:
    try:
        return os.path.samefile(name, path)
    except OSError:
        return False


def load_user_model(path: str | os.PathLike[str], n_features: int, spec: Any) -> UserModel:
    """Import a user's model file and call its ``build(n_features, spec)``.

    The file is imported by path under a unique module name (never executed
    from a string). Any failure (missing file, import error, no ``build``,
    ``build`` raising or returning something other than a ``torch.nn.Module``)
    raises :class:`mlaas.errors.SpecError` naming the file, the original
    exception type and message, and the line of the user's file where it
    happened.

    Returns a :class:`UserModel` (call it as ``model(x, mask)``).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise SpecError(f"user model file {str(path)!r} does not exist", file_path=str(path))
    name = f"mlaas_user_model_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"user model {str(path)!r} cannot be imported as a Python file",
                        file_path=str(path))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling in the user's file need it
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any user error becomes a SpecError
        sys.modules.pop(name, None)
        raise _user_error(path, "import failed", exc) from exc
    build = getattr(module, "build", None)
    if not callable(build):
        raise SpecError(f"user model {str(path)!r} defines no function build(n_features, spec)",
                        file_path=str(path))
    try:
        model = build(n_features, spec)
    except Exception as exc:  # noqa: BLE001
        raise _user_error(path, "build(n_features, spec) failed", exc) from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"user model {str(path)!r}: build(n_features, spec) returned "
                        f"{type(model).__name__}, not a torch.nn.Module", file_path=str(path))
    try:
        return UserModel(model)
    except ValueError as exc:
        raise SpecError(f"user model {str(path)!r}: {exc}", file_path=str(path)) from exc


# -- devices -------------------------------------------------------------------------------


def _visible_count(visible: str | None) -> int | None:
    """Devices listed in a CUDA_VISIBLE_DEVICES value; None when it is unset."""
    if visible is None:
        return None
    items = [v.strip() for v in visible.split(",") if v.strip()]
    count = 0
    for v in items:  # CUDA stops at the first invalid entry, e.g. -1
        if v.startswith("-"):
            break
        count += 1
    return count


def select_device(requested: str = "auto", cuda_available: bool | None = None,
                  visible: str | None = None) -> str:
    """The torch device string to train on: ``cpu``, ``cuda`` or ``cuda:N``.

    Args:
        requested: ``auto`` (cuda when available, else cpu), ``cpu``, ``cuda``
            or ``cuda:N`` (case-insensitive).
        cuda_available: whether CUDA works; default ``torch.cuda.is_available()``.
        visible: the ``CUDA_VISIBLE_DEVICES`` value; default read from the
            environment. When set, it bounds ``N`` and an empty list (or ``-1``)
            means no GPU.

    Raises ValueError for an unknown name, or a GPU asked for but not there.
    """
    req = requested.strip().lower()
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = _visible_count(visible)
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
        if cuda_available and count is None:
            count = torch.cuda.device_count()
    available = bool(cuda_available) and count != 0
    if req == "cpu":
        return "cpu"
    if req == "auto":
        return "cuda" if available else "cpu"
    index: int | None = None
    if req.startswith("cuda:"):
        tail = req[5:]
        if not tail.isdigit():
            raise ValueError(f"bad device {requested!r}; use auto, cpu, cuda or cuda:N")
        index = int(tail)
    elif req != "cuda":
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if not available:
        why = ("CUDA_VISIBLE_DEVICES hides every GPU" if cuda_available and count == 0
               else "torch finds no usable CUDA GPU (no GPU, no driver, or a CPU-only torch)")
        raise ValueError(f"device {requested!r} requested but {why}; use device: auto or cpu")
    if index is None:
        return "cuda"
    if count is not None and index >= count:
        raise ValueError(f"device {requested!r} requested but only {count} GPU(s) are visible "
                         f"(cuda:0 to cuda:{count - 1})")
    return f"cuda:{index}"


# -- from a pipeline spec ----------------------------------------------------------------------


def build_model(pipeline: Any, layout: InputLayout, n_outputs: int) -> nn.Module:
    """The network of ``pipeline.model`` for inputs ``layout`` and ``n_outputs`` outputs.

    A builtin gets its options from the spec (``mlp``: hidden, dropout,
    activation, batchnorm; ``deepsets``: phi, rho, pool, dropout, activation).
    A user file (``model.file``, relative to ``pipeline.base_dir``) is called as
    ``build(n_features, spec)`` where ``spec`` is the whole pipeline spec as a
    plain dict (``pipeline.model_dump(mode="json")``) plus the key
    ``"n_outputs"``, so the file knows the task and the output width.

    Raises :class:`mlaas.errors.SpecError` (field ``model``) for options the
    builtin rejects, or any failure of the user's file.
    """
    m = pipeline.model
    if m.file is not None:
        spec = {**pipeline.model_dump(mode="json"), "n_outputs": int(n_outputs)}
        return load_user_model(Path(pipeline.base_dir) / m.file, layout.n_features, spec)
    name = m.builtin or "mlp"
    if name == "deepsets":
        options: dict[str, Any] = {"phi": list(m.phi), "rho": list(m.rho), "pool": m.pool,
                                   "dropout": m.dropout, "activation": m.activation}
    else:
        options = {"hidden": list(m.hidden), "dropout": m.dropout, "activation": m.activation,
                   "batchnorm": m.batchnorm}
    try:
        return build_builtin(name, layout, n_outputs, **options)
    except ValueError as exc:
        raise SpecError(f"cannot build model {name!r}: {exc}", field_path="model") from exc
