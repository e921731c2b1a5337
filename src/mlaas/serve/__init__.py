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
    from mlaas.serve.app import create_app
    from mlaas.serve.registry import ModelNotFound, Registry

__all__ = ["create_app", "Registry", "ModelNotFound"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from mlaas.serve.app import create_app

        return create_app
    if name in ("Registry", "ModelNotFound"):
        from mlaas.serve import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mlaas.serve' has no attribute {name!r}")
