"""A real OpenID Connect token issuer on 127.0.0.1 for the auth tests.

Layer: tests (support). It plays the identity provider (an INDIGO IAM or
Keycloak stand-in): a threaded stdlib HTTP server on a free loopback port
serving

- ``GET /.well-known/openid-configuration``: the discovery document;
- ``GET /jwks``: the public keys (JWKS) of the keys not yet retired;
- ``POST /token``: the OAuth2 token endpoint, with the ``client_credentials``
  grant (client authenticated by HTTP Basic or ``client_id``/``client_secret``
  in the form, RFC 6749 section 2.3.1) and the resource-owner ``password``
  grant (section 4.3). Answers ``{"access_token", "token_type": "Bearer",
  "expires_in", "scope"}`` or an RFC 6749 error body.

Tokens are JWTs signed with RS256 or ES256 keys made with ``cryptography``
and encoded with PyJWT. Each client or user carries the claims its tokens
get (``sub``, ``preferred_username``, ``wlcg.groups``, ``aud``, ...) plus
``lifetime_s`` / ``not_before_s`` to mint expired or not-yet-valid tokens.
Keys rotate during a test: :meth:`OidcIssuer.rotate` adds a key with a new
``kid`` and signs with it; :meth:`OidcIssuer.retire` drops a key from the
JWKS. :attr:`OidcIssuer.hits` counts requests per path, so a test can see
how often a validator came back for keys.

Nothing here is a mock: the validator under test talks HTTP to this server
exactly as it would to a production IdP.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

HOST = "127.0.0.1"

__all__ = ["OidcIssuer", "SigningKey"]


@dataclass
class SigningKey:
    """One key pair of the issuer; ``public_jwk`` is what the JWKS shows."""

    kid: str
    alg: str
    private: Any
    public_jwk: dict[str, Any]

    @classmethod
    def generate(cls, alg: str, kid: str | None = None) -> SigningKey:
        if alg == "RS256":
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algo: Any = jwt.algorithms.RSAAlgorithm
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
            algo = jwt.algorithms.ECAlgorithm
        else:
            raise ValueError(f"test issuer signs with RS256 or ES256, not {alg!r}")
        kid = kid or secrets.token_hex(8)
        jwk = algo.to_jwk(private.public_key(), as_dict=True)
        jwk.update({"kid": kid, "alg": alg, "use": "sig"})
        return cls(kid=kid, alg=alg, private=private, public_jwk=jwk)


@dataclass
class _Account:
    secret: str
    claims: dict[str, Any]
    lifetime_s: int
    not_before_s: int
    scope: str = "openid profile wlcg.groups"
    extra: dict[str, Any] = field(default_factory=dict)


class OidcIssuer:
    """A running token issuer; use as a context manager or call start/close.

    Args:
        alg (str): algorithm of the first signing key (``RS256`` or ``ES256``).
        audience (str): default ``aud`` of issued tokens.
    """

    def __init__(self, *, alg: str = "RS256", audience: str = "mlaas") -> None:
        self.audience = audience
        self.keys: list[SigningKey] = [SigningKey.generate(alg)]
        self.active_kid = self.keys[0].kid
        self.hits: Counter[str] = Counter()
        self._clients: dict[str, _Account] = {}
        self._users: dict[str, _Account] = {}
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- lifecycle
    def start(self) -> OidcIssuer:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"oidc-issuer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OidcIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ accounts
    def add_client(self, client_id: str, secret: str, *, lifetime_s: int = 600,
                   not_before_s: int = 0, **claims: Any) -> None:
        """Register a client for the ``client_credentials`` grant.

        ``claims`` become token claims; use ``wlcg_groups=[...]`` for the
        ``wlcg.groups`` claim (dots cannot be keyword names). ``sub``
        defaults to the client id. ``lifetime_s`` < 0 mints expired tokens,
        ``not_before_s`` > 0 tokens that are not valid yet.
        """
        with self._lock:
            self._clients[client_id] = _Account(secret, _claims(claims, client_id),
                                                lifetime_s, not_before_s)

    def add_user(self, username: str, password: str, *, lifetime_s: int = 600,
                 not_before_s: int = 0, **claims: Any) -> None:
        """Register a user for the ``password`` grant; claims as in :meth:`add_client`."""
        claims.setdefault("preferred_username", username)
        with self._lock:
            self._users[username] = _Account(password, _claims(claims, username),
                                             lifetime_s, not_before_s)

    # ---------------------------------------------------------------- keys
    def rotate(self, alg: str | None = None) -> str:
        """Add a new key (new ``kid``) and sign from now on with it; returns the kid."""
        key = SigningKey.generate(alg or self.active_key.alg)
        with self._lock:
            self.keys.append(key)
            self.active_kid = key.kid
        return key.kid

    def retire(self, kid: str) -> None:
        """Drop a key from the JWKS (tokens it signed no longer verify anywhere)."""
        with self._lock:
            self.keys = [k for k in self.keys if k.kid != kid]

    @property
    def active_key(self) -> SigningKey:
        return next(k for k in self.keys if k.kid == self.active_kid)

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [dict(k.public_jwk) for k in self.keys]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/jwks",
            "token_endpoint": f"{self.url}/token",
            "grant_types_supported": ["client_credentials", "password"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf",
                                 "preferred_username", "wlcg.groups", "groups"],
        }

    # --------------------------------------------------------------- tokens
    def mint(self, account: _Account) -> tuple[str, int]:
        """Sign a token for ``account`` with the active key; returns (token, expires_in)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "iat": now,
            "nbf": now + account.not_before_s,
            "exp": now + account.lifetime_s,
            "jti": secrets.token_hex(12),
            "scope": account.scope,
            "wlcg.ver": "1.0",
        }
        claims.update(account.claims)
        claims = {k: v for k, v in claims.items() if v is not None}
        key = self.active_key
        token = jwt.encode(claims, key.private, algorithm=key.alg,
                           headers={"kid": key.kid, "typ": "at+jwt"})
        return token, account.lifetime_s

    def client_token(self, client_id: str, secret: str) -> str:
        """Get a token the standard way: POST /token with the client_credentials grant."""
        import httpx

        r = httpx.post(f"{self.url}/token", data={"grant_type": "client_credentials"},
                       auth=(client_id, secret), timeout=10)
        r.raise_for_status()
        return r.json()["access_token"]  # type: ignore[no-any-return]

    def password_token(self, username: str, password: str) -> str:
        """Get a token the standard way: POST /token with the password grant."""
        import httpx

        r = httpx.post(f"{self.url}/token", data={"grant_type": "password",
                                                  "username": username,
                                                  "password": password}, timeout=10)
        r.raise_for_status()
        return r.json()["access_token"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------- serving
    def _token_endpoint(self, form: dict[str, str],
                        authorization: str | None) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type")
        with self._lock:
            if grant == "client_credentials":
                client_id, secret = form.get("client_id"), form.get("client_secret")
                if authorization and authorization.startswith("Basic "):
                    try:
                        raw = base64.b64decode(authorization[6:], validate=True).decode()
                    except (binascii.Error, UnicodeDecodeError):
                        return 401, {"error": "invalid_client"}
                    cid, _, sec = raw.partition(":")
                    client_id = urllib.parse.unquote_plus(cid)
                    secret = urllib.parse.unquote_plus(sec)
                account = self._clients.get(client_id or "")
            elif grant == "password":
                account = self._users.get(form.get("username", ""))
                secret = form.get("password")
            else:
                return 400, {"error": "unsupported_grant_type"}
        if account is None or secret is None or not secrets.compare_digest(
                account.secret, secret):
            error = "invalid_client" if grant == "client_credentials" else "invalid_grant"
            return (401 if error == "invalid_client" else 400), {"error": error}
        token, expires_in = self.mint(account)
        return 200, {"access_token": token, "token_type": "Bearer",
                     "expires_in": expires_in, "scope": account.scope}

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet tests
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                with issuer._lock:
                    issuer.hits[path] += 1
                if path == "/.well-known/openid-configuration":
                    self._send(200, issuer.discovery())
                elif path == "/jwks":
                    self._send(200, issuer.jwks())
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                with issuer._lock:
                    issuer.hits[path] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                if path != "/token":
                    self._send(404, {"error": "not_found"})
                    return
                if not (self.headers.get("Content-Type") or "").startswith(
                        "application/x-www-form-urlencoded"):
                    self._send(400, {"error": "invalid_request"})
                    return
                form = dict(urllib.parse.parse_qsl(body))
                status, answer = issuer._token_endpoint(form,
                                                        self.headers.get("Authorization"))
                self._send(status, answer)

        return Handler


def _claims(claims: dict[str, Any], default_sub: str) -> dict[str, Any]:
    out = dict(claims)
    if "wlcg_groups" in out:
        out["wlcg.groups"] = out.pop("wlcg_groups")
    out.setdefault("sub", default_sub)
    return out
