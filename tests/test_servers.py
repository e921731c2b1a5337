"""The real test servers (tests/servers.py) work and stay on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import awkward as ak
import pytest
import uproot

from servers import parse_range, port_accepts

HZZ = Path(__file__).resolve().parent / "files" / "uproot-HZZ.root"
BRANCHES = ["Jet_Px", "MET_px"]
LOOPBACK = {
    ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("::ffff:127.0.0.1"),
    ipaddress.ip_address("::1"),
}
TCP_LISTEN = "0A"


def _proc_net_addr(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode an address of /proc/net/tcp{,6}: 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_addr)
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    return ipaddress.ip_address(b"".join(words))


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of TCP sockets listening on ``port`` (any address family)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:  # kernel without IPv6
            continue
        for line in lines:
            fields = line.split()
            addr, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and fields[3] == TCP_LISTEN:
                found.append(_proc_net_addr(addr))
    return found


def read_local(path: Path) -> ak.Array:
    with uproot.open(path) as f:
        return f["events"].arrays(BRANCHES)


def read_url(url: str, **options: object) -> ak.Array:
    with uproot.open(url, timeout=30, **options) as f:
        return f["events"].arrays(BRANCHES)


def assert_same_events(remote: ak.Array, local: ak.Array) -> None:
    assert len(local) > 0
    for branch in BRANCHES:
        assert ak.array_equal(remote[branch], local[branch]), branch


def test_proc_net_decoding():
    if sys.byteorder != "little":
        pytest.skip("sample rows are from a little-endian kernel")
    assert str(_proc_net_addr("0100007F")) == "127.0.0.1"
    assert _proc_net_addr("0000000000000000FFFF00000100007F") == ipaddress.ip_address(
        "::ffff:127.0.0.1"
    )
    assert str(_proc_net_addr("00000000000000000000000001000000")) == "::1"
    assert _proc_net_addr("00000000") == ipaddress.IPv4Address(0)  # the IPv4 wildcard


# ---------------------------------------------------------------------- XRootD


@pytest.mark.xrootd
@pytest.mark.network
def test_xrootd_listens_on_loopback_only(xrootd_server):
    addresses = listening_addresses(xrootd_server.port)
    assert addresses, f"nothing listens on port {xrootd_server.port}"
    for addr in addresses:
        assert addr in LOOPBACK, f"xrootd listens on {addr} (port {xrootd_server.port})"
        assert not addr.is_unspecified


@pytest.mark.xrootd
@pytest.mark.network
def test_xrootd_read_matches_local(xrootd_server):
    url = xrootd_server.put(HZZ)
    assert url == f"root://127.0.0.1:{xrootd_server.port}//uproot-HZZ.root"
    assert_same_events(read_url(url), read_local(HZZ))


@pytest.mark.xrootd
@pytest.mark.network
def test_xrootd_stop_and_start(xrootd_server):
    url = xrootd_server.put(HZZ, "restart/HZZ.root")
    local = read_local(HZZ)
    assert_same_events(read_url(url), local)

    xrootd_server.stop()
    try:
        assert not xrootd_server.running
        assert not port_accepts(xrootd_server.port)
    finally:
        xrootd_server.start()
    assert xrootd_server.running
    assert set(listening_addresses(xrootd_server.port)) <= LOOPBACK
    assert_same_events(read_url(url), local)


@pytest.mark.xrootd
@pytest.mark.network
@pytest.mark.slow  # the XRootD client checks timeouts every 15 s by default
def test_dead_root_url_raises(dead_root_url):
    with pytest.raises(OSError):
        uproot.open(dead_root_url, timeout=2)


# ------------------------------------------------------------------------ HTTP


@pytest.mark.network
def test_http_listens_on_loopback_only(http_server):
    assert set(listening_addresses(http_server.port)) == {ipaddress.ip_address("127.0.0.1")}


@pytest.mark.network
def test_http_read_matches_local(http_server):
    url = http_server.put(HZZ)
    assert url == f"http://127.0.0.1:{http_server.port}/uproot-HZZ.root"
    before = len(http_server.requests)
    assert_same_events(read_url(url), read_local(HZZ))
    ranged = [r for r in http_server.requests[before:] if r[2] is not None]
    assert ranged, "uproot did not use Range requests"


@pytest.mark.network
def test_http_read_with_uproot_http_source(http_server):
    # uproot's own HTTPSource asks for several ranges in one request
    # (multipart/byteranges) instead of fsspec's one range per request.
    url = http_server.put(HZZ, "http-source/HZZ.root")
    before = len(http_server.requests)
    assert_same_events(read_url(url, handler=uproot.source.http.HTTPSource), read_local(HZZ))
    multi = [r for r in http_server.requests[before:] if r[2] and "," in r[2]]
    assert multi, "no multi-range request was made"


@pytest.mark.network
def test_http_single_range(http_server):
    url = http_server.put(HZZ)
    data = HZZ.read_bytes()
    req = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        assert resp.read() == data[100:200]


@pytest.mark.network
def test_http_multi_range_and_errors(http_server):
    url = http_server.put(HZZ)
    data = HZZ.read_bytes()
    req = urllib.request.Request(url, headers={"Range": "bytes=0-3,-4"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 206
        assert resp.headers.get_content_type() == "multipart/byteranges"
        body = resp.read()
    assert b"Content-Range: bytes 0-3/" in body and data[:4] in body
    assert f"Content-Range: bytes {len(data) - 4}-{len(data) - 1}/".encode() in body

    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == len(data)
        assert resp.headers["Accept-Ranges"] == "bytes"

    missing = urllib.request.Request(url.replace("uproot-HZZ", "missing"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(missing, timeout=30)
    assert err.value.code == 404
    err.value.close()

    beyond_end = urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(beyond_end, timeout=30)
    assert err.value.code == 416
    assert err.value.headers["Content-Range"] == f"bytes */{len(data)}"
    err.value.close()


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == [(0, 9)]
    assert parse_range("bytes=90-200", 100) == [(90, 99)]
    assert parse_range("bytes=-10", 100) == [(90, 99)]
    assert parse_range("bytes=5-", 100) == [(5, 99)]
    assert parse_range("bytes=0-1, 4-5", 100) == [(0, 1), (4, 5)]
    assert parse_range("bytes=100-", 100) == []
    assert parse_range("bytes=5-1", 100) is None
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=x-1", 100) is None


def test_free_socket_is_loopback():
    # sanity check for listening_addresses(): a socket we bind ourselves
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening_addresses(s.getsockname()[1]) == [ipaddress.ip_address("127.0.0.1")]
