"""Personal API tokens on a real database (SQLite and PostgreSQL, tests/platform/conftest.py)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from mlaas.errors import Forbidden, NotFound, QuotaExceeded, SpecError, Unauthorized
from mlaas.platform.auth.tokens import ApiTokenRow, TokenStore, hash_token
from mlaas.platform.db import Database
from mlaas.platform.principal import ADMIN_ROLE, SCOPES, Principal

ALICE = Principal(user="alice", groups=("/cms", "/cms/higgs"), display_name="Alice")
BOB = Principal(user="bob", groups=("/atlas",))
ADMIN = Principal(user="root", groups=("/ops",), roles=frozenset({ADMIN_ROLE}))


class FakeClock:
    """Timezone-aware UTC 'now' that the test moves by hand (for expiry)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens(database: Database, clock: FakeClock) -> TokenStore:
    return TokenStore(database, clock=clock, max_per_user=3)


def test_created_token_is_shown_once_and_stored_hashed(tokens: TokenStore,
                                                       database: Database) -> None:
    new = tokens.create(ALICE, name="ci", scopes=["read", "predict"])
    assert new.secret.startswith("mlaas_") and len(new.secret) == 6 + 43
    assert "mlaas_..." in repr(new) and new.secret not in repr(new)
    with database.read() as session:
        rows = session.execute(sa.select(ApiTokenRow.__table__)).mappings().all()
    assert len(rows) == 1
    stored = rows[0]
    assert stored["token_hash"] == hashlib.sha256(new.secret.encode()).hexdigest()
    assert all(new.secret not in str(value) for value in stored.values())
    assert new.info.owner == "alice" and new.info.scopes == ("predict", "read")
    assert new.info.groups == ("/cms", "/cms/higgs")
    assert "secret" not in new.info.to_dict() and new.secret not in str(new.info.to_dict())


def test_two_tokens_differ(tokens: TokenStore) -> None:
    a = tokens.create(ALICE, name="a", scopes=["read"])
    b = tokens.create(ALICE, name="b", scopes=["read"])
    assert a.secret != b.secret and a.info.id != b.info.id


def test_verify_gives_owner_groups_snapshot_and_scopes(tokens: TokenStore,
                                                       clock: FakeClock) -> None:
    new = tokens.create(ALICE, name="ci", scopes=["submit"])
    principal = tokens.verify(new.secret)
    assert principal.user == "alice" and principal.display_name == "Alice"
    assert principal.groups == ("/cms", "/cms/higgs")
    assert principal.scopes == frozenset({"submit"})
    assert principal.has_scope("submit") and not principal.has_scope("predict")
    assert not principal.is_admin
    [info] = tokens.list_tokens(ALICE)
    assert info.last_used_at == clock.now


def test_admin_token_does_not_carry_admin(tokens: TokenStore) -> None:
    principal = tokens.verify(tokens.create(ADMIN, name="ops", scopes=SCOPES).secret)
    assert not principal.is_admin and principal.scopes == SCOPES


def test_expiry(tokens: TokenStore, clock: FakeClock) -> None:
    new = tokens.create(ALICE, name="short", scopes=["read"], expires_in=timedelta(hours=1))
    assert new.info.expires_at == clock.now + timedelta(hours=1)
    clock.advance(timedelta(minutes=59))
    assert tokens.verify(new.secret).user == "alice"
    clock.advance(timedelta(minutes=1))
    with pytest.raises(Unauthorized, match="expired") as info:
        tokens.verify(new.secret)
    assert new.secret not in str(info.value)
    assert [t.id for t in tokens.list_tokens(ALICE)] == [new.info.id]  # listed until revoked


def test_default_lifetime(tokens: TokenStore, clock: FakeClock) -> None:
    new = tokens.create(ALICE, name="d", scopes=["read"])
    assert new.info.expires_at - clock.now == tokens.default_lifetime


def test_list_shows_only_own_tokens_newest_first(tokens: TokenStore,
                                                 clock: FakeClock) -> None:
    first = tokens.create(ALICE, name="one", scopes=["read"])
    clock.advance(timedelta(seconds=1))
    second = tokens.create(ALICE, name="two", scopes=["predict"])
    tokens.create(BOB, name="bob ci", scopes=["read"])
    listed = tokens.list_tokens(ALICE)
    assert [t.id for t in listed] == [second.info.id, first.info.id]
    assert [t.name for t in tokens.list_tokens(BOB)] == ["bob ci"]
    assert tokens.list_tokens(ADMIN) == []


def test_revoke_by_owner(tokens: TokenStore) -> None:
    new = tokens.create(ALICE, name="ci", scopes=["read"])
    assert tokens.revoke(ALICE, new.info.id).id == new.info.id
    assert tokens.list_tokens(ALICE) == []
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        tokens.verify(new.secret)
    with pytest.raises(NotFound):
        tokens.revoke(ALICE, new.info.id)


def test_revoke_someone_elses_token_is_not_found(tokens: TokenStore) -> None:
    new = tokens.create(ALICE, name="ci", scopes=["read"])
    with pytest.raises(NotFound) as hidden:
        tokens.revoke(BOB, new.info.id)
    with pytest.raises(NotFound) as missing:
        tokens.revoke(BOB, "0123456789abcdef")
    assert str(hidden.value).replace(new.info.id, "X") == \
        str(missing.value).replace("0123456789abcdef", "X")
    assert tokens.verify(new.secret).user == "alice"  # still valid
    tokens.revoke(ADMIN, new.info.id)  # admins may revoke any token
    with pytest.raises(Unauthorized):
        tokens.verify(new.secret)


@pytest.mark.parametrize("scopes", [[], ["admin"], ["read", "write"], ["READ"]])
def test_scopes_must_be_a_nonempty_subset(tokens: TokenStore, scopes: list[str]) -> None:
    with pytest.raises(SpecError, match="scopes") as info:
        tokens.create(ALICE, name="x", scopes=scopes)
    assert info.value.field_path == "scopes"


@pytest.mark.parametrize("expires_in", [timedelta(0), timedelta(seconds=-1),
                                        timedelta(days=366)])
def test_lifetime_bounds(tokens: TokenStore, expires_in: timedelta) -> None:
    with pytest.raises(SpecError, match="lifetime"):
        tokens.create(ALICE, name="x", scopes=["read"], expires_in=expires_in)


@pytest.mark.parametrize("name", ["", "x" * 101, "bad\nname", "semi;colon"])
def test_bad_names(tokens: TokenStore, name: str) -> None:
    with pytest.raises(SpecError, match="token name"):
        tokens.create(ALICE, name=name, scopes=["read"])


def test_a_token_cannot_create_tokens(tokens: TokenStore) -> None:
    via_token = tokens.verify(tokens.create(ALICE, name="ci", scopes=SCOPES).secret)
    with pytest.raises(Forbidden, match="cannot create tokens"):
        tokens.create(via_token, name="escalate", scopes=["read"])


def test_per_user_limit(tokens: TokenStore) -> None:
    for i in range(3):
        tokens.create(ALICE, name=f"t{i}", scopes=["read"])
    with pytest.raises(QuotaExceeded, match="limit 3"):
        tokens.create(ALICE, name="t3", scopes=["read"])
    tokens.create(BOB, name="t0", scopes=["read"])  # per user


@pytest.mark.parametrize("presented", ["mlaas_x", "mlaas_short", "mlaas_" + "a" * 44,
                                       "mlaas_" + "!" * 43, "mlaas_" + "a" * 43])
def test_malformed_or_unknown_tokens(tokens: TokenStore, presented: str) -> None:
    with pytest.raises(Unauthorized, match="malformed|unknown") as info:
        tokens.verify(presented)
    assert presented not in str(info.value)


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("mlaas_x") == hashlib.sha256(b"mlaas_x").hexdigest()
