"""Serving: the model registry and the HTTP app.

Layer: serving. :func:`create_app` (:mod:`mlaas.serve.app`) builds the
FastAPI app over a :class:`Registry` (:mod:`mlaas.serve.registry`);
:func:`mlaas.serve.server.create_server` adds KServe v2 and batching, and
every model route asks a :class:`mlaas.serve.access.ModelAccess` policy.
HTTP statuses of errors are :mod:`mlaas.serve.http_errors`. Names are
imported lazily, so importing a submodule (``mlaas.serve.protocol``) does not
pull in the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlaas.serve.access import AllowAll, ModelAccess
    from mlaas.serve.app import create_app
    from mlaas.serve.registry import ModelNotFound, Registry
    from mlaas.serve.server import create_server

__all__ = ["create_app", "create_server", "Registry", "ModelNotFound", "ModelAccess",
           "AllowAll"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from mlaas.serve.app import create_app

        return create_app
    if name == "create_server":
        from mlaas.serve.server import create_server

        return create_server
    if name in ("Registry", "ModelNotFound"):
        from mlaas.serve import registry

        return getattr(registry, name)
    if name in ("ModelAccess", "AllowAll"):
        from mlaas.serve import access

        return getattr(access, name)
    raise AttributeError(f"module 'mlaas.serve' has no attribute {name!r}")
