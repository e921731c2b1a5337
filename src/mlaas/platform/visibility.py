"""Who may read a job or a model, as users write it: ``private``, ``group:<name>``, ``public``.

Layer: platform (authorisation input). The store keeps a visibility
(``private``, ``group``, ``public``: :data:`mlaas.platform.records.VISIBILITIES`)
and a group on every object; :func:`mlaas.platform.authz.can_read` decides
on those two. Users name both at once: ``group:/cms/higgs`` means "members
of ``/cms/higgs`` may read it". This module is the one place that turns that
text into ``(visibility, group)`` and back, and that refuses sharing with a
group the caller does not belong to (admins may name any group), so every
route (``PUT /api/models/{name}/visibility``, ``POST /api/jobs``) applies the
same rule.
"""

from __future__ import annotations

from typing import Any

from mlaas.errors import Forbidden, SpecError
from mlaas.platform.principal import Principal

__all__ = ["parse_visibility", "format_visibility", "MAX_GROUP", "SYNTAX"]

MAX_GROUP = 255
"""Longest group name (the ``group`` columns are 255 characters)."""

SYNTAX = "'private', 'public' or 'group:<name>' (a group you belong to, e.g. 'group:/cms')"


def parse_visibility(text: Any, principal: Principal, *, field: str = "visibility"
                     ) -> tuple[str, str | None]:
    """``(visibility, group)`` for ``text``; ``group`` is None unless ``group:<name>``.

    Args:
        text: what the user sent (``private``, ``public``, ``group:<name>``).
        principal: the caller; ``group:<name>`` needs ``principal.in_group(name)``
            unless they are an admin.
        field: how errors name the input (``visibility``).

    Raises :class:`~mlaas.errors.SpecError` (HTTP 422, ``problems`` naming
    ``field``) for malformed text, :class:`~mlaas.errors.Forbidden` (403) for a
    group the caller is not in.
    """
    if not isinstance(text, str):
        raise SpecError(f"{field} must be a string: {SYNTAX}",
                        [(field, f"expected a string, got {type(text).__name__}")])
    value = text.strip()
    if value in ("private", "public"):
        return value, None
    kind, sep, group = value.partition(":")
    if kind != "group" or not sep:
        raise SpecError(f"{field} {text[:80]!r} is not valid: use {SYNTAX}",
                        [(field, f"{text[:80]!r} is not one of {SYNTAX}")])
    if (not group or len(group) > MAX_GROUP or not group.isprintable()
            or any(c.isspace() for c in group)):
        raise SpecError(f"{field} {text[:80]!r} names no valid group",
                        [(field, f"give 'group:<name>' with a group name of 1 to {MAX_GROUP} "
                                 "printable characters and no spaces")])
    if not (principal.is_admin or principal.in_group(group)):
        raise Forbidden(f"{field} {value!r}: you are not a member of group {group!r}; "
                        f"you may share with: "
                        f"{', '.join(principal.groups) or 'no group'}", field=field)
    return "group", group


def format_visibility(visibility: str, group: str) -> str:
    """The user-facing form of a stored ``(visibility, group)``: ``group:/cms`` etc."""
    return f"group:{group}" if visibility == "group" else visibility
