"""Export a trained model as a self-contained bundle (see :mod:`mlaas.bundle` for the format).

Layer: train. :class:`ExportModule` wraps the network so the ONNX graph takes
RAW padded features (what :class:`~mlaas.data.transform.Transform` produces
with shift 0 and scale 1), applies the training normalisation
``(x - shift) * scale`` with float32 constants folded into the graph, runs the
network and ends with a sigmoid (binary), softmax (multiclass) or nothing
(regression). Inputs: ``x`` float32 ``[batch, n_features]`` and, only when the
network reads it, ``mask`` float32 ``[batch, n_slots]``; output ``score``
float32 ``[batch, n_outputs]``; the batch axis is dynamic.

Before the bundle is written in place, ONNX Runtime and torch are run on the
same raw inputs of the whole test split (streamed chunk by chunk in batches
of :data:`PARITY_BATCH`: one more inference pass, cheap next to training)
and must agree within :data:`PARITY_TOLERANCE`; otherwise
:class:`~mlaas.errors.BundleError` says by how much they differ and nothing
is left in OUTDIR/bundle.

Parity measure: ``binary`` and ``multiclass`` outputs are probabilities in
[0, 1] and are held to ``max |onnx - torch| <= 1e-5``, absolute, as the
issue asks. ``regression`` outputs are held to the relative
``max |onnx - torch| / max(1, |torch|) <= 1e-5`` (absolute below 1): a
target of 100 GeV has a float32 spacing of 7.6e-6, so two correct float32
implementations that sum in a different order differ by more than 1e-5 in
absolute terms, and an absolute test would fail good exports for the unit
the target happens to be in. spec.json records the measure used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mlaas.bundle import FORMAT_VERSION, MODEL_FILE, SPEC_FILE, _session
from mlaas.data import chunks as chunking
from mlaas.data import sources
from mlaas.data.layout import Layout, branch_kinds
from mlaas.data.transform import Transform
from mlaas.errors import BundleError, MlaasError
from mlaas.spec import Pipeline
from mlaas.train.models import MLP, DeepSets, UserModel, user_frame

__all__ = ["ExportModule", "export_bundle", "export_onnx", "check_parity", "raw_batches",
           "uses_mask", "parity_measure", "PARITY_TOLERANCE", "OPSET"]

OPSET = 17
PARITY_TOLERANCE = 1e-5
PARITY_BATCH = 8192  # events per ONNX Runtime / torch call of the parity check


class ExportModule(nn.Module):
    """Raw features in, final scores out: normalisation, network, output activation."""

    def __init__(self, model: nn.Module, shift: np.ndarray, scale: np.ndarray, task: str,
                 with_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.with_mask = with_mask
        self.register_buffer("shift", torch.as_tensor(np.asarray(shift, dtype=np.float32)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        z = (x - self.shift) * self.scale
        out = self.model(z, mask if self.with_mask else None)
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        if self.task == "binary":
            return torch.sigmoid(out)
        if self.task == "multiclass":
            return torch.softmax(out, dim=1)
        return out


def uses_mask(model: nn.Module, n_mask: int) -> bool:
    """Whether the network reads ``mask``: decides the ONNX inputs.

    MLPs never do; DeepSets when it has collections; a user model when its
    ``forward`` takes ``(x, mask)``; any other module is assumed to.
    """
    if n_mask == 0 or isinstance(model, MLP):
        return False
    if isinstance(model, DeepSets):
        return len(model.phis) > 0
    if isinstance(model, UserModel):
        return bool(model.takes_mask)
    return True


def export_onnx(module: ExportModule, path: Path, n_features: int, n_mask: int) -> list[str]:
    """Write ``module`` as ONNX (legacy exporter, opset 17); returns the input names."""
    names = ["x", "mask"] if module.with_mask else ["x"]
    args: tuple[Tensor, ...] = (torch.zeros(2, n_features),)
    if module.with_mask:
        args += (torch.ones(2, n_mask),)
    axes = {name: {0: "batch"} for name in (*names, "score")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["score"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    return names


def _model_name(pipeline: Pipeline) -> tuple[str, Path | None]:
    """How an error names the network, and the user's file when there is one."""
    if pipeline.model.file:
        path = (Path(pipeline.base_dir) / pipeline.model.file).resolve()
        return f"user model {path.name!r}", path
    return f"builtin model {pipeline.model.builtin!r}", None


@contextlib.contextmanager
def _model_errors(pipeline: Pipeline, step: str) -> Iterator[None]:
    """Any exception of the network or the exporter during ``step`` as a one-line BundleError.

    A user's model that trains may still fail here (an operation ONNX cannot
    express, a ``forward`` that branches on ``torch.onnx.is_in_onnx_export()``
    or on the batch size); the user needs the model's name, the exception's
    first line and their own line, not torch's exporter traceback.
    """
    try:
        yield
    except MlaasError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything the model or exporter raises
        name, path = _model_name(pipeline)
        lines = str(exc).strip().splitlines()
        where = user_frame(exc, path) if path is not None else ""
        raise BundleError(
            f"cannot export {name} to ONNX: {step} raised {type(exc).__name__}: "
            f"{lines[0] if lines else ''}{where}; the model must run on raw batches of any "
            f"size and use only operations torch.onnx.export supports (opset {OPSET})",
            **({"file_path": str(path)} if path is not None else {})) from exc


def raw_batches(pipeline: Pipeline, dataset: Any,
                split: str | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Raw (unnormalised) ``x`` and ``mask`` of every event of a split, chunk by chunk."""
    layout = dataset.layout
    n = len(layout.column_names())
    raw = Transform(pipeline, layout, np.zeros(n), np.ones(n))
    with sources.OpenTrees() as trees:  # each file opened once, not once per chunk
        for chunk in chunking.interleave(dataset.chunks):
            cols = raw(chunking.read(pipeline, layout, chunk, trees), split)
            if len(cols):
                yield cols.x, cols.mask


def parity_measure(task: str) -> str:
    """How :func:`check_parity` measures a difference for ``task`` (see the module docstring)."""
    return "|onnx - torch| / max(1, |torch|)" if task == "regression" else "|onnx - torch|"


def check_parity(onnx_path: Path, module: ExportModule, batches: Any,
                 tolerance: float = PARITY_TOLERANCE) -> tuple[float, int]:
    """Max difference of ONNX Runtime and torch over ``batches`` of raw (x, mask).

    Absolute for probabilities (``binary``, ``multiclass``), relative to
    ``max(1, |torch output|)`` for ``regression`` (:func:`parity_measure`;
    the module docstring says why). Raises BundleError above ``tolerance``.

    Returns ``(max_diff, events_checked)``.
    """
    session = _session(onnx_path.read_bytes(), None, str(onnx_path))
    inputs = [i.name for i in session.get_inputs()]
    worst, count, where = 0.0, 0, ""
    with torch.no_grad():
        for x_all, mask_all in batches:
            for start in range(0, len(x_all), PARITY_BATCH):
                x = np.ascontiguousarray(x_all[start:start + PARITY_BATCH], dtype=np.float32)
                mask = np.ascontiguousarray(mask_all[start:start + PARITY_BATCH],
                                            dtype=np.float32)
                feeds = {"x": x, "mask": mask}
                (got,) = session.run(["score"], {k: feeds[k] for k in inputs})
                want = module(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
                if got.shape != want.shape:
                    raise BundleError(f"ONNX output has shape {got.shape}, torch {want.shape}")
                diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                if module.task == "regression":
                    diff /= np.maximum(1.0, np.abs(want.astype(np.float64)))
                nan_mismatch = np.isnan(got) != np.isnan(want)
                if nan_mismatch.any():
                    raise BundleError("ONNX Runtime and torch disagree on which outputs are NaN "
                                      f"(event {count + int(np.argwhere(nan_mismatch)[0][0])})")
                d = float(np.nanmax(diff)) if diff.size and not np.isnan(diff).all() else 0.0
                if d > worst:
                    worst = d
                    where = f" (event {count + int(np.nanargmax(diff) // max(1, diff.shape[1]))})"
                count += len(x)
    if worst > tolerance:
        raise BundleError(f"the exported ONNX model does not reproduce torch: max "
                          f"{parity_measure(module.task)} {worst:.3g}{where} over {count} "
                          f"events, above the tolerance {tolerance:g}", file_path=str(onnx_path))
    return worst, count


def _dtype_name(interp: Any) -> str:
    inner = getattr(interp, "content", interp)
    return np.dtype(inner.to_dtype).newbyteorder("=").name


def inference_inputs(layout: Layout) -> tuple[list[str], list[tuple[str, Any]]]:
    """The branches and derived names that scoring needs: the cut's, the features' and the
    sort keys', through derived names; the label and weight are not needed to score."""
    needed: set[str] = set()
    for e in [f.expression for f in layout.features] + ([layout.cut] if layout.cut else []):
        needed |= set(e.names)
    needed |= {c.sort_by for c in layout.collections.values() if c.sort_by}
    kept: list[tuple[str, Any]] = []
    for name, e in reversed(layout.derived):
        if name in needed:
            needed |= set(e.names)
            kept.append((name, e))
    branches = sorted(n for n in needed if n in layout.branches)
    return branches, kept[::-1]


def branch_types(pipeline: Pipeline, dataset: Any) -> dict[str, dict[str, str]]:
    """Kind (flat/jagged) and dtype of each branch scoring reads, from the first file."""
    layout: Layout = dataset.layout
    url = dataset.files[0].ref.url if dataset.files else None
    if url is None:
        raise BundleError("the dataset has no input files to learn branch types from")
    tree = sources.open_tree(url, layout.tree, pipeline.data.retries)
    kinds = branch_kinds(tree)
    out: dict[str, dict[str, str]] = {}
    for name in inference_inputs(layout)[0]:
        out[name] = {"kind": kinds[name], "dtype": _dtype_name(tree[name].interpretation)}
    return out


def label_names(pipeline: Pipeline, dataset: Any, n_outputs: int) -> list[str]:
    """Names of the classes: from sources' names by label when given, else defaults."""
    by_label: dict[int, str] = {}
    for s in pipeline.data.sources:
        if s.label is not None and s.name and float(s.label).is_integer():
            by_label.setdefault(int(s.label), s.name)
    if pipeline.task == "binary":
        return [by_label.get(0, "background"), by_label.get(1, "signal")]
    if pipeline.task == "multiclass":
        return [by_label.get(k, str(k)) for k in range(n_outputs)]
    return [pipeline.data.label or "target"]


def bundle_spec(pipeline: Pipeline, dataset: Any, n_outputs: int, inputs: list[str],
                types: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The content of spec.json."""
    layout: Layout = dataset.layout
    n_features, n_mask = len(dataset.feature_names), len(dataset.mask_names)
    from mlaas.train.models import InputLayout

    shapes = {"x": ["batch", n_features], "mask": ["batch", n_mask]}
    branches, derived = inference_inputs(layout)
    return {
        "format_version": FORMAT_VERSION,
        "name": pipeline.name,
        "task": pipeline.task,
        "n_outputs": n_outputs,
        "label_names": label_names(pipeline, dataset, n_outputs),
        "feature_names": list(dataset.feature_names),
        "mask_names": list(dataset.mask_names),
        "inputs": [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in inputs],
        "outputs": [{"name": "score", "shape": ["batch", n_outputs], "dtype": "float32"}],
        "layout": {
            **layout.to_dict(),
            "branches": branches,
            "derived": [[name, e.source] for name, e in derived],
            "cut": layout.cut.source if layout.cut is not None else None,
            "branch_types": types,
        },
        "input_layout": InputLayout.from_layout(layout).to_dict(),
        "normalization": {"shift": np.asarray(dataset.transform.shift).tolist(),
                          "scale": np.asarray(dataset.transform.scale).tolist(),
                          "applied_in": "model.onnx"},
        "nan": pipeline.data.nan.model_dump(mode="json"),
        "tree": layout.tree,
        "step_size": pipeline.data.step_size,
        "opset": OPSET,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def _tar(directory: Path, target: Path) -> None:
    """``target`` (.tar.gz) with members ``bundle/...``: relative, regular files and dirs only."""
    partial = target.with_name(f".{target.name}.partial")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    try:
        with tarfile.open(partial, "w:gz") as tar:
            for path in sorted([directory, *directory.rglob("*")]):
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    continue
                arc = Path("bundle") / path.relative_to(directory)
                tar.add(path, arcname=arc.as_posix(), recursive=False, filter=clean)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def export_bundle(pipeline: Pipeline, model: nn.Module, dataset: Any, metrics: dict[str, Any],
                  outdir: str | os.PathLike[str], *, provenance: dict[str, Any],
                  plots_dir: str | os.PathLike[str] | None) -> Path:
    """Write OUTDIR/bundle and OUTDIR/bundle.tar.gz; returns the bundle directory.

    Args:
        pipeline (Pipeline): the run's spec.
        model (nn.Module): the trained network, ``model(x_normalised, mask) -> [B, K]`` raw
            outputs (copied; the caller's model is not changed).
        dataset (RootDataset): any split of the run: its layout, normalisation,
            chunk plan (the test split is read from it for the parity check) and files.
        metrics (dict): written as metrics.json.
        provenance (dict): written as provenance.json (see :mod:`mlaas.train.provenance`).
        plots_dir (path): its files are copied to plots/ (skipped when missing).

    Raises :class:`BundleError` when ONNX Runtime and torch differ by more than
    :data:`PARITY_TOLERANCE` on the test split (nothing is left in OUTDIR/bundle),
    and when the model cannot be run or exported (naming the model, and the
    line of a user's model file).
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n_features, n_mask = len(dataset.feature_names), len(dataset.mask_names)
    net = copy.deepcopy(model).cpu().eval()
    module = ExportModule(net, dataset.transform.shift, dataset.transform.scale, pipeline.task,
                          uses_mask(net, n_mask)).eval()
    with torch.no_grad(), _model_errors(pipeline, "forward on a probe batch of 2 events"):
        probe = module(torch.zeros(2, n_features), torch.ones(2, n_mask))
    if probe.dim() != 2 or probe.shape[0] != 2:
        raise BundleError(f"the model gives outputs of shape {tuple(probe.shape)} for a batch of "
                          "2; expected [batch, n_outputs]")
    n_outputs = int(probe.shape[1])

    partial = out / ".bundle.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        onnx_path = partial / MODEL_FILE
        with _model_errors(pipeline, "torch.onnx.export"):
            inputs = export_onnx(module, onnx_path, n_features, n_mask)
        split = "test" if pipeline.data.split.test > 0 else None
        with _model_errors(pipeline, "the parity check of ONNX Runtime against torch"):
            worst, count = check_parity(onnx_path, module, raw_batches(pipeline, dataset, split))
        types = branch_types(pipeline, dataset)
        spec = bundle_spec(pipeline, dataset, n_outputs, inputs, types)
        spec["parity"] = {"max_abs_diff": worst, "measure": parity_measure(pipeline.task),
                          "events": count, "split": split or "all",
                          "tolerance": PARITY_TOLERANCE}
        _write_json(partial / SPEC_FILE, spec)
        _write_json(partial / "metrics.json", metrics)
        _write_json(partial / "provenance.json", provenance)
        plots = partial / "plots"
        plots.mkdir()
        if plots_dir is not None and Path(plots_dir).is_dir():
            for f in sorted(Path(plots_dir).iterdir()):
                if f.is_file() and not f.is_symlink():
                    shutil.copy2(f, plots / f.name)
        final = out / "bundle"
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _tar(final, out / "bundle.tar.gz")
    return final
