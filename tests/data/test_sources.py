"""File resolution and bounded retries of transient failures."""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from mlaas.data import RootDataset, sources
from mlaas.errors import SourceError, SpecError
from mlaas.spec import RetrySpec, load

HZZ = Path(__file__).resolve().parent.parent / "files" / "uproot-HZZ.root"


def test_globs_expand_sorted_relative_to_the_spec(tmp_path: Path) -> None:
    for name in ("b.root", "a.root", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    spec = load({"data": {"sources": [{"files": ["*.root", "https://h:1/x.root"], "label": 1}],
                          "features": ["x"]}}, base_dir=tmp_path)
    refs = sources.resolve_files(spec)
    assert [r.url for r in refs] == [str(tmp_path / "a.root"), str(tmp_path / "b.root"),
                                     "https://h:1/x.root"]
    assert [r.key for r in refs] == ["a.root", "b.root", "x.root"]


def test_a_file_named_twice_in_a_source_is_read_once_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "signal.root").write_bytes(b"")
    (tmp_path / "link.root").symlink_to(tmp_path / "signal.root")
    spec = load({"data": {"sources": [{"files": ["signal.root", "sig*.root", "./signal.root",
                                                 "link.root"], "label": 1}],
                          "features": ["x"]}}, base_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"named more than once in data\.sources\[0\]\.files"):
        refs = sources.resolve_files(spec)
    assert [r.url for r in refs] == [str(tmp_path / "signal.root")]


def test_a_file_in_two_sources_is_an_error_naming_both(tmp_path: Path) -> None:
    for name in ("signal.root", "background.root"):
        (tmp_path / name).write_bytes(b"")
    spec = load({"data": {"sources": [{"files": ["signal.root"], "label": 1},
                                      {"files": ["*.root"], "label": 0}],
                          "features": ["x"]}}, base_dir=tmp_path)
    with pytest.raises(SpecError) as err:
        sources.resolve_files(spec)
    text = str(err.value)
    assert "signal.root is in two sources, data.sources[0] and data.sources[1]" in text
    assert "at spec field data.sources[1].files" in text


def test_two_spellings_of_one_remote_file_in_two_sources_are_an_error() -> None:
    # resolving names opens nothing: no server is needed to see they are one file
    spec = load({"data": {"redirector": "root://127.0.0.1:1094",
                          "sources": [{"files": ["/store/mc//a.root"], "label": 1},
                                      {"files": ["root://127.0.0.1:1094//store/mc/a.root"],
                                       "label": 0}],
                          "features": ["x"]}})
    with pytest.raises(SpecError, match=r"is in two sources, data\.sources\[0\] and "):
        sources.resolve_files(spec)
    same = sources.same_file
    assert same("root://h:1//store/x/../a.root?svc=1") == "root://h:1//store/a.root?svc=1"
    # XRootD reads a path after one slash as relative: another file
    assert same("root://h:1/store/a.root") != same("root://h:1//store/a.root")


def test_transient_failures_are_retried_with_growing_backoff() -> None:
    calls, waits = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    retry = RetrySpec(attempts=4, backoff=0.25)
    assert sources.with_retries("root://h:1//f.root", flaky, retry, sleep=waits.append) == "ok"
    assert len(calls) == 3 and waits == [0.25, 0.5]


def test_retries_are_bounded_and_the_error_says_how_many() -> None:
    waits: list[float] = []

    def down() -> None:
        raise TimeoutError("timed out")

    with pytest.raises(SourceError) as info:
        sources.with_retries("root://h:1//f.root", down, RetrySpec(attempts=3, backoff=0.1),
                             sleep=waits.append)
    assert "gave up after 3 attempts" in str(info.value)
    assert "root://h:1//f.root" in str(info.value)
    assert len(waits) == 2


def test_one_attempt_says_so_and_a_timeout_says_how_long_it_waited() -> None:
    url = "root://127.0.0.1:1094//f.root"

    def stalled() -> None:  # as XRootD says it, naming the file itself
        raise TimeoutError(f"XRootD error: [ERROR] Operation expired in file {url}")

    with pytest.raises(SourceError) as info:
        sources.with_retries(url, stalled, RetrySpec(attempts=1, timeout=7),
                             sleep=lambda s: None)
    text = str(info.value)
    assert "(gave up after 1 attempt, each waiting up to 7 s (data.retries.timeout))" in text
    assert text.count(url) == 1, text  # uproot's "in file <url>" is not repeated


@pytest.mark.parametrize("ends", ["before", "during the backoff"])
def test_a_read_whose_pass_ended_makes_no_further_attempt(ends: str) -> None:
    calls: list[int] = []
    ended: list[bool] = [ends == "before"]

    def down() -> None:
        calls.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(SourceError, match="gave up after 1 attempt"):
        sources.with_retries("root://h:1//f.root", down, RetrySpec(attempts=5),
                             sleep=lambda s: ended.append(True), stop=lambda: any(ended))
    assert calls == [1]


def test_local_missing_files_are_not_retried() -> None:
    calls: list[int] = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("/nope.root")

    with pytest.raises(SourceError):
        sources.with_retries("/nope.root", missing, RetrySpec(attempts=5), sleep=lambda s: None)
    assert calls == [1]


@pytest.mark.xrootd
def test_a_server_that_comes_back_during_the_retries_is_read(xrootd_server) -> None:  # type: ignore[no-untyped-def]
    url = xrootd_server.put(HZZ, "retry/uproot-HZZ.root")
    spec = {"data": {"sources": [{"files": [url]}], "label": "triggerIsoMu24",
                     "features": ["MET_px"],
                     "retries": {"attempts": 6, "backoff": 0.5, "timeout": 3}}}
    xrootd_server.stop()
    restart = threading.Timer(1.5, xrootd_server.start)
    restart.start()
    try:
        ds = RootDataset(spec, split="all", shuffle=False)
        n = sum(len(b["y"]) for b in ds)
    finally:
        restart.join()
    assert n == 2421
    assert not restart.is_alive()
    assert np.isfinite(ds.stats.features["MET_px"].moments.mean)


def test_local_paths_are_read_with_plain_reads_and_file_urls_with_uproots_default() -> None:
    # plain reads peaked lower than the memory map for the same epoch (BENCHMARKS.md)
    import uproot

    plain = sources.open_file(str(HZZ), RetrySpec())
    via_url = sources.open_file(HZZ.as_uri(), RetrySpec())
    try:
        assert isinstance(plain.file.source, uproot.source.file.MultithreadedFileSource)
        assert not isinstance(via_url.file.source, uproot.source.file.MultithreadedFileSource)
        assert plain["events"].num_entries == via_url["events"].num_entries == 2421
    finally:
        plain.close()
        via_url.close()


def test_a_port_with_404_in_it_does_not_make_a_connection_error_final() -> None:
    # seen in CI: the test server's port 40487 read as an HTTP 404, so no retry
    url = "root://127.0.0.1:40487//retry/x.root"
    down = OSError(f"XRootD error: [FATAL] Connection error in file {url}")
    assert sources._is_transient(url, down)
    assert not sources._is_transient("https://h:40487/x.root", OSError("HTTP 404 Not Found"))
    assert not sources._is_transient(url, OSError(f"[3011] No such file in file {url}"))


def test_a_copy_of_a_file_under_another_name_is_warned_about(tmp_path: Path) -> None:
    # cp keeps the ROOT UUID: the same events would be read twice, silently
    from mlaas.data import synth

    synth.generate(tmp_path / "gen", 300, seed=1)
    (tmp_path / "multi").mkdir()
    shutil.copy(tmp_path / "gen" / "signal.root", tmp_path / "multi" / "signal.root")
    files = [str(tmp_path / "gen" / "signal.root"), str(tmp_path / "multi" / "signal.root")]
    spec = {"data": {"sources": [{"files": files, "label": 1}], "features": ["MET_pt"]}}
    with pytest.warns(UserWarning, match=r"have the same ROOT UUID .* copies of one file"):
        RootDataset(spec, split="all")
    other = {"data": {"sources": [{"files": [files[0],
                                             str(tmp_path / "gen" / "background.root")],
                                   "label": 1}], "features": ["MET_pt"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RootDataset(other, split="all")  # two files of their own: nothing to say
