"""Who is asking: the :class:`Principal` every request resolves to.

Layer: platform. Authentication (single-user mode, OIDC tokens, personal
API tokens, a trusted proxy) only produces a Principal; authorisation
(:mod:`mlaas.platform.authz`) only consumes one. Keeping the two apart means
a new way of logging in never changes who may do what.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Principal", "LOCAL_USER", "ADMIN_ROLE", "SCOPES"]

ADMIN_ROLE = "admin"

SCOPES = frozenset({"read", "submit", "predict"})
"""Scopes a personal API token may carry; a login (OIDC, single user) has all of them."""


@dataclass(frozen=True)
class Principal:
    """A user, the groups they belong to, and their roles.

    Args:
        user (str): stable identifier (the token's ``sub``; ``local`` in single-user mode).
        groups (tuple of str): group names as the identity provider spells them
            (``/cms``, ``/cms/higgs``); the first is the default group of new objects.
        roles (frozenset of str): ``admin`` sees and manages everything.
        display_name (str): for humans (``preferred_username``); never used for access.
        scopes (frozenset of str or None): what a personal token may do; ``None`` is
            a full login.
    """

    user: str
    groups: tuple[str, ...] = ()
    roles: frozenset[str] = field(default_factory=frozenset)
    display_name: str = ""
    scopes: frozenset[str] | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    @property
    def primary_group(self) -> str:
        """The group new objects belong to: the first group, else the user's own name."""
        return self.groups[0] if self.groups else self.user

    def in_group(self, group: str | None) -> bool:
        return group is not None and group in self.groups

    def has_scope(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


LOCAL_USER = Principal(user="local", groups=("local",), roles=frozenset({ADMIN_ROLE}),
                       display_name="local user")
"""Single-user mode: the one user of an embedded server, who is also its admin."""
