"""The model registry: versions, aliases, deletion, hot loading, safe and atomic uploads."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlaas.bundle import Bundle
from mlaas.errors import BundleError
from mlaas.serve.registry import InvalidName, ModelNotFound, Registry, archive_model_name
from serve_support import with_spec


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tar.gz built from hand-made members (for unsafe or broken archives)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def bundle_with(source: Path, drop: frozenset[str] | set[str] = frozenset(),
                extra: dict[str, bytes] | None = None) -> bytes:
    """The bundle directory ``source`` as a .tar.gz, without the files in ``drop``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            if rel in drop or not path.is_file():
                continue
            tar.add(path, arcname=f"bundle/{rel}")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(f"bundle/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _entries(root: Path) -> list[str]:
    """Everything under the root except the lock: staging or trash dirs would show here."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != ".lock")


def test_upload_versions_and_metadata(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path)
    first = reg.upload("higgs", trained["bytes"])
    second = reg.upload("higgs", trained["archive"])  # a path works too
    assert (first["version"], second["version"]) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "higgs").iterdir()) == ["1", "2"]
    assert reg.list() == [{"name": "higgs", "versions": [1, 2], "latest": 2, "aliases": {}}]
    info = reg.get("higgs")
    assert [v["version"] for v in info["versions"]] == [1, 2]
    v1 = reg.version("higgs", 1)
    assert v1["spec"]["task"] == "binary"
    assert v1["spec"]["branches"] == ["Jet_pt", "MET_pt"]
    assert v1["metrics"]["task"] == "binary" and v1["metrics"]["test"]
    assert v1["provenance"]["spec_digest"]
    assert v1["created"] and len(v1["archive"]["sha256"]) == 64
    assert v1["archive"]["size"] == len(trained["bytes"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".upload", ".trash"))]


def test_aliases_resolve_and_delete(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path)
    for _ in range(3):
        reg.upload("m", trained["bytes"])
    assert reg.resolve("m")[0] == 3  # latest without a production alias
    reg.set_alias("m", "production", 1)
    reg.set_alias("m", "staging", 2)
    assert reg.resolve("m")[0] == 1  # production wins over latest
    assert reg.resolve("m", alias="staging") == (2, tmp_path / "m" / "2")
    assert reg.resolve("m", version=3)[0] == 3
    assert reg.get("m")["aliases"] == {"production": 1, "staging": 2}
    assert reg.version("m", 1)["aliases"] == ["production"]
    with pytest.raises(ModelNotFound, match="no alias 'canary'"):
        reg.resolve("m", alias="canary")
    with pytest.raises(ModelNotFound):
        reg.set_alias("m", "canary", 9)
    with pytest.raises(InvalidName):
        reg.set_alias("m", "bad alias", 1)
    with pytest.raises(InvalidName):
        reg.set_alias("m", "7", 1)

    reg.delete_version("m", 1)  # removes the production alias with it
    assert reg.get("m")["aliases"] == {"staging": 2}
    assert reg.resolve("m")[0] == 3
    with pytest.raises(ModelNotFound):
        reg.version("m", 1)
    reg.delete_version("m", 2)
    reg.delete_version("m", 3)
    assert reg.list() == [] and not (tmp_path / "m").exists()
    with pytest.raises(ModelNotFound):
        reg.get("m")
    assert _entries(tmp_path) == []


def test_unknown_names_and_invalid_names(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path)
    reg.upload("higgs", trained["bytes"])
    with pytest.raises(ModelNotFound, match="did you mean 'higgs'") as info:
        reg.resolve("higs")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ModelNotFound, match="no version 5"):
        reg.resolve("higgs", version=5)
    with pytest.raises(ModelNotFound):
        reg.bundle("higgs", 0)
    for bad in ("../x", ".hidden", "a/b", "", "x" * 65, "sp ace"):
        with pytest.raises(InvalidName):
            reg.upload(bad, trained["bytes"])
    assert [m["name"] for m in reg.list()] == ["higgs"]


def test_bundle_cache_and_hot_loading(tmp_path: Path, trained: dict[str, Any]) -> None:
    a, b = Registry(tmp_path), Registry(tmp_path)
    a.upload("m", trained["bytes"])
    v, bundle = b.bundle("m")
    assert v == 1 and b.bundle("m")[1] is bundle  # cached
    a.upload("m", trained["bytes"])
    assert b.bundle("m")[0] == 2  # b sees a's upload without a restart
    a.set_alias("m", "production", 1)
    assert b.bundle("m") == (1, bundle)
    # a version deleted and uploaded again is a new directory: loaded afresh
    a.delete_version("m", 2)
    a.upload("m", trained["bytes"])
    v2, fresh = b.bundle("m", 2)
    assert v2 == 2 and fresh is not b.bundle("m", 1)[1]
    a.delete_model("m")
    with pytest.raises(ModelNotFound):
        b.bundle("m")
    scores = Bundle.load(trained["dir"]).predict_events(trained["rows"])
    a.upload("m", trained["bytes"])
    np.testing.assert_array_equal(b.bundle("m")[1].predict_events(trained["rows"]), scores)


def test_concurrent_uploads_get_distinct_versions(tmp_path: Path,
                                                  trained: dict[str, Any]) -> None:
    regs = [Registry(tmp_path) for _ in range(2)]
    results: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results.append(regs[i % 2].upload("m", trained["bytes"])["version"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "m"]
    for v in range(1, 7):
        assert (tmp_path / "m" / str(v) / "model.onnx").is_file()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def _bad_archives(trained: dict[str, Any]) -> dict[str, bytes]:
    good: bytes = trained["bytes"]
    return {
        "random bytes": np.random.default_rng(0).bytes(5000),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "parent path": make_tar([(_member("../evil"), b"x")]),
        "nested parent path": make_tar([(_member("bundle/../../evil"), b"x")]),
        "absolute path": make_tar([(_member("/tmp/evil"), b"x")]),
        "symlink": make_tar([(_member("bundle/spec.json", tarfile.SYMTYPE, "/etc/passwd"),
                              None)]),
        "hard link": make_tar([(_member("bundle/model.onnx", tarfile.LNKTYPE, "/etc/passwd"),
                                None)]),
        "no model.onnx": bundle_with(trained["dir"], drop={"model.onnx"}),
        "no spec.json": bundle_with(trained["dir"], drop={"spec.json"}),
        "corrupt model.onnx": bundle_with(trained["dir"], drop={"model.onnx"},
                                          extra={"model.onnx": b"not onnx"}),
        "not a bundle": make_tar([(_member("readme.txt"), b"hello")]),
    }


def test_bad_archives_leave_registry_unchanged(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path / "reg")
    reg.upload("m", trained["bytes"])
    before, listing = _entries(reg.root), reg.list()
    for what, data in _bad_archives(trained).items():
        with pytest.raises(BundleError):
            reg.upload("m", data)
        with pytest.raises(BundleError):
            reg.upload("new", data)
        assert _entries(reg.root) == before, what
        assert reg.list() == listing, what
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_archive_size_limit(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path, max_archive_bytes=1000)
    with pytest.raises(BundleError, match="above the limit"):
        reg.upload("m", trained["bytes"])
    reg = Registry(tmp_path, max_member_bytes=100)
    with pytest.raises(BundleError, match="above the limit"):
        reg.upload("m", trained["bytes"])
    assert reg.list() == []


def test_bundle_dir_at_archive_top_level(tmp_path: Path, trained: dict[str, Any]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(Path(trained["dir"]).iterdir()):
            tar.add(p, arcname=p.name)
    assert Registry(tmp_path).upload("flat", buf.getvalue())["version"] == 1


def test_archive_model_name_reads_only_a_valid_spec_name(trained: dict[str, Any]) -> None:
    named = with_spec(trained["bytes"], name="higgs-2")
    assert archive_model_name(named) == "higgs-2"
    assert archive_model_name(with_spec(trained["bytes"], name=None)) is None
    assert archive_model_name(with_spec(trained["bytes"], name="../x")) is None
    spec = b'{"name": "flat"}'
    assert archive_model_name(make_tar([(_member("spec.json"), spec)])) == "flat"
    assert archive_model_name(make_tar([(_member("b/spec.json"), spec)])) == "flat"
    assert archive_model_name(make_tar([(_member("a/x"), b"x"),  # two directories: no bundle
                                        (_member("b/spec.json"), spec)])) is None
    assert archive_model_name(make_tar([(_member("b/c/spec.json"), spec)])) is None
    assert archive_model_name(make_tar([(_member("spec.json", tarfile.SYMTYPE, "/etc/passwd"),
                                         None)])) is None
    assert archive_model_name(make_tar([(_member("spec.json"), b"{oops")])) is None
    assert archive_model_name(named, max_spec_bytes=10) is None
    many = make_tar([(_member(f"f{i}"), b"x") for i in range(5)] + [(_member("spec.json"), spec)])
    assert archive_model_name(many) == "flat"
    assert archive_model_name(many, max_members=5) is None  # not listed past the bound
    for data in _bad_archives(trained).values():
        archive_model_name(data)  # never raises
