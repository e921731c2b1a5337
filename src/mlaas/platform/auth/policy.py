"""What each route asks of its caller beyond who they are: a token scope and a rate limit.

Layer: platform (request admission). Authentication says who is asking;
:func:`mlaas.platform.authz.authorize` says what they may do to an object.
In between sits the kind of request: a personal API token carries scopes
(``read``, ``submit``, ``predict``) and every user has a rate limit on
submissions and on inference. Both are decided here, in one table keyed by
the route (method and path template, as the OpenAPI schema spells them), and
applied in one place: :func:`mlaas.platform.deps.get_principal` calls
:meth:`RoutePolicy.admit` once per request, right after authentication.
Every route that needs a caller resolves its principal there (the platform
routes through ``CurrentPrincipal``, the model server's routes through
:class:`~mlaas.platform.model_access.PlatformModelAccess`), so no route can
skip the check, and none repeats it.

A route missing from :data:`ROUTE_RULES` fails closed for scoped tokens
(403) and is open to full logins; ``tests/platform/test_auth_matrix.py``
checks that every route of the OpenAPI schema that is not public has a rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from mlaas.errors import Forbidden
from mlaas.platform.auth.ratelimit import RateLimiter
from mlaas.platform.principal import Principal

__all__ = ["RoutePolicy", "RouteRule", "ROUTE_RULES", "PUBLIC_ROUTES", "policy_from_config"]

Limit = Literal["submission", "inference"]


@dataclass(frozen=True)
class RouteRule:
    """``scope``: what a personal token needs (None: any token); ``limit``: which bucket."""

    scope: str | None
    limit: Limit | None = None


READ, SUBMIT = RouteRule("read"), RouteRule("submit")
PREDICT = RouteRule("predict", "inference")

ROUTE_RULES: Mapping[tuple[str, str], RouteRule] = {
    # workspace files
    ("GET", "/api/files"): READ,
    ("GET", "/api/files/{path}"): READ,
    ("PUT", "/api/files/{path}"): SUBMIT,
    ("DELETE", "/api/files/{path}"): SUBMIT,
    # personal tokens (creating one needs a login: the route refuses tokens itself)
    ("POST", "/api/tokens"): RouteRule(None),
    ("GET", "/api/tokens"): READ,
    ("DELETE", "/api/tokens/{token_id}"): SUBMIT,
    # jobs
    ("POST", "/api/jobs"): RouteRule("submit", "submission"),
    ("GET", "/api/jobs"): READ,
    ("GET", "/api/jobs/{job_id}"): READ,
    ("GET", "/api/jobs/{job_id}/logs"): READ,
    ("GET", "/api/jobs/{job_id}/metrics"): READ,
    ("POST", "/api/jobs/{job_id}/cancel"): SUBMIT,
    ("GET", "/api/jobs/{job_id}/artifacts"): READ,
    ("GET", "/api/jobs/{job_id}/artifacts/{path}"): READ,
    # accounting (own usage; a group's for its members; everybody's for admins)
    ("GET", "/api/usage"): READ,
    # the farm (PUT /api/queues also checks the admin role itself)
    ("GET", "/api/queues"): READ,
    ("PUT", "/api/queues"): SUBMIT,
    ("GET", "/api/nodes"): READ,
    ("GET", "/api/scaling"): READ,
    # models
    ("GET", "/api/models"): READ,
    ("POST", "/api/models/{name}"): SUBMIT,
    ("GET", "/api/models/{name}"): READ,
    ("GET", "/api/models/{name}/versions/{version}"): READ,
    ("DELETE", "/api/models/{name}/versions/{version}"): SUBMIT,
    ("PUT", "/api/models/{name}/aliases/{alias}"): SUBMIT,
    ("DELETE", "/api/models/{name}/aliases/{alias}"): SUBMIT,
    ("GET", "/api/models/{name}/serving"): READ,
    ("PUT", "/api/models/{name}/serving"): SUBMIT,
    ("POST", "/api/models/{name}/predict"): PREDICT,
    ("GET", "/api/models/{name}/visibility"): READ,
    ("PUT", "/api/models/{name}/visibility"): SUBMIT,
    # TFaaS compatibility
    ("POST", "/json"): PREDICT,
    ("GET", "/models"): READ,
    ("DELETE", "/delete/{model}"): SUBMIT,
    ("POST", "/upload"): SUBMIT,
    # KServe v2
    ("GET", "/v2/models/{name}"): READ,
    ("GET", "/v2/models/{name}/versions/{v}"): READ,
    ("GET", "/v2/models/{name}/ready"): READ,
    ("GET", "/v2/models/{name}/versions/{v}/ready"): READ,
    ("POST", "/v2/models/{name}/infer"): PREDICT,
    ("POST", "/v2/models/{name}/versions/{v}/infer"): PREDICT,
}
"""(method, path template) -> what the route asks of a caller."""

PUBLIC_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/v2/health/live"),
                           ("GET", "/v2/health/ready")})
"""Routes that never ask who is calling (no principal, so no rule)."""


def route_key(request: Request) -> tuple[str, str | None]:
    """``(method, path template)`` of the route that matched ``request`` (HEAD counts as GET)."""
    route = request.scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    method = request.method.upper()
    return ("GET" if method == "HEAD" else method), path


class RoutePolicy:
    """Token scopes and rate limits per route; one instance per app.

    Args:
        limiters (mapping): ``"submission"`` / ``"inference"`` -> RateLimiter
            (a missing kind is unlimited).
        rules (mapping): defaults to :data:`ROUTE_RULES`.
    """

    def __init__(self, limiters: Mapping[str, RateLimiter] | None = None,
                 rules: Mapping[tuple[str, str], RouteRule] = ROUTE_RULES) -> None:
        self.limiters = dict(limiters or {})
        self.rules = rules

    def __repr__(self) -> str:
        limits = {k: f"{v.rate_per_s * 60:g}/min" for k, v in self.limiters.items()}
        return f"RoutePolicy(rules={len(self.rules)}, limits={limits})"

    def admit(self, request: Request, principal: Principal) -> None:
        """Raise unless ``principal`` may make this kind of request now.

        :class:`~mlaas.errors.Forbidden` (403) when a personal token lacks the
        route's scope; :class:`~mlaas.errors.RateLimited` (429, ``Retry-After``)
        when the user's bucket for the route's kind is empty. Scopes are checked
        first, so a refused token does not spend the user's budget.
        """
        method, path = route_key(request)
        rule = self.rules.get((method, path)) if path is not None else None
        if rule is None:
            if principal.scopes is not None:
                raise Forbidden(f"{method} {path or request.url.path} takes no personal API "
                                "token (no scope covers it); use a login")
            return
        if rule.scope is not None and not principal.has_scope(rule.scope):
            raise Forbidden(f"this personal API token lacks the {rule.scope!r} scope that "
                            f"{method} {path} needs (it has: "
                            f"{', '.join(sorted(principal.scopes or ())) or 'none'})")
        limiter = self.limiters.get(rule.limit) if rule.limit is not None else None
        if limiter is not None:
            limiter.check(principal.user)


def policy_from_config(rate_limit_per_minute: int | None, *,
                       clock: Callable[[], float] = time.monotonic) -> RoutePolicy:
    """The policy for ``auth.rate_limit_per_minute``: one submission and one inference
    limiter of that many requests per user per minute (none when it is None)."""
    limiters: dict[str, RateLimiter] = {}
    for kind, name in (("submission", "job submissions"), ("inference", "inference requests")):
        limiter = RateLimiter.per_minute(rate_limit_per_minute, name=name, clock=clock)
        if limiter is not None:
            limiters[kind] = limiter
    return RoutePolicy(limiters)
