"""Shared fixtures of the platform tests: databases, the store, platform storage.

Real databases, no doubles:

- ``sqlite_url``: an SQLite file in the test's ``tmp_path``.
- ``pg_url``: a fresh, empty PostgreSQL schema for one test, inside a
  database made for this test session (``mlaas_test_<random>``) on the
  server at ``$MLAAS_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
  The URL selects the schema through ``search_path``, so ``Database(pg_url)``
  and Alembic see only it. The schema is dropped after the test and the
  database at the end of the session; nothing else on the server is touched.
  An unreachable server fails the test with the reason (it is always there
  in CI), it never skips.
- ``db_url``: parametrised over ``sqlite`` and ``postgresql`` (test ids
  ``[sqlite]`` / ``[postgresql]``): a test that takes it runs on both.
- ``database`` / ``store``: a migrated, empty
  :class:`mlaas.platform.db.Database` and a
  :class:`mlaas.platform.store.SqlStore` on it, parametrised over both
  backends like ``db_url`` (on PostgreSQL: one schema migrated per session,
  its tables emptied before each test).
- ``sqlite_store``: the same on SQLite only, for tests about something else
  than the database (API routes, the manager) that want to stay fast.
- ``storage``: :class:`mlaas.platform.storage.Storage` under ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from mlaas.platform.db import Database, load_models
from mlaas.platform.storage import Storage
from mlaas.platform.store import SqlStore

PG_SERVER_URL = os.environ.get("MLAAS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(make_url(url).set(drivername="postgresql+psycopg"),
                            isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a PostgreSQL database created for this test session (dropped at its end)."""
    admin = _admin_engine(PG_SERVER_URL)
    name = f"mlaas_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_SERVER_URL} is not reachable (set MLAAS_TEST_PG to "
                    f"another server): {str(exc.orig).strip().splitlines()[0]}", pytrace=False)
    url = make_url(PG_SERVER_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def _fresh_schema(database_url: str) -> Iterator[str]:
    """A new schema in ``database_url``; yields a URL selecting it, drops it afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine(database_url)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A ``postgresql://`` URL whose ``search_path`` is a fresh, empty schema (dropped after)."""
    with _fresh_schema(pg_database) as url:
        yield url


@pytest.fixture(scope="session")
def pg_migrated_url(pg_database: str) -> Iterator[str]:
    """A schema migrated once per session; ``database`` empties its tables before each test."""
    with _fresh_schema(pg_database) as url:
        db = Database(url)
        db.migrate()
        db.dispose()
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An SQLite file URL in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'mlaas.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once on SQLite and once on PostgreSQL."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@contextlib.contextmanager
def _migrated(url: str) -> Iterator[Database]:
    db = Database(url)
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[Database]:
    """A migrated, empty Database, once on SQLite and once on PostgreSQL.

    SQLite: a new file per test. PostgreSQL: the session's migrated schema
    with every table emptied first (migrating a schema per test is slow).
    """
    if request.param == "sqlite":
        with _migrated(request.getfixturevalue("sqlite_url")) as db:
            yield db
        return
    db = Database(request.getfixturevalue("pg_migrated_url"))
    try:
        with db.write() as session:
            for table in reversed(load_models().sorted_tables):
                session.execute(table.delete())
        yield db
    finally:
        db.dispose()


@pytest.fixture
def store(database: Database) -> SqlStore:
    """A SqlStore on a fresh, migrated database (both backends)."""
    return SqlStore(database)


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[SqlStore]:
    """A SqlStore on a fresh, migrated SQLite file (one backend, for tests of other parts)."""
    with _migrated(sqlite_url) as db:
        yield SqlStore(db)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    """Platform storage rooted in the test's temporary directory."""
    return Storage(tmp_path / "storage")
