"""Who may use which model on the platform: the ModelAccess hook of the mounted model server.

Layer: platform (policy seam, see :mod:`mlaas.serve.access`). The model
server only knows names; the platform knows owners. Each registry name has a
:class:`~mlaas.platform.records.ModelRecord` in the store (owner, group,
visibility), and every check goes through
:func:`mlaas.platform.authz.authorize`, like jobs and files:

- ``check``: the name's record, then ``authorize`` (404 for names the caller
  may not read, or that nobody owns; admins pass, so they can clean up models
  that were put in the registry directory by hand);
- ``on_upload``: the first upload of a new name claims it for the caller
  (``store.ensure_model``); later uploads need ``write`` on it. The version's
  metadata records who uploaded it;
- ``after_upload``: a claim whose upload failed (a corrupt or oversized
  bundle, a body over the limit) is dropped again, unless the registry has
  versions of the name or another upload of it is still running here (the
  last of those to end then decides), so a refused upload does not keep the
  name from others. The claim is made
  before the body is read (so nobody else can take the name meanwhile) and
  rolled back, rather than made after the upload, which would let two users'
  first uploads of one name both land in the registry;
- ``visible``: the names whose record the caller may read.

Jobs register their bundles through the job manager, not through here.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from starlette.requests import Request

from mlaas.errors import InvalidName, NotFound
from mlaas.platform.authz import authorize, can_read
from mlaas.platform.deps import PlatformContext, get_principal
from mlaas.platform.principal import Principal
from mlaas.serve.access import Action
from mlaas.serve.registry import NAME_PATTERN

__all__ = ["PlatformModelAccess"]

log = logging.getLogger("mlaas.platform")

_NAME = re.compile(NAME_PATTERN)


class PlatformModelAccess:
    """The platform's :class:`~mlaas.serve.access.ModelAccess` (blocking: it asks the store).

    The store and the caller come from the request (``app.state.platform`` and
    ``app.state.authenticator``), so one instance serves the whole app.
    """

    blocking = True

    def __init__(self) -> None:
        self._uploading: dict[str, int] = {}  # name -> uploads allowed and not yet ended
        # names that one of the uploads running now claimed (created in the store): the
        # claim is the running uploads', so the last of them to end drops it if all failed
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def _started(self, name: str) -> None:
        with self._lock:
            self._uploading[name] = self._uploading.get(name, 0) + 1

    def _claim(self, name: str) -> None:
        with self._lock:
            self._claimed.add(name)

    def _ended(self, name: str) -> bool:
        """Count one upload of ``name`` as ended; True when it was the last one running
        and one of the uploads since the name was last free claimed it."""
        with self._lock:
            left = self._uploading.get(name, 1) - 1
            if left > 0:
                self._uploading[name] = left
                return False
            self._uploading.pop(name, None)
            claimed = name in self._claimed
            self._claimed.discard(name)
            return claimed

    @staticmethod
    def _context(request: Request) -> tuple[PlatformContext, Principal]:
        return request.app.state.platform, get_principal(request)

    def authenticate(self, request: Request) -> None:
        """The caller, its token's scope and rate limit, before a body is read."""
        get_principal(request)

    def check(self, request: Request, action: Action, name: str) -> None:
        ctx, principal = self._context(request)
        try:
            record = ctx.store.get_model(name)
        except NotFound:
            if principal.is_admin:
                return  # the registry answers 404 itself if the name is not there either
            raise NotFound(f"no model named {name!r}") from None
        authorize(principal, action, record, kind="model", name=name)

    def on_upload(self, request: Request, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidName(f"model {name!r} is not valid: use 1 to 64 letters, digits, '.', "
                              "'_' or '-', starting with a letter or digit", field="model")
        ctx, principal = self._context(request)
        self._started(name)  # before the claim: a concurrent failure must not drop it
        try:
            record, created = ctx.store.ensure_model(name, owner=principal.user,
                                                     group=principal.primary_group)
            authorize(principal, "write", record, kind="model", name=name)
        except BaseException:
            self._ended(name)
            raise
        if created:
            self._claim(name)
        return {"uploaded_by": principal.user, "owner": record.owner}

    def after_upload(self, request: Request, name: str, version: int | None) -> None:
        claimed_and_last = self._ended(name)
        if version is not None or not claimed_and_last:
            return
        try:
            if request.app.state.registry.versions(name):
                return  # versions came some other way (a job, another server): keep it
            request.app.state.platform.store.delete_model(name)
            log.info("model name %r released: its first upload failed", name)
        except NotFound:
            pass
        except Exception:  # noqa: BLE001 - the client gets the upload's own error
            log.exception("could not release the claim on model name %r", name)

    def visible(self, request: Request, names: list[str]) -> list[str]:
        ctx, principal = self._context(request)
        records = {m.name: m for m in ctx.store.list_models()}
        return [n for n in names
                if (n in records and can_read(principal, records[n]))
                or (n not in records and principal.is_admin)]
