"""Who may use which model: the access hook every model route of the server calls.

Layer: serving (policy seam). The inference app does not know about users;
the platform that mounts it does. So :func:`mlaas.serve.server.create_server`
and :func:`mlaas.serve.app.create_app` take a :class:`ModelAccess` and call
it on every route that touches a model, before touching it:

=================================================  =========================================
route                                              hook
=================================================  =========================================
GET /api/models, GET /models                       ``visible(request, names)``
POST /api/models/{name}                            ``on_upload(request, name)``, then
                                                   ``after_upload(request, name, version)``
POST /upload                                       ``authenticate(request)``, then
                                                   ``on_upload(request, name)``, then
                                                   ``after_upload(request, name, version)``
GET /api/models/{name}[/versions/{v}]              ``check(request, "read", name)``
POST /api/models/{name}/predict                    ``check(request, "read", name)``
POST /json                                         ``authenticate(request)``, then
                                                   ``check(request, "read", name)``
GET /v2/models/{name}[/versions/{v}][/ready]       ``check(request, "read", name)``
POST /v2/models/{name}[/versions/{v}]/infer        ``check(request, "read", name)``
GET /api/models/{name}/serving                     ``check(request, "read", name)``
DELETE /api/models/{name}/versions/{v}             ``check(request, "write", name)``
PUT|DELETE /api/models/{name}/aliases/{alias}      ``check(request, "write", name)``
PUT /api/models/{name}/serving                     ``check(request, "write", name)``
DELETE /delete/{model}                             ``check(request, "write", name)``
=================================================  =========================================

Routes whose model name is in the body (``POST /json``: the name is a field
of the JSON; ``POST /upload``: a field of the multipart form) first call the
optional ``authenticate(request)`` hook, before reading the body, so an
anonymous caller gets 401 whatever it sends and no form is parsed for it;
the model hook runs once the name is known. A policy without
``authenticate`` relies on its model hooks alone.

Hooks raise :mod:`mlaas.errors` classes, which the app answers as
:class:`~mlaas.errors.NotFound` 404 (missing *or* hidden, so names cannot be
probed), :class:`~mlaas.errors.Forbidden` 403,
:class:`~mlaas.errors.Unauthorized` 401 with ``WWW-Authenticate: Bearer``
and :class:`~mlaas.errors.RateLimited` 429 with ``Retry-After``.

Once ``on_upload`` has allowed an upload, the optional
``after_upload(request, name, version)`` hook hears how it ended: ``version``
is the new version, or None when the upload failed (a corrupt or oversized
bundle, a body over the limit, a client gone). A policy that records
something in ``on_upload`` (the platform claims a new name for the caller)
undoes it there when the upload failed, so a refused upload leaves no trace.

A policy may also set ``reveal_names = True`` (AllowAll does): only then do
404 answers for an unknown model suggest similar model names ("did you
mean"), which are taken from the whole registry.

Hooks are plain (blocking) functions, since a real policy asks a database:
the app calls them in a worker thread. An implementation that never blocks
may set the class attribute ``blocking = False``; it is then called on the
event loop, which saves a thread hop per request (:class:`AllowAll` does).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

__all__ = ["ModelAccess", "AllowAll", "Action", "access_of", "authenticate", "check",
           "on_upload", "after_upload", "visible"]

Action = Literal["read", "write"]


class ModelAccess(Protocol):
    """The access policy of the model server (see the module docstring for where each
    hook is called).

    Optional class attributes: ``blocking`` (default True) says whether the
    hooks may block, ``reveal_names`` (default False) whether a 404 may suggest
    other model names; see the module docstring.
    """

    def check(self, request: Request, action: Action, name: str) -> None:
        """Raise unless the caller may ``action`` the model ``name``.

        ``read`` covers metadata, readiness, get, predict and infer; ``write``
        covers deleting versions or the model, changing aliases and the model's
        batching settings. Raise
        :class:`~mlaas.errors.NotFound` when the caller may not even see the
        model, :class:`~mlaas.errors.Forbidden` when they may see but not change it.
        """
        ...

    def on_upload(self, request: Request, name: str) -> dict[str, Any]:
        """Called before a new version of ``name`` is created; raise if the caller may
        not add versions to it.

        Returns extra metadata stored with the version and shown in its
        description under ``metadata`` (e.g. ``{"owner": ..., "job_id": ...}``);
        it must be JSON-serialisable. May record ownership of a new name.
        """
        ...

    def visible(self, request: Request, names: list[str]) -> list[str]:
        """The subset of ``names`` the caller may see (model listings)."""
        ...

    # Optional: ``authenticate(request) -> None``, raising (Unauthorized, or Forbidden
    # / RateLimited for what the route demands of the caller) unless the request has
    # a caller allowed on this route at all. Called before a route reads a body
    # that holds the model name (see the module docstring); must be cheap.
    #
    # Optional: ``after_upload(request, name, version: int | None) -> None``, called
    # after every upload ``on_upload`` allowed: the new version, or None when it
    # failed (see the module docstring). It should not raise: on a failed upload
    # the client is answered the upload's own error.


class AllowAll:
    """Everything allowed: the policy of a stand-alone ``mlaas serve``."""

    blocking = False
    reveal_names = True

    def check(self, request: Request, action: Action, name: str) -> None:
        return None

    def on_upload(self, request: Request, name: str) -> dict[str, Any]:
        return {}

    def visible(self, request: Request, names: list[str]) -> list[str]:
        return list(names)


_ALLOW_ALL = AllowAll()


def access_of(request: Request) -> ModelAccess:
    """The app's policy; an app built without one (a bare router in a test app) allows all,
    like :func:`~mlaas.serve.app.create_app`'s default."""
    access: ModelAccess | None = getattr(request.app.state, "access", None)
    return access if access is not None else _ALLOW_ALL


async def authenticate(request: Request) -> None:
    """Run the app's optional ``authenticate`` hook (nothing when the policy has none)."""
    access = access_of(request)
    hook = getattr(access, "authenticate", None)
    if hook is None:
        return
    if getattr(access, "blocking", True):
        await run_in_threadpool(hook, request)
    else:
        hook(request)


async def check(request: Request, action: Action, name: str) -> None:
    """Run the app's ``check`` hook for ``name`` (off the loop unless it never blocks)."""
    access = access_of(request)
    if getattr(access, "blocking", True):
        await run_in_threadpool(access.check, request, action, name)
    else:
        access.check(request, action, name)


async def on_upload(request: Request, name: str) -> dict[str, Any]:
    """Run the app's ``on_upload`` hook; returns the metadata to store with the version."""
    access = access_of(request)
    if getattr(access, "blocking", True):
        extra = await run_in_threadpool(access.on_upload, request, name)
    else:
        extra = access.on_upload(request, name)
    return dict(extra or {})


async def after_upload(request: Request, name: str, version: int | None) -> None:
    """Run the app's optional ``after_upload`` hook (nothing when the policy has none)."""
    access = access_of(request)
    hook = getattr(access, "after_upload", None)
    if hook is None:
        return
    if getattr(access, "blocking", True):
        await run_in_threadpool(hook, request, name, version)
    else:
        hook(request, name, version)


async def visible(request: Request, names: list[str]) -> list[str]:
    """Run the app's ``visible`` hook; keeps the order of ``names``."""
    access = access_of(request)
    if getattr(access, "blocking", True):
        allowed = await run_in_threadpool(access.visible, request, list(names))
    else:
        allowed = access.visible(request, list(names))
    keep = set(allowed)
    return [n for n in names if n in keep]
