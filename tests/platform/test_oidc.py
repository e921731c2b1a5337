"""OIDC bearer tokens against a real issuer on 127.0.0.1 (tests/support/oidc_issuer.py).

Tokens are obtained through the issuer's /token endpoint (client_credentials
and password grants); keys come over HTTP from its discovery document and
JWKS. Forged tokens (alg none, HS256 keyed with the public key, tampered
payload, unknown kid) are built here the way an attacker would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from support.oidc_issuer import OidcIssuer

from mlaas.errors import SpecError, Unauthorized
from mlaas.platform.auth.oidc import OidcValidator, claims_to_principal, user_id

pytestmark = pytest.mark.network

AUD = "mlaas-test"
GROUPS = ["/cms", "/cms/higgs"]


class FakeClock:
    """A monotonic clock the test moves by hand (for the refetch interval)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(audience=AUD) as iss:
        iss.add_client("ci", "ci-secret", sub="sub-ci", preferred_username="ci-bot",
                       wlcg_groups=GROUPS)
        iss.add_user("alice", "pw-alice", sub="sub-alice", wlcg_groups="/cms /atlas /cms")
        yield iss


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def validator(issuer: OidcIssuer, clock: FakeClock) -> Iterator[OidcValidator]:
    v = OidcValidator([issuer.url], AUD, min_refetch_interval_s=30, clock=clock)
    yield v
    v.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return (jwt.get_unverified_header(token),
            jwt.decode(token, options={"verify_signature": False}))


def _rejected(validator: OidcValidator, token: str, match: str) -> Unauthorized:
    with pytest.raises(Unauthorized, match=match) as info:
        validator.validate(token)
    assert token not in str(info.value)
    assert token.split(".")[-1] not in str(info.value) or not token.split(".")[-1]
    return info.value


# ------------------------------------------------------------------- good


def test_client_credentials_token_gives_principal_with_wlcg_groups(
        issuer: OidcIssuer, validator: OidcValidator) -> None:
    token = issuer.client_token("ci", "ci-secret")
    principal = validator.principal(token, admin_group=None)
    assert principal.user == "sub-ci"
    assert principal.groups == ("/cms", "/cms/higgs")
    assert principal.display_name == "ci-bot"
    assert not principal.is_admin
    assert principal.scopes is None  # a login carries every scope
    assert issuer.hits["/.well-known/openid-configuration"] == 1
    assert issuer.hits["/jwks"] == 1


def test_password_grant_space_separated_groups_and_admin_group(
        issuer: OidcIssuer, validator: OidcValidator) -> None:
    token = issuer.password_token("alice", "pw-alice")
    principal = validator.principal(token, admin_group="/atlas")
    assert principal.user == "sub-alice"
    assert principal.groups == ("/cms", "/atlas")  # order kept, duplicate dropped
    assert principal.display_name == "alice"
    assert principal.is_admin


def test_keys_are_cached_between_tokens(issuer: OidcIssuer,
                                        validator: OidcValidator) -> None:
    for _ in range(3):
        validator.validate(issuer.client_token("ci", "ci-secret"))
    assert issuer.hits["/jwks"] == 1
    assert issuer.hits["/.well-known/openid-configuration"] == 1


def test_es256_issuer() -> None:
    with OidcIssuer(alg="ES256", audience=AUD) as iss:
        iss.add_client("c", "s", sub="ec-user", groups=["g1", "g2"])
        v = OidcValidator([iss.url], AUD)
        try:
            token = iss.client_token("c", "s")
            assert _unverified(token)[0]["alg"] == "ES256"
            principal = v.principal(token)
        finally:
            v.close()
    assert principal.user == "ec-user"
    assert principal.groups == ("g1", "g2")  # 'groups' when there is no wlcg.groups


def test_audience_list_containing_ours_is_accepted(issuer: OidcIssuer,
                                                   validator: OidcValidator) -> None:
    issuer.add_client("multi", "s", aud=["other", AUD])
    assert validator.validate(issuer.client_token("multi", "s"))["sub"] == "multi"


def test_token_endpoint_refuses_wrong_secret(issuer: OidcIssuer) -> None:
    r = httpx.post(f"{issuer.url}/token", data={"grant_type": "client_credentials"},
                   auth=("ci", "wrong"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = httpx.post(f"{issuer.url}/token", data={"grant_type": "password",
                                                "username": "alice", "password": "x"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


# -------------------------------------------------------------------- bad


def test_expired_token(issuer: OidcIssuer, validator: OidcValidator) -> None:
    issuer.add_client("old", "s", lifetime_s=-3600)
    _rejected(validator, issuer.client_token("old", "s"), "expired")


def test_expired_within_leeway_is_accepted(issuer: OidcIssuer,
                                           validator: OidcValidator) -> None:
    issuer.add_client("skew", "s", lifetime_s=-5)  # leeway is 30 s
    assert validator.validate(issuer.client_token("skew", "s"))["sub"] == "skew"


def test_not_yet_valid_token(issuer: OidcIssuer, validator: OidcValidator) -> None:
    issuer.add_client("future", "s", not_before_s=3600, lifetime_s=7200)
    _rejected(validator, issuer.client_token("future", "s"), "not yet valid")


def test_issued_in_the_future(issuer: OidcIssuer, validator: OidcValidator) -> None:
    issuer.add_client("iat", "s", iat=int(time.time()) + 3600, lifetime_s=7200)
    _rejected(validator, issuer.client_token("iat", "s"), "not yet valid")


def test_wrong_audience(issuer: OidcIssuer, validator: OidcValidator) -> None:
    issuer.add_client("aud", "s", aud="someone-else")
    _rejected(validator, issuer.client_token("aud", "s"), "audience")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud"])
def test_missing_required_claim(issuer: OidcIssuer, validator: OidcValidator,
                                claim: str) -> None:
    issuer.add_client("partial", "s", **{claim: None})
    _rejected(validator, issuer.client_token("partial", "s"), repr(claim) if claim != "aud"
              else "aud")


def test_wrong_issuer_is_never_fetched(issuer: OidcIssuer, validator: OidcValidator) -> None:
    with OidcIssuer(audience=AUD) as other:
        other.add_client("ci", "ci-secret", sub="sub-ci")
        token = other.client_token("ci", "ci-secret")
        _rejected(validator, token, "not one of the configured issuers")
        assert other.hits["/.well-known/openid-configuration"] == 0
        assert other.hits["/jwks"] == 0
    assert issuer.hits["/jwks"] == 0


def test_claimed_issuer_with_foreign_signature(issuer: OidcIssuer,
                                               validator: OidcValidator) -> None:
    """A token naming our issuer but signed by another key with the same kid."""
    good = issuer.client_token("ci", "ci-secret")
    header, claims = _unverified(good)
    with OidcIssuer(audience=AUD) as other:
        forged = jwt.encode(claims, other.active_key.private, algorithm="RS256",
                            headers={"kid": header["kid"]})
    _rejected(validator, forged, "signature does not verify")


def test_alg_none(issuer: OidcIssuer, validator: OidcValidator) -> None:
    header, claims = _unverified(issuer.client_token("ci", "ci-secret"))
    for alg in ("none", "None", "NONE"):
        forged = (_b64(json.dumps({"alg": alg, "typ": "JWT", "kid": header["kid"]}).encode())
                  + "." + _b64(json.dumps(claims).encode()) + ".")
        _rejected(validator, forged, "algorithm")
    assert issuer.hits["/jwks"] == 0  # refused before any key was fetched


def test_hs256_keyed_with_the_public_key(issuer: OidcIssuer,
                                         validator: OidcValidator) -> None:
    header, claims = _unverified(issuer.client_token("ci", "ci-secret"))
    pem = issuer.active_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_json = json.dumps(issuer.active_key.public_jwk).encode()
    for secret in (pem, jwk_json):
        signing_input = (_b64(json.dumps({"alg": "HS256", "typ": "JWT",
                                          "kid": header["kid"]}).encode())
                         + "." + _b64(json.dumps(claims).encode()))
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        _rejected(validator, signing_input + "." + _b64(sig), "'HS256' is not allowed")


def test_allowed_algorithm_list_is_enforced(issuer: OidcIssuer, clock: FakeClock) -> None:
    only_es = OidcValidator([issuer.url], AUD, algorithms=["ES256"], clock=clock)
    try:
        _rejected(only_es, issuer.client_token("ci", "ci-secret"), "'RS256' is not allowed")
    finally:
        only_es.close()


def test_tampered_payload(issuer: OidcIssuer, validator: OidcValidator) -> None:
    token = issuer.client_token("ci", "ci-secret")
    head, _, sig = token.split(".")
    _, claims = _unverified(token)
    claims["wlcg.groups"] = ["/admins"]
    claims["sub"] = "someone-else"
    tampered = head + "." + _b64(json.dumps(claims).encode()) + "." + sig
    _rejected(validator, tampered, "signature does not verify")


def test_algorithm_not_matching_the_key(issuer: OidcIssuer,
                                        validator: OidcValidator) -> None:
    """An ES256 token pointing at the RS256 key's kid cannot be verified by it."""
    header, claims = _unverified(issuer.client_token("ci", "ci-secret"))
    with OidcIssuer(alg="ES256", audience=AUD) as other:
        forged = jwt.encode(claims, other.active_key.private, algorithm="ES256",
                            headers={"kid": header["kid"]})
    _rejected(validator, forged, "does not match key")


@pytest.mark.parametrize("garbage", ["x", "a.b.c", "...", "eyJhbGciOiJSUzI1NiJ9.e30",
                                     "Bearer abc"])
def test_malformed_tokens(validator: OidcValidator, garbage: str) -> None:
    with pytest.raises(Unauthorized, match="not a well-formed JWT|not allowed|not one of"):
        validator.validate(garbage)


# ----------------------------------------------------------- key rotation


def test_rotation_new_kid_triggers_one_refetch(issuer: OidcIssuer, validator: OidcValidator,
                                               clock: FakeClock) -> None:
    old_token = issuer.client_token("ci", "ci-secret")
    validator.validate(old_token)
    assert issuer.hits["/jwks"] == 1
    old_kid = issuer.active_kid
    clock.advance(31)
    new_kid = issuer.rotate()
    new_token = issuer.client_token("ci", "ci-secret")
    assert _unverified(new_token)[0]["kid"] == new_kid != old_kid
    assert validator.principal(new_token).user == "sub-ci"
    assert issuer.hits["/jwks"] == 2
    validator.validate(old_token)  # both keys published: old tokens still verify
    assert issuer.hits["/jwks"] == 2
    assert issuer.hits["/.well-known/openid-configuration"] == 1

    issuer.retire(old_kid)
    clock.advance(validator.jwks_max_age_s)  # the cached JWKS ages out
    _rejected(validator, old_token, "not among the keys")
    assert issuer.hits["/jwks"] == 3
    assert validator.validate(new_token)["sub"] == "sub-ci"


def test_rotation_inside_the_refetch_interval_waits(issuer: OidcIssuer,
                                                    validator: OidcValidator,
                                                    clock: FakeClock) -> None:
    validator.validate(issuer.client_token("ci", "ci-secret"))
    issuer.rotate()
    new_token = issuer.client_token("ci", "ci-secret")
    _rejected(validator, new_token, "not among the keys")
    assert issuer.hits["/jwks"] == 1
    clock.advance(30)
    assert validator.validate(new_token)["sub"] == "sub-ci"
    assert issuer.hits["/jwks"] == 2


def test_flood_of_unknown_kids_is_bounded(issuer: OidcIssuer, validator: OidcValidator,
                                          clock: FakeClock) -> None:
    _, claims = _unverified(issuer.client_token("ci", "ci-secret"))
    key = issuer.active_key

    def forged() -> str:
        return jwt.encode(claims, key.private, algorithm="RS256",
                          headers={"kid": secrets.token_hex(8)})

    for _ in range(25):
        _rejected(validator, forged(), "not among the keys")
    assert issuer.hits["/jwks"] == 1  # the first fetch only
    clock.advance(10)
    for _ in range(25):
        _rejected(validator, forged(), "not among the keys")
    assert issuer.hits["/jwks"] == 1
    clock.advance(25)  # 35 s after the first fetch: one more is allowed
    for _ in range(25):
        _rejected(validator, forged(), "not among the keys")
    assert issuer.hits["/jwks"] == 2
    assert issuer.hits["/.well-known/openid-configuration"] == 1


def test_concurrent_requests_after_rotation_refetch_once(issuer: OidcIssuer,
                                                         validator: OidcValidator,
                                                         clock: FakeClock) -> None:
    """Many request threads meeting the new kid at once: one JWKS fetch, all succeed."""
    validator.validate(issuer.client_token("ci", "ci-secret"))
    clock.advance(60)
    issuer.rotate()
    token = issuer.client_token("ci", "ci-secret")
    barrier = threading.Barrier(8)
    users: list[str] = []

    def request() -> None:
        barrier.wait()
        users.append(validator.principal(token).user)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert users == ["sub-ci"] * 8
    assert issuer.hits["/jwks"] == 2


def test_unreachable_issuer(clock: FakeClock) -> None:
    iss = OidcIssuer(audience=AUD)
    iss.add_client("c", "s")
    with iss:
        token = iss.client_token("c", "s")
    v = OidcValidator([iss.url], AUD, clock=clock)  # the server is gone now
    try:
        _rejected(v, token, "cannot fetch")
        _rejected(v, token, "last fetch failed")  # inside the interval: no new attempt
    finally:
        v.close()


def test_discovery_naming_another_issuer_is_refused(issuer: OidcIssuer,
                                                    clock: FakeClock) -> None:
    alias = issuer.url + "/"  # same server, but the discovery document says issuer.url
    issuer.add_client("alias", "s", iss=alias)
    v = OidcValidator([alias], AUD, clock=clock)
    try:
        _rejected(v, issuer.client_token("alias", "s"), "names issuer")
    finally:
        v.close()


# ---------------------------------------------------------------- mapping


def test_two_issuers_namespace_the_user(issuer: OidcIssuer, clock: FakeClock) -> None:
    with OidcIssuer(audience=AUD) as other:
        other.add_client("ci", "ci-secret", sub="sub-ci")
        v = OidcValidator([issuer.url, other.url], AUD, clock=clock)
        try:
            mine = v.principal(issuer.client_token("ci", "ci-secret"))
            theirs = v.principal(other.client_token("ci", "ci-secret"))
        finally:
            v.close()
    assert mine.user == f"sub-ci@127.0.0.1:{issuer.port}"
    assert theirs.user == f"sub-ci@127.0.0.1:{other.port}"
    assert mine.user != theirs.user


def test_claims_mapping_rules() -> None:
    base = {"iss": "https://iam.example/", "sub": "u1"}
    p = claims_to_principal({**base, "wlcg.groups": ["/cms"], "groups": ["ignored"]})
    assert p.groups == ("/cms",) and p.display_name == "u1" and p.user == "u1"
    p = claims_to_principal({**base, "groups": "a b  c"}, admin_group="b")
    assert p.groups == ("a", "b", "c") and p.is_admin
    p = claims_to_principal({**base, "wlcg.groups": [1, "", "/x", None]})
    assert p.groups == ("/x",)
    p = claims_to_principal({**base, "wlcg.groups": {"not": "a list"}})
    assert p.groups == () and p.primary_group == "u1"
    p = claims_to_principal(base, admin_group="/admins")
    assert not p.is_admin
    assert claims_to_principal(base, namespaced=True).user == "u1@iam.example"
    assert user_id("https://kc.example/realms/cms/", "u@x", namespaced=True) == \
        "u@x@kc.example/realms/cms"
    with pytest.raises(Unauthorized, match="sub"):
        claims_to_principal({"iss": "https://iam.example/", "sub": ""})


# ------------------------------------------------------------ configuration


@pytest.mark.parametrize("kwargs, match", [
    ({"issuers": []}, "at least one issuer"),
    ({"issuers": ["http://iam.example/"]}, "must use https"),
    ({"issuers": ["ftp://iam.example/"]}, "not an http"),
    ({"issuers": ["https://user@iam.example/"]}, "without user info"),
    ({"issuers": ["https://a.example/", "https://a.example/"]}, "listed twice"),
    ({"audience": ""}, "audience"),
    ({"algorithms": ["HS256"]}, "not allowed"),
    ({"algorithms": ["none"]}, "not allowed"),
    ({"algorithms": []}, "not allowed"),
])
def test_bad_configuration(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"issuers": ["https://iam.example/"], "audience": AUD, **kwargs}
    with pytest.raises(SpecError, match=match):
        OidcValidator(args.pop("issuers"), args.pop("audience"), **args)
