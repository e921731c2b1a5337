"""``mlaas server``: the platform app under uvicorn.

Layer: platform (process entry). Builds the app with
:func:`mlaas.platform.app.create_platform_app` and runs it; the CLI command
only turns flags into a :class:`~mlaas.platform.config.PlatformConfig`.
"""

from __future__ import annotations

import logging
import sys

from mlaas.platform.config import PlatformConfig

__all__ = ["run_server", "configure_logging"]


def configure_logging(level: int = logging.INFO) -> None:
    """Send the ``mlaas`` loggers to stderr (uvicorn configures only its own)."""
    logger = logging.getLogger("mlaas")
    if not any(getattr(h, "_mlaas", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._mlaas = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)


def run_server(config: PlatformConfig) -> None:
    """Serve the platform on ``config.host:config.port`` until SIGINT or SIGTERM.

    Args:
        config (PlatformConfig): the server's settings (see :func:`load_config`).

    On shutdown the job manager stops watching; job processes it started are
    picked up again (or requeued to resume) by the next start on the same data.
    """
    import uvicorn

    from mlaas.platform.app import create_platform_app

    configure_logging()
    app = create_platform_app(config)
    # proxy_headers=False: the peer address is the socket's. With uvicorn's default, a
    # client on 127.0.0.1 could set X-Forwarded-For and pose as a --trust-proxy-from
    # proxy (tests/platform/test_proxy_auth.py, test_server_auth.py).
    uvicorn.run(app, host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=5, proxy_headers=False)
