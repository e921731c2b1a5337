"""The platform's SQL database: engine, sessions, tables and migrations.

Layer: platform (persistence). One :class:`Database` per process wraps a
SQLAlchemy 2 engine for either an SQLite file (the embedded default) or
PostgreSQL (``postgresql://`` URLs use the psycopg 3 driver). The tables are
declared here as ORM models on :data:`Base`; the schema itself is owned by
the Alembic migrations in ``mlaas/platform/migrations`` and applied with
:meth:`Database.migrate` (no ``alembic.ini`` needed). Only
:mod:`mlaas.platform.store` reads and writes these tables; everything else
gets frozen records from it.

Adding a table or column (API tokens, queues, ...):

1. declare it on :data:`Base` (times as :class:`UTCDateTime`, JSON as
   ``sa.JSON``), here or in the module that owns it; a table declared
   elsewhere must have its module listed in :data:`MODEL_MODULES`, so
   Alembic and the drift test see it;
2. add ``mlaas/platform/migrations/versions/NNNN_<what>.py`` with
   ``revision = "NNNN"`` and ``down_revision`` = the previous head, written
   with ``op.create_table`` / ``op.add_column`` (never ``Base.metadata``, so
   old migrations stay what they were). Generating a draft works too::

       from mlaas.platform.db import Database
       Database(url).revision("add api tokens", autogenerate=True)

   then review the file it writes (``NNNN`` is the next number);
3. ``tests/platform/test_store.py::test_migrations_match_models`` fails until
   the migrations and the models agree, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from mlaas.errors import PlatformError

__all__ = ["Database", "Base", "UTCDateTime", "JobRow", "FileRow", "ModelRow",
           "MIGRATIONS_DIR", "MODEL_MODULES", "load_models", "normalize_url", "utcnow"]

log = logging.getLogger("mlaas.platform.db")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
"""The Alembic script directory shipped inside the package."""

MODEL_MODULES = ("mlaas.platform.auth.tokens", "mlaas.platform.accounting")
"""Modules outside this one that declare tables on :data:`Base` (imported by :func:`load_models`)."""

_SQLITE_BUSY_MS = 30_000
_PG_MIGRATE_LOCK = int.from_bytes(hashlib.sha256(b"mlaas.migrate").digest()[:4], "big")


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the only clock the store uses."""
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so values are
    stored as naive UTC (fixed-width text, which sorts by time) and get their
    UTC zone back when read. Naive datetimes are refused, never guessed.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; the store only takes timezone-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None,
                             dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every platform table; later migrations add theirs here."""


class JobRow(Base):
    """One job (see :class:`mlaas.platform.records.JobRecord` for the meaning of each column)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255))
    owner: Mapped[str] = mapped_column(sa.String(255))
    group: Mapped[str] = mapped_column(sa.String(255))
    visibility: Mapped[str] = mapped_column(sa.String(16), default="private")
    state: Mapped[str] = mapped_column(sa.String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    model_name: Mapped[str] = mapped_column(sa.String(255))
    resources: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    priority: Mapped[int] = mapped_column(sa.Integer, default=0)
    queue: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(sa.Integer)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    progress: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    node: Mapped[str | None] = mapped_column(sa.String(255))
    devices: Mapped[list[str]] = mapped_column(sa.JSON)
    model_version: Mapped[int | None] = mapped_column(sa.Integer)

    __table_args__ = (
        sa.Index("ix_jobs_state_created", "state", "created_at"),
        sa.Index("ix_jobs_owner", "owner"),
    )


class FileRow(Base):
    """Metadata of one workspace file; the bytes live in platform storage."""

    __tablename__ = "files"

    owner: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    path: Mapped[str] = mapped_column(sa.String(1024), primary_key=True)
    group: Mapped[str] = mapped_column(sa.String(255))
    visibility: Mapped[str] = mapped_column(sa.String(16), default="private")
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ModelRow(Base):
    """Who owns a registry model name, and who may read it."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(255))
    group: Mapped[str] = mapped_column(sa.String(255))
    visibility: Mapped[str] = mapped_column(sa.String(16), default="private")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (sa.Index("ix_models_owner", "owner"),)


def load_models() -> sa.MetaData:
    """Import every module declaring tables, and return the complete ``Base.metadata``."""
    for name in MODEL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a checkout without that feature: its tables are
            if not exc.name or not name.startswith(exc.name):  # not needed; other errors are
                raise
    return Base.metadata


def normalize_url(url: str) -> URL:
    """The SQLAlchemy URL for ``url``: ``postgresql://`` means psycopg 3; only SQLite and PostgreSQL.

    Raises :class:`PlatformError` naming the URL (password hidden) otherwise.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise PlatformError(f"database URL {url!r} is not a URL; use sqlite:///FILE "
                            "or postgresql://user@host/db") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise PlatformError(f"database driver {parsed.drivername!r} is not supported; "
                                "use postgresql:// (psycopg 3)")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise PlatformError(f"database URL {url!r} names no file; an in-memory database "
                                "would vanish with its first connection: use sqlite:///FILE")
        return parsed.set(drivername="sqlite")
    raise PlatformError(f"database URL {parsed.render_as_string(hide_password=True)!r} is "
                        "neither SQLite nor PostgreSQL")


class Database:
    """One SQL database: engine, sessions and schema migrations.

    Args:
        url (str): ``sqlite:///path/to/mlaas.db`` (the parent directory is
            created) or ``postgresql://user@host:port/db``.

    SQLite runs in WAL mode with foreign keys on and a 30 s busy timeout;
    write transactions (:meth:`write`) start with ``BEGIN IMMEDIATE`` so two
    threads never deadlock upgrading a read lock. PostgreSQL runs at its
    default READ COMMITTED level; atomic steps are single statements.
    """

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.dialect = self.url.get_backend_name()
        self.display_url = self.url.render_as_string(hide_password=True)
        if self.dialect == "sqlite":
            assert self.url.database is not None
            Path(self.url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                self.url, pool_size=10, max_overflow=20,
                connect_args={"timeout": _SQLITE_BUSY_MS / 1000, "check_same_thread": False})
            _sqlite_pragmas(self.engine)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=10,
                                           max_overflow=20)
        self._write_engine = self.engine.execution_options(mlaas_write=True)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads only: one transaction, rolled back at the end."""
        with self._errors(), self._read() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session for one write transaction: committed on success, else rolled back."""
        with self._errors(), self._write() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The boundary: driver failures become :class:`PlatformError` naming the database.

        Integrity errors pass through: the store turns the expected ones
        (duplicate names) into answers.
        """
        try:
            yield
        except sa.exc.IntegrityError:
            raise
        except sa.exc.DBAPIError as exc:
            raise PlatformError(f"database {self.display_url} failed: "
                                f"{_first_line(exc.orig) or type(exc).__name__}") from exc

    # -- migrations -------------------------------------------------------

    def _alembic_config(self, connection: Connection | None = None) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("sqlalchemy.url",
                               self.url.render_as_string(hide_password=False).replace("%", "%%"))
        config.attributes["connection"] = connection
        return config

    def migrate(self) -> None:
        """Bring the schema to the newest migration (``alembic upgrade head``).

        Idempotent; two processes starting at once take turns (an advisory
        lock on PostgreSQL, a file lock next to an SQLite file).
        """
        from alembic import command

        with self._errors(), self._migrate_lock() as connection:
            command.upgrade(self._alembic_config(connection), "head")
            connection.commit()
        log.info("database %s is at migration %s", self.display_url, self.current_revision())

    def current_revision(self) -> str | None:
        """The schema's migration revision, or None before the first :meth:`migrate`."""
        from alembic.migration import MigrationContext

        with self._errors(), self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def revision(self, message: str, *, autogenerate: bool = True,
                 directory: Path | None = None) -> Path:
        """Write a draft migration ``NNNN_<message>.py`` after the current head (developers only).

        Args:
            message (str): what the migration does (also its file name).
            autogenerate (bool): fill in the operations from the difference
                between :func:`load_models` and this (migrated) database.
            directory (Path or None): where to write it; default: the
                package's ``migrations/versions``.

        Returns the file written; review it before committing.
        """
        from alembic import command
        from alembic.script import ScriptDirectory

        self.migrate()
        config = self._alembic_config()
        if directory is not None:
            config.set_main_option("path_separator", "os")
            config.set_main_option("version_locations",
                                   os.pathsep.join([str(MIGRATIONS_DIR / "versions"),
                                                    str(directory)]))
        head = ScriptDirectory.from_config(config).get_current_head()
        rev_id = f"{int(head or 0) + 1:04d}"
        with self._errors(), self.engine.connect() as connection:
            config.attributes["connection"] = connection
            script = command.revision(config, message=message, autogenerate=autogenerate,
                                      rev_id=rev_id, head="head",
                                      version_path=str(directory) if directory else None)
        assert script is not None and not isinstance(script, list)
        return Path(script.path)

    @contextlib.contextmanager
    def _migrate_lock(self) -> Iterator[Connection]:
        if self.dialect == "postgresql":
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
                connection.commit()
                try:
                    yield connection
                finally:
                    connection.rollback()
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:k)"),
                                       {"k": _PG_MIGRATE_LOCK})
                    connection.commit()
            return
        assert self.url.database is not None
        lock_path = Path(self.url.database).expanduser().with_suffix(".migrate-lock")
        with open(lock_path, "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                with self._write_engine.connect() as connection:
                    yield connection
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def dispose(self) -> None:
        """Close every pooled connection (at shutdown, and in tests)."""
        self.engine.dispose()


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL, foreign keys and a busy timeout on every connection; we issue BEGIN ourselves.

    pysqlite's own transaction handling starts transactions late and cannot
    say ``BEGIN IMMEDIATE``; with ``isolation_level = None`` it leaves that to
    the ``begin`` hook below (SQLAlchemy's documented recipe).
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("mlaas_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
