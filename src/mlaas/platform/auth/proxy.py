"""Identity headers set by a trusted reverse proxy (oauth2-proxy and the like).

Layer: platform (authentication). Behind oauth2-proxy the user logs in at
the proxy, which forwards ``X-Forwarded-User``, ``X-Forwarded-Groups``
(comma-separated) and ``X-Forwarded-Access-Token``. Anybody can send those
headers, so they mean something only when the TCP peer is the proxy: this
module reads them only when the peer address is inside one of the
``--trust-proxy-from`` networks, and otherwise acts as if they were absent.

The peer is the socket's address (``request.client.host``), never an
``X-Forwarded-For`` value, which the client controls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mlaas.errors import ConfigError
from mlaas.platform.auth.oidc import parse_groups
from mlaas.platform.principal import ADMIN_ROLE, Principal

__all__ = ["TrustedProxies", "ForwardedIdentity", "USER_HEADER", "GROUPS_HEADER",
           "TOKEN_HEADER", "NAME_HEADER"]

USER_HEADER = "X-Forwarded-User"
GROUPS_HEADER = "X-Forwarded-Groups"
TOKEN_HEADER = "X-Forwarded-Access-Token"
NAME_HEADER = "X-Forwarded-Preferred-Username"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ForwardedIdentity:
    """What a trusted proxy said about the user; ``access_token`` wins when present."""

    user: str | None
    groups: tuple[str, ...]
    display_name: str | None
    access_token: str | None

    def principal(self, admin_group: str | None = None) -> Principal | None:
        """The user the proxy vouches for (no token involved), or None without a user."""
        if not self.user:
            return None
        roles = (frozenset({ADMIN_ROLE}) if admin_group and admin_group in self.groups
                 else frozenset())
        return Principal(user=self.user, groups=self.groups, roles=roles,
                         display_name=self.display_name or self.user)


class TrustedProxies:
    """The networks whose peers may set identity headers.

    Args:
        cidrs (iterable of str): ``10.0.0.5/32``, ``192.168.0.0/24``,
            ``::1/128``; a bare address means that one host. Host bits set
            (``10.0.0.5/8``) are an error, since they usually hide a typo.
    """

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        networks: list[Network] = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=True))
            except ValueError as exc:
                raise ConfigError(f"--trust-proxy-from {cidr!r} is not a network in CIDR "
                                  f"notation: {exc}", field_path="auth.trusted_proxies"
                                  ) from None
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"

    def trusts(self, peer: str | None) -> bool:
        """True if ``peer`` (an IP address string) is inside a trusted network."""
        if not peer or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False  # a Unix socket path, a test client name: not a proxy we know
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks)

    def identity(self, peer: str | None,
                 headers: Mapping[str, str]) -> ForwardedIdentity | None:
        """The forwarded identity if ``peer`` is trusted and sent any; else None.

        ``headers`` must be case-insensitive (Starlette's ``Headers`` is).
        From an untrusted peer the headers are ignored entirely.
        """
        if not self.trusts(peer):
            return None
        user = (headers.get(USER_HEADER) or "").strip() or None
        token = (headers.get(TOKEN_HEADER) or "").strip() or None
        if user is None and token is None:
            return None
        return ForwardedIdentity(
            user=user,
            groups=parse_groups(headers.get(GROUPS_HEADER) or "", sep=","),
            display_name=(headers.get(NAME_HEADER) or "").strip() or None,
            access_token=token)
