"""The reading plan: chunks end where every branch starts a basket, so none is read twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import uproot

from mlaas.data import RootDataset, synth
from mlaas.data.chunks import READS_PER_STEP, bounds
from mlaas.data.transform import Columns

BASKET = 500  # synth writes one basket per branch per chunk_size events


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan")
    synth.generate(out, 6000, seed=5, chunk_size=BASKET)
    return out


def spec(directory: Path, step: str | int) -> dict:
    return {"data": {
        "sources": [
            {"files": [str(directory / "signal.root")], "label": 1},
            {"files": [str(directory / "background.root")], "label": 0},
        ],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 3}, "PV_npvs"],
        "step_size": step,
    }}


def test_bounds_end_on_the_last_cluster_start_that_fits() -> None:
    clusters = list(range(0, 2_000_001, 100_000))
    assert bounds(2_000_000, 594_000, clusters) == [
        (0, 500_000), (500_000, 1_000_000), (1_000_000, 1_500_000), (1_500_000, 2_000_000)]
    # the last range takes what is left; a file shorter than a step is one range
    assert bounds(450_000, 594_000, clusters) == [(0, 450_000)]


def test_bounds_stretch_to_the_next_cluster_rather_than_split_one() -> None:
    """A quarter-step chunk shorter than a cluster runs on to the cluster's end when that
    is within the whole step, so no basket is inflated twice; past it, the step cuts."""
    clusters = list(range(0, 500_001, 100_000))
    assert bounds(500_000, 65_000, clusters, stretch=260_000) == [
        (0, 100_000), (100_000, 200_000), (200_000, 300_000), (300_000, 400_000),
        (400_000, 500_000)]
    assert bounds(500_000, 65_000, clusters, stretch=90_000) == [
        (0, 65_000), (65_000, 100_000), (100_000, 165_000), (165_000, 200_000),
        (200_000, 265_000), (265_000, 300_000), (300_000, 365_000), (365_000, 400_000),
        (400_000, 465_000), (465_000, 500_000)]


def test_bounds_fall_back_to_the_step_where_no_cluster_fits() -> None:
    assert bounds(1000, 300, []) == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert bounds(1000, 300, [0, 500, 1000]) == [(0, 300), (300, 500), (500, 800), (800, 1000)]


@pytest.mark.parametrize("step", [1, 7, 300, 999, 5000])
def test_bounds_cover_every_entry_once_within_the_step(step: int) -> None:
    rng = np.random.default_rng(step)
    clusters = sorted({0, 4000, *rng.integers(1, 4000, 40).tolist()})
    got = bounds(4000, step, clusters)
    assert got[0][0] == 0 and got[-1][1] == 4000
    assert all(a < b <= a + step for a, b in got)
    assert all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))


def test_byte_steps_cut_on_basket_boundaries(pair: Path) -> None:
    ds = RootDataset(spec(pair, "120 kB"), split="all", shuffle=False)
    tree = uproot.open(pair / "signal.root")["Events"]
    assert tree["Jet_pt"].entry_offsets[:3] == [0, BASKET, 2 * BASKET]
    steps = {c.stop - c.start for c in ds.chunks}
    assert len(ds.chunks) > 4 and max(steps) >= BASKET  # a real multi-chunk plan
    assert all(c.start % BASKET == 0 for c in ds.chunks), [(c.start, c.stop) for c in ds.chunks]
    assert all(c.stop % BASKET == 0 or c.stop == 6000 for c in ds.chunks)


def test_a_byte_step_is_read_as_four_chunks(pair: Path) -> None:
    """A size is the memory of the arrays in flight (two chunks preprocessed, two read
    ahead), so a chunk is a quarter of the entries uproot fits in that size."""
    step = "100 kB"
    tree = uproot.open(pair / "signal.root")["Events"]
    whole = tree.num_entries_for(step, filter_name=lambda n: n in {"MET_pt", "Jet_pt",
                                                                    "PV_npvs"})
    assert whole < tree.num_entries  # else the file is one chunk whatever the rule
    plan = RootDataset(spec(pair, step), split="all", shuffle=False).chunks
    quarter = whole // READS_PER_STEP
    assert READS_PER_STEP == 4
    assert max(c.entries for c in plan) <= quarter
    # cut on the last basket start that fits in the quarter
    assert max(c.entries for c in plan) == quarter // BASKET * BASKET or quarter < BASKET


def test_entry_count_steps_are_kept_exactly(pair: Path) -> None:
    ds = RootDataset(spec(pair, 700), split="all", shuffle=False)
    assert [(c.start, c.stop) for c in ds.chunks if c.source == 0][:3] == [
        (0, 700), (700, 1400), (1400, 2100)]


def test_aligned_and_unaligned_plans_give_the_same_events(pair: Path) -> None:
    aligned = RootDataset(spec(pair, "120 kB"), split="all", shuffle=False).columns()
    exact = RootDataset(spec(pair, 700), split="all", shuffle=False, stats=None).columns()

    def by_event(c: Columns) -> np.ndarray:
        order = np.lexsort((c.entry, c.file))
        return c.x[order]

    assert len(aligned) == len(exact) == 12000
    np.testing.assert_array_equal(by_event(aligned), by_event(exact))
