"""Platform storage: layout, path checks (one test per trick), uploads and quota, spec paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mlaas import spec as spec_mod
from mlaas.errors import NotFound, PathError, QuotaExceeded
from mlaas.platform.storage import Storage, check_relpath, resolve_spec_paths

GiB = 1 << 30


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.startswith(".upload-"))


# -- layout -------------------------------------------------------------------


def test_layout(storage: Storage) -> None:
    assert storage.job_dir("abc123") == storage.root / "jobs" / "abc123"
    assert storage.job_dir("abc123").is_dir()
    assert storage.run_dir("abc123") == storage.root / "jobs" / "abc123" / "run"
    assert storage.run_dir("abc123").is_dir()
    assert storage.log_path("abc123") == storage.root / "jobs" / "abc123" / "job.log"
    assert storage.models_dir == storage.root / "models" and storage.models_dir.is_dir()
    ws = storage.workspace("alice")
    assert ws.is_dir() and ws.parent == storage.root / "workspaces"


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", "x" * 65, "a b", "a\x00"])
def test_bad_job_ids(storage: Storage, job_id: str) -> None:
    with pytest.raises(PathError, match="job id"):
        storage.job_dir(job_id)


@pytest.mark.parametrize("user", [
    "alice", "../../etc", "/abs", "a/b", "a_b", ".", "..", "x" * 500, "ünïcødé",
    "https://idp.example/sub|123", "a\x00b",
])
def test_user_names_become_safe_distinct_directories(storage: Storage, user: str) -> None:
    ws = storage.workspace(user)
    assert ws.parent == storage.root / "workspaces"
    assert len(ws.name) <= 16 + 1 + 48 and not ws.name.startswith(".")
    assert set(ws.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_similar_user_names_do_not_share_a_workspace(storage: Storage) -> None:
    names = ["a/b", "a_b", "a:b", "A_b"]
    assert len({storage.workspace(n) for n in names}) == len(names)


def test_empty_user_name(storage: Storage) -> None:
    with pytest.raises(PathError, match="user name '' is empty"):
        storage.workspace("")


# -- path checks ------------------------------------------------------------------


@pytest.mark.parametrize("relpath, why", [
    ("", "is empty"),
    ("/etc/passwd", "is absolute"),
    ("../x", r"contains '\.\.'"),
    ("a/../../x", r"contains '\.\.'"),
    ("a/..", r"contains '\.\.'"),
    ("./a", r"contains '\.'"),
    ("a\\..\\b", "contains a backslash"),
    ("a\x00b", "contains a NUL"),
    ("a\nb", "control character"),
    ("a//b", "empty part"),
    ("a/", "empty part"),
    ("~/x", "starts with '~'"),
    ("x" * 256, "longer than 255 bytes"),
    ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
    ("a/" * 600 + "b", "longer than 1024 characters"),
])
def test_path_tricks_are_refused(storage: Storage, relpath: str, why: str) -> None:
    with pytest.raises(PathError, match=why) as info:
        storage.resolve("alice", relpath)
    assert repr(relpath) in str(info.value)  # the message names the path
    assert info.value.path == relpath


def test_non_string_paths(storage: Storage) -> None:
    with pytest.raises(PathError, match="is not a string") as info:
        check_relpath(3, field_path="model.file")  # type: ignore[arg-type]
    assert info.value.field_path == "model.file"


def test_upload_misuse(storage: Storage) -> None:
    upload = storage.open_upload("alice", "f", quota_bytes=GiB, used_bytes=0)
    upload.write(b"x")
    assert upload.commit()[0] == 1
    for call in (lambda: upload.write(b"y"), upload.commit):
        with pytest.raises(RuntimeError, match="upload of 'f' is already finished"):
            call()
    assert storage.resolve("alice", "f").read_bytes() == b"x"


def test_good_paths_resolve_inside(storage: Storage) -> None:
    ws = storage.workspace("alice")
    assert storage.resolve("alice", "a.root") == ws / "a.root"
    assert storage.resolve("alice", "d/e/f.py") == ws / "d" / "e" / "f.py"
    assert storage.resolve("alice", "x" * 255) == ws / ("x" * 255)
    assert storage.resolve("alice", "..a/b..") == ws / "..a" / "b.."
    assert check_relpath("data/*.root") == ("data", "*.root")


def test_symlink_out_of_the_workspace_is_refused(storage: Storage, tmp_path: Path) -> None:
    ws = storage.workspace("alice")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("x")
    (ws / "link").symlink_to(outside)
    (ws / "filelink").symlink_to(outside / "key")
    (ws / "ok").mkdir()
    (ws / "inner").symlink_to(ws / "ok")
    for relpath in ("link", "link/key", "link/new/file", "filelink"):
        with pytest.raises(PathError, match="symbolic link"):
            storage.resolve("alice", relpath)
    with pytest.raises(PathError, match="symbolic link"):
        storage.write_file("alice", "link/evil", b"x", quota_bytes=GiB, used_bytes=0)
    assert sorted(p.name for p in outside.iterdir()) == ["key"]
    assert storage.resolve("alice", "inner/x") == ws / "inner" / "x"  # a link that stays inside


def test_symlink_into_another_workspace_is_refused(storage: Storage) -> None:
    bob = storage.workspace("bob")
    (storage.workspace("alice") / "bob").symlink_to(bob)
    with pytest.raises(PathError, match="symbolic link"):
        storage.resolve("alice", "bob/x")


# -- writing files ---------------------------------------------------------------


def test_write_file_streams_and_hashes(storage: Storage) -> None:
    chunks = [b"a" * 1000, b"", b"b" * 3000]
    size, digest = storage.write_file("alice", "dir/sub/f.bin", iter(chunks),
                                      quota_bytes=GiB, used_bytes=0)
    body = b"".join(chunks)
    assert size == len(body) and digest == hashlib.sha256(body).hexdigest()
    target = storage.resolve("alice", "dir/sub/f.bin")
    assert target.read_bytes() == body
    size, digest = storage.write_file("alice", "dir/sub/f.bin", b"new", quota_bytes=GiB,
                                      used_bytes=0)
    assert target.read_bytes() == b"new" and size == 3
    assert _leftovers(storage.root) == []


def test_quota_exceeded_leaves_nothing_behind(storage: Storage) -> None:
    storage.write_file("alice", "keep.bin", b"old", quota_bytes=100, used_bytes=0)
    with pytest.raises(QuotaExceeded, match="'keep.bin' would exceed the workspace quota of 100"):
        storage.write_file("alice", "keep.bin", iter([b"x" * 60, b"x" * 60]), quota_bytes=100,
                           used_bytes=0)
    assert storage.resolve("alice", "keep.bin").read_bytes() == b"old"
    with pytest.raises(QuotaExceeded, match="10 bytes left"):
        storage.write_file("alice", "new/deep.bin", b"x" * 11, quota_bytes=100, used_bytes=90)
    assert not storage.resolve("alice", "new/deep.bin").exists()
    assert _leftovers(storage.root) == []
    size, _ = storage.write_file("alice", "fits.bin", b"x" * 10, quota_bytes=100, used_bytes=90)
    assert size == 10  # exactly the room left is fine


def test_failing_stream_leaves_nothing_behind(storage: Storage) -> None:
    def broken():  # type: ignore[no-untyped-def]
        yield b"part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        storage.write_file("alice", "f.bin", broken(), quota_bytes=GiB, used_bytes=0)
    assert not storage.resolve("alice", "f.bin").exists()
    assert _leftovers(storage.root) == []


def test_write_over_a_directory_or_through_a_file(storage: Storage) -> None:
    storage.write_file("alice", "d/f", b"x", quota_bytes=GiB, used_bytes=0)
    with pytest.raises(PathError, match="'d' is a directory"):
        storage.write_file("alice", "d", b"x", quota_bytes=GiB, used_bytes=0)
    with pytest.raises(PathError, match="goes through a file"):
        storage.write_file("alice", "d/f/g", b"x", quota_bytes=GiB, used_bytes=0)
    assert _leftovers(storage.root) == []


def test_delete_file_prunes_empty_directories(storage: Storage) -> None:
    storage.write_file("alice", "a/b/c.txt", b"x", quota_bytes=GiB, used_bytes=0)
    storage.write_file("alice", "a/keep.txt", b"x", quota_bytes=GiB, used_bytes=0)
    storage.delete_file("alice", "a/b/c.txt")
    ws = storage.workspace("alice")
    assert not (ws / "a" / "b").exists() and (ws / "a" / "keep.txt").exists()
    with pytest.raises(NotFound, match="no file named 'a/b/c.txt'"):
        storage.delete_file("alice", "a/b/c.txt")
    with pytest.raises(PathError, match="is a directory"):
        storage.delete_file("alice", "a")
    storage.delete_file("alice", "a/keep.txt")
    assert ws.is_dir() and list(ws.iterdir()) == []


# -- spec paths ----------------------------------------------------------------


def _spec(**over):  # type: ignore[no-untyped-def]
    spec = {
        "data": {
            "sources": [
                {"files": ["sig/*.root", "root://eos.example:1094//store/x.root"], "label": 1},
                {"files": ["https://host.example/bkg.root", "bkg.root"], "label": 0},
            ],
            "features": ["x"],
        },
        "model": {"file": "models/net.py"},
    }
    spec["data"].update(over)
    return spec


def test_resolve_spec_paths(storage: Storage) -> None:
    spec = _spec(cache={"disk": "cache1"})
    out = resolve_spec_paths(spec, storage, "alice")
    ws = storage.workspace("alice")
    files = [s["files"] for s in out["data"]["sources"]]
    assert files == [[str(ws / "sig" / "*.root"), "root://eos.example:1094//store/x.root"],
                     ["https://host.example/bkg.root", str(ws / "bkg.root")]]
    assert out["model"]["file"] == str(ws / "models" / "net.py")
    assert out["data"]["cache"] == {"disk": str(storage.cache_dir("alice") / "cache1")}
    assert spec == _spec(cache={"disk": "cache1"})  # the input is not changed
    loaded = spec_mod.load(out)  # still a valid pipeline, with absolute paths
    assert loaded.model.file == str(ws / "models" / "net.py")
    assert loaded.data.cache.path == str(storage.cache_dir("alice") / "cache1")


def test_resolve_spec_paths_after_model_dump(storage: Storage) -> None:
    dumped = spec_mod.load(_spec(cache={"disk": "c"})).model_dump(mode="json")
    out = resolve_spec_paths(dumped, storage, "alice")
    assert out["data"]["cache"]["path"] == str(storage.cache_dir("alice") / "c")
    assert out["data"]["sources"][1]["files"][1] == str(storage.workspace("alice") / "bkg.root")


def test_logical_names_need_a_redirector(storage: Storage) -> None:
    spec = _spec()
    spec["data"]["sources"][0]["files"] = ["/store/mc/x.root"]
    with pytest.raises(PathError, match="is absolute") as info:
        resolve_spec_paths(spec, storage, "alice")
    assert info.value.field_path == "data.sources[0].files[0]"
    spec["data"]["redirector"] = "root://cms-xrd-global.cern.ch"
    out = resolve_spec_paths(spec, storage, "alice")
    assert out["data"]["sources"][0]["files"] == ["/store/mc/x.root"]


@pytest.mark.parametrize("where, value, field, why", [
    ("file", "/etc/passwd", "data.sources[1].files[1]", "is absolute"),
    ("file", "../alice2/x.root", "data.sources[1].files[1]", r"contains '\.\.'"),
    ("file", "file:///etc/passwd", "data.sources[1].files[1]", "URL scheme"),
    ("file", "~root/x.root", "data.sources[1].files[1]", "starts with '~'"),
    ("model", "/tmp/evil.py", "model.file", "is absolute"),
    ("model", "a/../../b.py", "model.file", r"contains '\.\.'"),
    ("cache", "/var/tmp/c", "data.cache.disk", "is absolute"),
    ("cache", "../c", "data.cache.disk", r"contains '\.\.'"),
    ("cache_path", "/var/tmp/c", "data.cache.path", "is absolute"),
])
def test_resolve_spec_paths_refuses(storage: Storage, where: str, value: str, field: str,
                                    why: str) -> None:
    spec = _spec()
    if where == "file":
        spec["data"]["sources"][1]["files"][1] = value
    elif where == "model":
        spec["model"]["file"] = value
    elif where == "cache":
        spec["data"]["cache"] = {"disk": value}
    else:
        spec["data"]["cache"] = {"kind": "disk", "path": value}
    with pytest.raises(PathError, match=why) as info:
        resolve_spec_paths(spec, storage, "alice")
    assert info.value.field_path == field
    assert f"at spec field {field}" in str(info.value)


def test_resolve_spec_paths_leaves_bad_types_to_the_spec(storage: Storage) -> None:
    spec = {"data": {"sources": [{"files": [3]}, "junk"], "cache": "memory"}, "model": {}}
    assert resolve_spec_paths(spec, storage, "alice") == spec


def test_upload_temp_files_are_private(storage: Storage) -> None:
    upload = storage.open_upload("alice", "f", quota_bytes=GiB, used_bytes=0)
    with upload:
        tmp = [p for p in storage.workspace("alice").iterdir() if p.name.startswith(".upload-")]
        assert len(tmp) == 1 and (os.stat(tmp[0]).st_mode & 0o077) == 0
    assert _leftovers(storage.root) == []
