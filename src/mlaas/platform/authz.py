"""The one authorisation function: may this principal do this to that object?

Layer: platform. Every endpoint that touches a stored object calls
:func:`authorize` (or :func:`can_read` to filter a listing); no route
decides access on its own. Objects the caller may not read raise
:class:`~mlaas.errors.NotFound`, exactly like objects that do not exist,
so ids cannot be probed; objects the caller may read but not change raise
:class:`~mlaas.errors.Forbidden`.

Rules:

- admins may do anything;
- the owner may do anything to their object;
- ``read`` (and ``predict`` on models) is allowed to members of the object's
  group when its visibility is ``group``, and to everybody when ``public``;
- ``write`` (change, cancel, delete) only to the owner and admins.
"""

from __future__ import annotations

from typing import Literal, Protocol

from mlaas.errors import Forbidden, NotFound
from mlaas.platform.principal import Principal

__all__ = ["Action", "Owned", "authorize", "can_read"]

Action = Literal["read", "write"]


class Owned(Protocol):
    @property
    def owner(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def visibility(self) -> str: ...


def can_read(principal: Principal, obj: Owned) -> bool:
    if principal.is_admin or obj.owner == principal.user:
        return True
    if obj.visibility == "public":
        return True
    return obj.visibility == "group" and principal.in_group(obj.group)


def authorize(principal: Principal, action: Action, obj: Owned, *, kind: str,
              name: str) -> None:
    """Raise unless ``principal`` may ``action`` the object ``kind`` ``name``.

    Args:
        kind, name: how errors name the object (``job``, ``"3f2a..."``); the
            message is the same whether the object is missing or hidden.
    """
    if not can_read(principal, obj):
        raise NotFound(f"no {kind} named {name!r}")
    if action == "write" and not (principal.is_admin or obj.owner == principal.user):
        raise Forbidden(f"{kind} {name!r} belongs to someone else; only its owner may change it")
