"""ZLIB baskets are inflated by ISA-L: the same bytes as the stdlib's zlib, errors still named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import awkward as ak
import pytest
import uproot
from uproot.compression import _DecompressZLIB

from mlaas.data import RootDataset, sources, synth
from mlaas.errors import SourceError


@pytest.fixture(scope="module")
def zlib_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zlib")
    synth.generate(out, 3000, seed=9, compression="zlib", chunk_size=1000)
    return out


def test_isal_is_what_uproot_inflates_with() -> None:
    assert sources.ZLIB_LIBRARY == "isal"
    assert _DecompressZLIB.library == "isal"


def test_isal_and_zlib_give_the_same_arrays(zlib_pair: Path) -> None:
    branches = ["MET_pt", "Jet_pt", "Jet_btagDeepB", "Muon_charge", "event"]
    path = zlib_pair / "signal.root"
    tree = uproot.open(path)["Events"]
    assert tree.file.compression.name == "ZLIB"
    assert tree["event"].basket_compressed_bytes(0) < tree["event"].basket_uncompressed_bytes(0)
    try:
        _DecompressZLIB.library = "zlib"
        stdlib = uproot.open(path)["Events"].arrays(branches, how=dict)
        _DecompressZLIB.library = "isal"
        fast = uproot.open(path)["Events"].arrays(branches, how=dict)
    finally:
        _DecompressZLIB.library = sources.ZLIB_LIBRARY
    for name in branches:
        assert ak.array_equal(fast[name], stdlib[name]), name


@pytest.mark.parametrize("basket", [0, -1], ids=["first (the layout's sample)", "last (streamed)"])
def test_a_corrupt_basket_names_the_file_under_isal(zlib_pair: Path, tmp_path: Path,
                                                    basket: int) -> None:
    good = (zlib_pair / "background.root").read_bytes()
    tree = uproot.open(zlib_pair / "background.root")["Events"]
    branch = tree["PV_npvs"]  # small integers: its baskets are stored compressed
    index = basket % branch.num_baskets
    assert branch.basket_compressed_bytes(index) < branch.basket_uncompressed_bytes(index)
    start = branch.member("fBasketSeek")[index]
    header = 120  # past the TKey of the first basket, inside its compressed bytes
    bad = bytearray(good)
    bad[start + header:start + header + 64] = bytes(64)
    broken = tmp_path / "background.root"
    broken.write_bytes(bytes(bad))
    spec = {"data": {"sources": [{"files": [str(broken)], "label": 0}],
                     "features": ["PV_npvs"]}}
    with pytest.raises(SourceError) as info:
        RootDataset(spec, split="all").columns()
    assert str(broken) in str(info.value) and "corrupt" in str(info.value)


def test_mlaas_zlib_env_keeps_the_stdlib() -> None:
    code = "from mlaas.data import sources; print(sources.ZLIB_LIBRARY)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MLAAS_ZLIB": "zlib"}, timeout=120, check=True)
    assert out.stdout.strip() == "zlib"


def test_an_unknown_mlaas_zlib_value_is_warned_about_and_isal_used() -> None:
    code = "from mlaas.data import sources; print(sources.ZLIB_LIBRARY)"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                         text=True, env={**os.environ, "MLAAS_ZLIB": "libdeflate"}, timeout=120,
                         check=True)
    assert out.stdout.strip() == "isal"
    assert "MLAAS_ZLIB='libdeflate' is not one of isal, zlib" in out.stderr
