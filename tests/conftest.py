"""Fixtures for real test servers on 127.0.0.1 (see tests/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from servers import HOST, RangeHTTPServer, ServerError, XRootDServer, free_port


@pytest.fixture(scope="session")
def xrootd_server() -> Iterator[XRootDServer]:
    """Debian's xrootd serving a temp dir, bound to 127.0.0.1 only."""
    try:
        server = XRootDServer()
    except ServerError as exc:  # a missing server is a real failure, not a skip
        pytest.fail(f"cannot set up the XRootD test server: {exc}", pytrace=False)
    try:
        server.start()
    except ServerError as exc:
        server.close()
        pytest.fail(f"cannot start the XRootD test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def http_server() -> Iterator[RangeHTTPServer]:
    """Threaded HTTP server with Range support, bound to 127.0.0.1 only."""
    with RangeHTTPServer() as server:
        yield server


@pytest.fixture
def dead_root_url() -> str:
    """A root:// URL on a free 127.0.0.1 port that nothing listens on."""
    return f"root://{HOST}:{free_port()}//x.root"


@pytest.fixture(scope="session", autouse=True)
def numba_loaded() -> None:
    """numba imported and the float32 loops loaded before the first test, not beside one.

    A dataset loads numba in a background thread (``kernels.warm_up``), and
    numba's import and compiler use ``warnings.catch_warnings``, which swaps
    the warnings module's global state and is not thread-safe: overlapping
    a test's ``pytest.warns``, it made that test see no warning (seen once in
    a clean clone, where nothing was compiled yet). Loaded here, the threads
    later find it done.
    """
    from mlaas.data import kernels

    kernels.warm_up()
    kernels._finish_warm_up()
