"""A pass opens each file once per reading thread, not once per chunk, and closes it at its end.

Opening a file and reading its TTree's metadata costs milliseconds of
Python under the GIL; a pass reads many chunks of few files.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from mlaas.data import RootDataset, sources, synth
from mlaas.errors import SourceError
from mlaas.spec import RetrySpec

HZZ = str(Path(__file__).resolve().parent.parent / "files" / "uproot-HZZ.root")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("open-trees")
    synth.generate(out, 3000, seed=2)
    return out


def spec(d: Path) -> dict[str, Any]:
    return {"data": {
        "sources": [{"files": [str(d / "signal.root")], "label": 1},
                    {"files": [str(d / "background.root")], "label": 0}],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 3}],
        "step_size": 400,  # 8 chunks per file
    }}


def recorded_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, Any]]:
    """Every tree opened for reading: (thread, file, tree), the real trees."""
    opened: list[tuple[int, str, Any]] = []
    lock = threading.Lock()
    real = sources._find_tree  # one attempt at opening, as each read makes it

    def find_tree(url: str, tree: str | None, retry: RetrySpec) -> Any:
        found = real(url, tree, retry)
        with lock:
            opened.append((threading.get_ident(), Path(url).name, found))
        return found

    monkeypatch.setattr(sources, "_find_tree", find_tree)
    return opened


@pytest.mark.parametrize("prefetch", [False, True], ids=["one-thread", "readers"])
def test_an_epoch_opens_each_file_once_per_thread_and_closes_it(
        pair: Path, monkeypatch: pytest.MonkeyPatch, prefetch: bool) -> None:
    ds = RootDataset(spec(pair), split="all", batch_size=500, prefetch=prefetch)
    assert len(ds.chunks) == 16
    opened = recorded_opens(monkeypatch)
    assert sum(len(b["y"]) for b in ds) == 6000
    per_thread = [(thread, name) for thread, name, _ in opened]
    assert len(per_thread) == len(set(per_thread))  # never the same file twice in a thread
    assert {name for _, name in per_thread} == {"signal.root", "background.root"}
    assert len(opened) <= 2 * (ds.readers if prefetch else 1) < len(ds.chunks)
    assert all(tree.file.closed for _, _, tree in opened)


def test_pass_1_and_columns_open_each_file_once(pair: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """Pass 1 reads ahead in two threads (``chunks.read_ahead``): once per file and thread."""
    opened = recorded_opens(monkeypatch)
    ds = RootDataset(spec(pair), split="all")  # runs pass 1 over the 16 chunks
    planning = [name for _, name, _ in opened[:3]]  # the plan's tree, then each file's
    assert sorted(planning) == ["background.root", "signal.root", "signal.root"]
    pass_1 = [(thread, name) for thread, name, _ in opened[3:]]
    assert len(pass_1) == len(set(pass_1)) <= 4  # each file at most once per reader thread
    assert {name for _, name in pass_1} == {"signal.root", "background.root"}
    assert all(tree.file.closed for _, _, tree in opened[3:])  # pass 1 closes its files
    opened.clear()
    assert len(ds.columns()) == 6000
    assert sorted(name for _, name, _ in opened) == ["background.root", "signal.root"]
    assert all(tree.file.closed for _, _, tree in opened)


def test_the_export_parity_pass_opens_each_file_once(pair: Path, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    from mlaas.train.export import raw_batches

    ds = RootDataset(spec(pair), split="all")
    opened = recorded_opens(monkeypatch)
    assert sum(len(x) for x, _ in raw_batches(ds.pipeline, ds, None)) == 6000
    assert sorted(name for _, name, _ in opened) == ["background.root", "signal.root"]
    assert all(tree.file.closed for _, _, tree in opened)


def test_leaving_an_epoch_early_closes_its_files(pair: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    ds = RootDataset(spec(pair), split="all", batch_size=100)
    opened = recorded_opens(monkeypatch)
    batches = iter(ds)
    next(batches)
    batches.close()  # type: ignore[attr-defined]
    assert opened and all(tree.file.closed for _, _, tree in opened)


def test_closing_leaves_a_file_in_use_to_its_read_which_closes_it(pair: Path) -> None:
    trees = sources.OpenTrees()
    url = str(pair / "signal.root")
    idle = trees.get(url, "Events", RetrySpec())  # this thread's, not in a read
    inside, release = threading.Event(), threading.Event()
    held: list[Any] = []

    def read() -> None:
        with trees.lease(url, "Events", RetrySpec()) as t:
            held.append(t)
            inside.set()
            release.wait(30)

    reader = threading.Thread(target=read)
    reader.start()
    assert inside.wait(30)
    trees.close()
    assert idle.file.closed and trees.closed
    assert not held[0].file.closed  # the read goes on with its file
    release.set()
    reader.join(30)
    assert held[0].file.closed


def test_beyond_its_limit_a_thread_closes_the_least_recently_used_file(pair: Path) -> None:
    with sources.OpenTrees(limit=1) as trees:
        first = trees.get(str(pair / "signal.root"), "Events", RetrySpec())
        assert trees.get(str(pair / "signal.root"), "Events", RetrySpec()) is first
        second = trees.get(str(pair / "background.root"), "Events", RetrySpec())
        assert first.file.closed and not second.file.closed
        again = trees.get(str(pair / "signal.root"), "Events", RetrySpec())
        assert again is not first and second.file.closed
    assert again.file.closed


def test_a_failed_read_closes_its_tree_so_the_next_read_opens_the_file_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with sources.OpenTrees() as trees:
        assert len(sources.read_range(HZZ, "events", ["NJet"], 0, 10, trees=trees)["NJet"]) == 10
        broken = trees.get(HZZ, "events", RetrySpec())

        def fail(*_: object, **__: object) -> None:
            raise OSError("connection lost")

        # every read of the file fails, as over a lost connection (one basket or many)
        monkeypatch.setattr(broken.file.source, "chunk", fail)
        monkeypatch.setattr(broken.file.source, "chunks", fail)
        with pytest.raises(SourceError, match="connection lost"):
            sources.read_range(HZZ, "events", ["NJet"], 0, 10, trees=trees)
        assert broken.file.closed
        assert len(sources.read_range(HZZ, "events", ["NJet"], 5, 15, trees=trees)["NJet"]) == 10
        assert trees.get(HZZ, "events", RetrySpec()) is not broken
