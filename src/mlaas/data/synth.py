"""Synthetic NanoAOD-like ROOT files: the data behind ``mlaas datagen``.

Layer: data.  Tests, benchmarks and demos need ROOT input that looks like
what physicists actually feed the service (a CMS NanoAOD ``Events`` tree with
flat branches, jagged ``Jet``/``Muon``/``Electron`` collections and their
``nJet``-style counters) without shipping gigabytes of real data.  This module
defines :func:`generate`, which writes a ``signal.root`` and a
``background.root`` with that layout.

The two classes differ the way a ttH-like signal differs from a softer
multijet/W+jets background (more and harder jets, more b-tags, more missing
energy, more often a prompt lepton), with enough overlap that a good
classifier reaches an AUC of roughly 0.9 rather than 1: the data is meant to
exercise training, not to be trivially separable.

Design decisions:

* Streaming.  Events are drawn in fixed blocks of :data:`BLOCK_EVENTS` and
  written with ``tree.extend`` in chunks of ``chunk_size``; memory is bounded
  by ``chunk_size + BLOCK_EVENTS`` events whatever ``events`` is.
* Determinism.  Block ``b`` of class ``c`` draws from
  ``default_rng(SeedSequence(seed, spawn_key=(c, b)))`` (the same stream as
  ``SeedSequence(seed).spawn(...)[c].spawn(...)[b]``).  Because the block size
  is a constant, the content does **not** depend on ``chunk_size`` (that only
  changes basket sizes), and a smaller ``events`` gives a prefix of a larger
  one.  File bytes still differ between runs (ROOT headers carry a UUID and
  timestamps); the arrays read back are identical.
* Fully vectorised: counts are Poisson/Bernoulli draws, contents are flat
  numpy arrays built into awkward lists without copying; no per-event Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import uproot
import uproot.compression

from mlaas.errors import SourceError, SpecError

__all__ = ["BLOCK_EVENTS", "COMPRESSIONS", "TREE_NAME", "generate", "output_dir"]

TREE_NAME = "Events"

#: Events per random stream.  Part of the output's identity: changing it
#: changes what a given seed produces.
BLOCK_EVENTS = 10_000

# Compression name -> uproot setting.  Levels follow ROOT's presets so the
# files look like the ones users have: zlib 1 is ROOT's long-time default
# (101, also uproot's), lz4 4 is ``kUseAnalysis`` (404), zstd 5 is
# ``kUseGeneralPurpose`` (505), lzma 7 is ``kUseSmallest`` (207; slow to write).
_COMPRESSIONS: dict[str, Callable[[], uproot.compression.Compression | None]] = {
    "zlib": lambda: uproot.ZLIB(1),
    "lz4": lambda: uproot.LZ4(4),
    "zstd": lambda: uproot.ZSTD(5),
    "lzma": lambda: uproot.LZMA(7),
    "none": lambda: None,
}

#: Accepted values of ``compression``, e.g. for CLI choices.
COMPRESSIONS: tuple[str, ...] = tuple(_COMPRESSIONS)

Chunk = dict[str, Any]  # branch name -> numpy array (flat) or awkward array (jagged)

# -- detector-ish constants shared by both classes ---------------------------

_JET_PT_MIN = 25.0  # GeV; NanoAOD-analysis-like jet threshold
_JET_ETA_MAX = 4.7
_JET_IDS = np.array([0, 2, 6], dtype=np.int32)
_JET_ID_P = (0.02, 0.08, 0.90)
_MUON_ETA_MAX = 2.4
_ELECTRON_ETA_MAX = 2.5
_SOFT_LEPTON_MEAN = 0.2  # non-prompt leptons (from b/c decays) per flavour per event
_PILEUP_MEAN = 30.0
_LUMI_BLOCK_EVENTS = 200  # consecutive events per luminosity block


@dataclass(frozen=True)
class _Physics:
    """The knobs that make one class differ from the other; everything else is shared."""

    jet_mean: float  # Poisson mean of jets above threshold
    bjet_fraction: float
    light_pt_scale: float  # GeV, exponential slope above threshold
    bjet_pt_scale: float
    jet_eta_sigma: float  # heavy-particle decays are more central
    prompt_lepton_prob: float  # isolated e/mu from a W
    true_met_scale: float  # GeV, neutrinos; fake MET is added from pileup


_SIGNAL = _Physics(
    jet_mean=6.0,
    bjet_fraction=0.25,
    light_pt_scale=45.0,
    bjet_pt_scale=55.0,
    jet_eta_sigma=1.6,
    prompt_lepton_prob=0.55,
    true_met_scale=40.0,
)
_BACKGROUND = _Physics(
    jet_mean=4.0,
    bjet_fraction=0.10,
    light_pt_scale=35.0,
    bjet_pt_scale=35.0,
    jet_eta_sigma=2.0,
    prompt_lepton_prob=0.20,
    true_met_scale=15.0,
)
_CLASSES: tuple[tuple[str, _Physics], ...] = (("signal", _SIGNAL), ("background", _BACKGROUND))


def generate(
    outdir: str | os.PathLike[str],
    events: int,
    *,
    compression: str = "zlib",
    seed: int = 0,
    chunk_size: int = 100_000,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``signal.root`` and ``background.root`` (tree ``Events``) into ``outdir``.

    ``events`` is per file.  ``progress(n, nbytes)`` is called after every
    chunk with the events just written and the bytes the file grew by, summed
    over both files, so a caller can drive a bar of total ``2 * events``.
    Each file is written under a temporary name and renamed when complete, so
    an interrupted run never leaves a truncated file that looks finished.

    Returns ``{"files": {"signal": path, "background": path}, "events": events,
    "compression": name, "seed": seed, "bytes": {"signal": n, "background": n}}``.
    """
    codec = _compression(compression)
    _check_numbers(events, chunk_size, seed)
    events, chunk_size, seed = int(events), int(chunk_size), int(seed)
    out = output_dir(outdir)
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for class_index, (name, physics) in enumerate(_CLASSES):
        path = out / f"{name}.root"
        blocks = _blocks(seed, class_index, physics, events)
        _write(path, _rechunk(blocks, chunk_size), codec, progress)
        files[name] = str(path)
        sizes[name] = path.stat().st_size
    return {
        "files": files,
        "events": events,
        "compression": compression.strip().lower(),
        "seed": seed,
        "bytes": sizes,
    }


# -- arguments ---------------------------------------------------------------


def output_dir(outdir: str | os.PathLike[str]) -> Path:
    """Create ``outdir`` (and its parents), or raise :class:`SourceError` naming it.

    A path under a file (``signal.root/x``) or where no directory can be
    made (``/proc/x``) was a NotADirectoryError or FileNotFoundError traceback.
    """
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = next((p for p in (out, *out.parents) if p.exists()), None)
        why = (f"{str(blocking)!r} is a file, not a directory"
               if blocking is not None and not blocking.is_dir() else exc.strerror or str(exc))
        raise SourceError(f"cannot create the output directory {str(out)!r}: {why}",
                          file_path=str(out)) from exc
    return out


def _compression(name: str) -> uproot.compression.Compression | None:
    """Map a CLI-friendly name to uproot's object, failing early with the valid names."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if key not in _COMPRESSIONS:
        raise SpecError(
            f"unknown compression {name!r}; valid: {', '.join(COMPRESSIONS)}",
            field_path="compression",
        )
    return _COMPRESSIONS[key]()


def _check_numbers(events: int, chunk_size: int, seed: int) -> None:
    """Reject values that would silently write nothing, loop forever or crash deep in numpy."""
    limits = (("events", events, 0), ("chunk_size", chunk_size, 1), ("seed", seed, 0))
    for field, value, least in limits:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise SpecError(
                f"{field} must be an integer >= {least}, got {value!r}", field_path=field
            )


# -- writing -----------------------------------------------------------------


def _branch_types() -> dict[str, Any]:
    """Declared up front so an empty file still has the full NanoAOD-like schema.

    A record-of-lists type under ``Jet`` makes uproot write ``nJet`` and
    ``Jet_<field>`` branches, NanoAOD's naming.
    """
    jagged = ak.types.from_datashape
    return {
        "run": np.uint32,
        "luminosityBlock": np.uint32,
        "event": np.uint64,
        "MET_pt": np.float32,
        "MET_phi": np.float32,
        "PV_npvs": np.int32,
        "Jet": jagged(
            "var * {pt: float32, eta: float32, phi: float32, mass: float32,"
            " btagDeepB: float32, jetId: int32}",
            highlevel=False,
        ),
        "Muon": jagged(
            "var * {pt: float32, eta: float32, phi: float32, charge: int32}", highlevel=False
        ),
        "Electron": jagged("var * {pt: float32, eta: float32, phi: float32}", highlevel=False),
    }


def _write(
    path: Path,
    chunks: Iterable[Chunk],
    codec: uproot.compression.Compression | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Stream chunks into one file, renaming it into place only once complete."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        size = 0
        with uproot.recreate(partial, compression=codec) as file:
            tree = file.mktree(TREE_NAME, _branch_types())
            for chunk in chunks:
                tree.extend(chunk)
                if progress is not None:
                    grown, size = partial.stat().st_size - size, partial.stat().st_size
                    progress(len(chunk["event"]), grown)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _rechunk(blocks: Iterable[Chunk], chunk_size: int) -> Iterator[Chunk]:
    """Regroup fixed-size RNG blocks into ``chunk_size`` writes, so content ignores chunk size."""
    pending: list[Chunk] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block["event"])
        while held >= chunk_size:
            merged = _concat(pending)
            yield _slice(merged, 0, chunk_size)
            rest = _slice(merged, chunk_size, held)
            held -= chunk_size
            pending = [rest] if held else []
    if held:
        yield _concat(pending)


def _concat(parts: list[Chunk]) -> Chunk:
    if len(parts) == 1:
        return parts[0]
    return {
        key: (
            np.concatenate([p[key] for p in parts])
            if isinstance(parts[0][key], np.ndarray)
            else ak.concatenate([p[key] for p in parts])
        )
        for key in parts[0]
    }


def _slice(chunk: Chunk, start: int, stop: int) -> Chunk:
    return {key: value[start:stop] for key, value in chunk.items()}


# -- generation ----------------------------------------------------------------


def _blocks(seed: int, class_index: int, physics: _Physics, events: int) -> Iterator[Chunk]:
    """Blocks of :data:`BLOCK_EVENTS` events, each from its own stream; the last is cut to size.

    The last block is drawn in full and sliced, so ``events=n`` is a prefix of
    ``events=m > n`` for the same seed.
    """
    for index, start in enumerate(range(0, events, BLOCK_EVENTS)):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(class_index, index)))
        block = _block(rng, physics, start, BLOCK_EVENTS)
        yield _slice(block, 0, min(BLOCK_EVENTS, events - start))


def _block(rng: np.random.Generator, physics: _Physics, start: int, n: int) -> Chunk:
    """One block of events; the draw order is fixed, as it defines what a seed means."""
    event = np.arange(start + 1, start + n + 1, dtype=np.uint64)  # NanoAOD MC starts at 1
    npvs = rng.poisson(_PILEUP_MEAN, n).astype(np.int32)
    prompt = rng.random(n) < physics.prompt_lepton_prob
    prompt_is_muon = rng.random(n) < 0.5
    met_pt, met_phi = _met(rng, physics, npvs)
    return {
        "run": np.ones(n, dtype=np.uint32),
        "luminosityBlock": ((event - 1) // _LUMI_BLOCK_EVENTS + 1).astype(np.uint32),
        "event": event,
        "MET_pt": met_pt,
        "MET_phi": met_phi,
        "PV_npvs": npvs,
        "Jet": _jets(rng, physics, n),
        "Muon": _muons(rng, (prompt & prompt_is_muon).astype(np.int64)),
        "Electron": _electrons(rng, (prompt & ~prompt_is_muon).astype(np.int64)),
    }


def _jets(rng: np.random.Generator, physics: _Physics, n: int) -> ak.Array:
    """Jets above threshold: falling pT, b-jets harder and b-tagged, sorted by pT like NanoAOD."""
    counts = rng.poisson(physics.jet_mean, n)
    total = int(counts.sum())
    is_b = rng.random(total) < physics.bjet_fraction
    scale = np.where(is_b, physics.bjet_pt_scale, physics.light_pt_scale)
    pt = _JET_PT_MIN + rng.exponential(1.0, total) * scale
    # jet mass ~ 10-15% of pT, a little larger for b-jets; log-normal keeps it positive
    mass = pt * rng.lognormal(np.where(is_b, np.log(0.13), np.log(0.10)), 0.35)
    btag = np.where(is_b, rng.beta(5.0, 1.5, total), rng.beta(0.6, 10.0, total))
    eta = _central_eta(rng, physics.jet_eta_sigma, total)
    phi = rng.uniform(-np.pi, np.pi, total)
    jet_id = rng.choice(_JET_IDS, size=total, p=_JET_ID_P)
    return _collection(
        counts,
        {
            "pt": pt,
            "eta": eta,
            "phi": phi,
            "mass": mass,
            "btagDeepB": btag,
            "jetId": jet_id,
        },
    )


def _central_eta(rng: np.random.Generator, sigma: float, size: int) -> np.ndarray:
    """Gaussian-central eta inside the calorimeter; the rare tail is redrawn flat, not clipped."""
    eta = rng.normal(0.0, sigma, size)
    outside = np.abs(eta) > _JET_ETA_MAX
    eta[outside] = rng.uniform(-_JET_ETA_MAX, _JET_ETA_MAX, int(outside.sum()))
    return eta


def _muons(rng: np.random.Generator, prompt: np.ndarray) -> ak.Array:
    """NanoAOD keeps muons above 3 GeV; charge is the only extra field we model."""
    counts, pt, eta, phi = _leptons(rng, prompt, pt_min=3.0, eta_max=_MUON_ETA_MAX)
    charge = np.where(rng.random(len(pt)) < 0.5, -1, 1).astype(np.int32)
    return _collection(counts, {"pt": pt, "eta": eta, "phi": phi, "charge": charge})


def _electrons(rng: np.random.Generator, prompt: np.ndarray) -> ak.Array:
    """NanoAOD keeps electrons above 5 GeV."""
    counts, pt, eta, phi = _leptons(rng, prompt, pt_min=5.0, eta_max=_ELECTRON_ETA_MAX)
    return _collection(counts, {"pt": pt, "eta": eta, "phi": phi})


def _leptons(
    rng: np.random.Generator, prompt: np.ndarray, *, pt_min: float, eta_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prompt leptons (hard, from W decays) plus soft non-prompt ones both classes share.

    The prompt one, if any, is the first in each event before sorting.
    """
    soft = rng.poisson(_SOFT_LEPTON_MEAN, len(prompt))
    counts = prompt + soft
    total = int(counts.sum())
    is_prompt = _local_index(counts) < np.repeat(prompt, counts)
    hard_pt = 10.0 + rng.exponential(30.0, total)
    soft_pt = pt_min + rng.exponential(6.0, total)
    pt = np.where(is_prompt, hard_pt, soft_pt)
    eta = rng.uniform(-eta_max, eta_max, total)
    phi = rng.uniform(-np.pi, np.pi, total)
    return counts, pt, eta, phi


def _met(
    rng: np.random.Generator, physics: _Physics, npvs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """True MET from neutrinos, smeared in x and y by a resolution that grows with pileup.

    Doing it as a vector gives a realistic MET_phi and a non-zero MET for
    background without a separate fake-MET model.
    """
    n = len(npvs)
    true_pt = rng.exponential(physics.true_met_scale, n)
    true_phi = rng.uniform(-np.pi, np.pi, n)
    sigma = 8.0 + 0.4 * npvs
    mex = true_pt * np.cos(true_phi) + rng.normal(0.0, 1.0, n) * sigma
    mey = true_pt * np.sin(true_phi) + rng.normal(0.0, 1.0, n) * sigma
    return np.hypot(mex, mey).astype(np.float32), np.arctan2(mey, mex).astype(np.float32)


# -- jagged helpers ----------------------------------------------------------------


def _local_index(counts: np.ndarray) -> np.ndarray:
    """Position of each flat entry within its event (0, 1, ... per event)."""
    offsets = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(offsets, counts)


def _collection(counts: np.ndarray, fields: dict[str, np.ndarray]) -> ak.Array:
    """Sort each event's objects by descending pT (NanoAOD order) and wrap as a jagged record.

    Built directly from offsets and flat columns: no per-event work and no copy
    beyond the sort and the float32/int32 casts the branches need.
    """
    owner = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-fields["pt"], owner))
    columns = [
        ak.contents.NumpyArray(
            value[order].astype(np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32)
        )
        for value in fields.values()
    ]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    record = ak.contents.RecordArray(columns, list(fields), length=int(offsets[-1]))
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), record))
