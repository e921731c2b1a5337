"""SqlStore and Database on real SQLite and PostgreSQL: every test runs on both."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mlaas.errors import NotFound, PlatformError
from mlaas.platform.db import Database, load_models, normalize_url
from mlaas.platform.records import JobRecord, JobState
from mlaas.platform.store import SqlStore

SPEC = {"data": {"sources": [{"files": ["/abs/a.root"], "label": 1}], "features": ["x"]}}


def _job(store: SqlStore, name: str = "j", owner: str = "alice") -> JobRecord:
    return store.create_job(name=name, owner=owner, group="/cms", spec=SPEC, model_name=name)


# -- database and migrations ----------------------------------------------------


def test_migrate_is_idempotent_and_tables_exist(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert db.current_revision() is None
        db.migrate()
        first = db.current_revision()
        db.migrate()
        assert first is not None and db.current_revision() == first
        names = set(sa.inspect(db.engine).get_table_names())
        assert {"jobs", "files", "models", "alembic_version"} <= names
        indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(db.engine).get_indexes("jobs")}
        assert indexes["ix_jobs_state_created"] == ["state", "created_at"]
        assert indexes["ix_jobs_owner"] == ["owner"]
    finally:
        db.dispose()


def test_migrations_match_models(database: Database) -> None:
    """The Alembic migrations build exactly the tables declared on Base (no drift)."""
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                load_models())
    assert diff == []


def test_two_processes_migrating_at_once(db_url: str) -> None:
    """Two Database objects (as two server processes would) upgrade at the same moment."""
    dbs = [Database(db_url) for _ in range(3)]
    barrier = threading.Barrier(len(dbs))

    def run(db: Database) -> str | None:
        barrier.wait()
        db.migrate()
        return db.current_revision()

    try:
        with ThreadPoolExecutor(len(dbs)) as pool:
            revisions = list(pool.map(run, dbs))
        assert len(set(revisions)) == 1 and revisions[0] is not None
    finally:
        for db in dbs:
            db.dispose()


def test_revision_writes_the_next_migration(sqlite_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Database.revision drafts NNNN_<message>.py from the models' difference to the schema."""
    db = Database(sqlite_url)
    extra = sa.Table("extra_things", load_models(), sa.Column("id", sa.Integer, primary_key=True))
    try:
        path = db.revision("add extra things", directory=tmp_path)
        head = db.current_revision()
    finally:
        load_models().remove(extra)
        db.dispose()
    assert head is not None
    assert path.parent == tmp_path and path.name == f"{int(head) + 1:04d}_add_extra_things.py"
    text = path.read_text()
    assert f"down_revision = '{head}'" in text and "op.create_table('extra_things'" in text


@pytest.mark.parametrize("url, why", [
    ("mysql://x@localhost/db", "neither SQLite nor PostgreSQL"),
    ("postgresql+asyncpg://x@localhost/db", "not supported"),
    ("sqlite://", "names no file"),
    ("sqlite:///:memory:", "names no file"),
    ("not a url", "is not a URL"),
])
def test_bad_database_urls(url: str, why: str) -> None:
    with pytest.raises(PlatformError, match=why):
        normalize_url(url)


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"


def test_unreachable_database_is_a_platform_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(PlatformError, match=r"database postgresql\+psycopg://nobody@127.0.0.1:1"):
        db.migrate()
    db.dispose()


# -- jobs ---------------------------------------------------------------------


def test_create_and_get_job(store: SqlStore) -> None:
    job = store.create_job(name="higgs", owner="alice", group="/cms", spec=SPEC,
                           model_name="higgs-model", resources={"cpus": 2}, priority=3,
                           queue="cpu", visibility="group")
    assert job.state is JobState.QUEUED and not job.final
    assert len(job.id) == 12 and job.id.isalnum()
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
    got = store.get_job(job.id)
    assert got == job
    assert got.spec == SPEC and got.resources == {"cpus": 2} and got.devices == ()


@pytest.mark.parametrize("bad", ["", "nope", "../etc", "x" * 33, "a b", "0123456789ab\n"])
def test_get_job_bad_or_missing_ids_are_not_found(store: SqlStore, bad: str) -> None:
    with pytest.raises(NotFound, match="no job named"):
        store.get_job(bad)


def test_create_job_refuses_bad_visibility(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="visibility 'everyone'"):
        store.create_job(name="j", owner="a", group="g", spec={}, model_name="m",
                         visibility="everyone")


def test_list_jobs_newest_first_and_filters(store: SqlStore) -> None:
    a = _job(store, "a", "alice")
    b = _job(store, "b", "bob")
    c = _job(store, "a", "bob")
    store.transition(b.id, {JobState.QUEUED}, JobState.RUNNING)
    assert [j.id for j in store.list_jobs()] == [c.id, b.id, a.id]
    assert [j.id for j in store.list_jobs(owner="bob")] == [c.id, b.id]
    assert [j.id for j in store.list_jobs(state=JobState.RUNNING)] == [b.id]
    assert [j.id for j in store.list_jobs(name="a")] == [c.id, a.id]
    assert [j.id for j in store.list_jobs(limit=1)] == [c.id]
    with pytest.raises(ValueError, match="limit"):
        store.list_jobs(limit=-1)
    with pytest.raises(ValueError, match="'asleep' is not a valid JobState"):
        store.list_jobs(state="asleep")  # type: ignore[arg-type]


def test_queue_is_fifo_with_positions(store: SqlStore) -> None:
    jobs = [_job(store, f"j{i}") for i in range(5)]
    assert [j.id for j in store.queued_jobs()] == [j.id for j in jobs]
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2, 3, 4]
    store.transition(jobs[1].id, {JobState.QUEUED}, JobState.RUNNING)
    store.transition(jobs[3].id, {JobState.QUEUED}, JobState.CANCELLED)
    assert [store.queue_position(j.id) for j in jobs] == [0, None, 1, None, 2]
    assert [j.id for j in store.queued_jobs()] == [jobs[0].id, jobs[2].id, jobs[4].id]
    with pytest.raises(NotFound):
        store.queue_position("0000deadbeef")


def test_created_at_strictly_increases(store: SqlStore) -> None:
    times = [_job(store).created_at for _ in range(20)]
    assert all(a < b for a, b in zip(times, times[1:]))


def test_transition_is_compare_and_set(store: SqlStore) -> None:
    job = _job(store)
    now = datetime.now(timezone.utc)
    running = store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING, started_at=now,
                               attempts=1, node="n1", devices=["0", "1"])
    assert running is not None
    assert running.state is JobState.RUNNING and running.attempts == 1
    assert running.started_at == now and running.devices == ("0", "1")
    assert running.updated_at > job.updated_at
    assert store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING) is None
    assert store.get_job(job.id).attempts == 1  # the failed CAS changed nothing
    done = store.transition(job.id, frozenset({JobState.RUNNING, JobState.QUEUED}),
                            JobState.SUCCEEDED, exit_code=0, finished_at=now)
    assert done is not None and done.final and done.exit_code == 0
    with pytest.raises(NotFound):
        store.transition("0000deadbeef", {JobState.QUEUED}, JobState.RUNNING)
    with pytest.raises(ValueError, match="at least one expected state"):
        store.transition(job.id, set(), JobState.RUNNING)


def test_transition_under_contention_has_one_winner(store: SqlStore) -> None:
    """Eight threads race to start each of five jobs: exactly one wins each."""
    jobs = [_job(store, f"j{i}") for i in range(5)]
    threads = 8
    barrier = threading.Barrier(threads)

    def race(worker: int) -> list[str]:
        barrier.wait()
        won = []
        for job in jobs:
            got = store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING,
                                   node=f"worker{worker}")
            if got is not None:
                assert got.node == f"worker{worker}"
                won.append(job.id)
        return won

    with ThreadPoolExecutor(threads) as pool:
        wins = [job_id for won in pool.map(race, range(threads)) for job_id in won]
    assert sorted(wins) == sorted(j.id for j in jobs)
    assert all(store.get_job(j.id).state is JobState.RUNNING for j in jobs)


def test_cancel_and_finish_race(store: SqlStore) -> None:
    """A cancel and a finish on the same running job: one wins, the other sees None."""
    for _ in range(10):
        job = _job(store)
        store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING)
        barrier = threading.Barrier(2)

        def move(new: JobState) -> JobRecord | None:
            barrier.wait()
            return store.transition(job.id, {JobState.RUNNING}, new)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(move, [JobState.CANCELLED, JobState.SUCCEEDED]))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert store.get_job(job.id).state is winners[0].state


def test_update_job_fields(store: SqlStore) -> None:
    job = _job(store)
    later = datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    got = store.update_job(job.id, progress={"epoch": 2, "epochs": 5}, cancel_requested=True,
                           reason="why", model_version=7, finished_at=later,
                           state="failed", spec={"new": True}, visibility="public")
    assert got.progress == {"epoch": 2, "epochs": 5} and got.cancel_requested
    assert got.model_version == 7 and got.reason == "why" and got.state is JobState.FAILED
    assert got.finished_at == later and got.finished_at.tzinfo == timezone.utc
    assert got.spec == {"new": True} and got.visibility == "public"
    assert store.get_job(job.id) == got


def test_update_job_accepts_every_field_but_id(store: SqlStore) -> None:
    job = _job(store)
    when = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    values = {
        "name": "n2", "owner": "bob", "group": "/atlas", "state": JobState.PREEMPTED,
        "spec": {"s": [1]}, "model_name": "m2", "created_at": when, "updated_at": when,
        "visibility": "group", "resources": {"gpus": 1}, "priority": 9, "queue": "gpu",
        "started_at": when, "finished_at": when, "attempts": 4, "exit_code": 75,
        "reason": "preempted", "progress": {"phase": "train"}, "cancel_requested": True,
        "node": "n7", "devices": ("2", "3"), "model_version": 12,
    }
    assert set(values) == {f.name for f in dataclasses.fields(JobRecord)} - {"id"}
    got = store.update_job(job.id, **values)
    assert got == JobRecord(id=job.id, **values)
    assert store.get_job(job.id) == got


@pytest.mark.parametrize("fields, message", [
    ({"colour": "red"}, "unknown job field.*'colour'"),
    ({"id": "other"}, "the job id cannot change"),
    ({"state": "sleeping"}, "'sleeping' is not a valid JobState"),
    ({"progress": [1, 2]}, "'progress' must be a dict"),
    ({"devices": "0,1"}, "'devices' must be a sequence"),
    ({"started_at": datetime(2030, 1, 1)}, "'started_at' must be a timezone-aware"),
    ({"started_at": "2030-01-01"}, "'started_at' must be a timezone-aware"),
    ({"name": None}, "'name' cannot be None"),
    ({"visibility": "world"}, "visibility 'world'"),
])
def test_update_job_refuses_bad_fields(store: SqlStore, fields: dict, message: str) -> None:
    job = _job(store)
    with pytest.raises(ValueError, match=message):
        store.update_job(job.id, **fields)
    if "state" in fields:
        message = "takes its new state as 'new'"
    with pytest.raises(ValueError, match=message):
        store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING, **fields)
    assert store.get_job(job.id) == job


def test_update_missing_job(store: SqlStore) -> None:
    with pytest.raises(NotFound, match="0000deadbeef"):
        store.update_job("0000deadbeef", reason="x")


# -- files ----------------------------------------------------------------------


def test_files_metadata(store: SqlStore) -> None:
    assert store.used_bytes("alice") == 0 and store.list_files("alice") == []
    a = store.put_file(owner="alice", group="/cms", path="b/model.py", size=10, sha256="a" * 64)
    store.put_file(owner="alice", group="/cms", path="a.root", size=5, sha256="b" * 64)
    store.put_file(owner="bob", group="/cms", path="a.root", size=100, sha256="c" * 64)
    assert a.visibility == "private" and a.updated_at.tzinfo is not None
    assert [f.path for f in store.list_files("alice")] == ["a.root", "b/model.py"]
    assert store.used_bytes("alice") == 15 and store.used_bytes("bob") == 100
    replaced = store.put_file(owner="alice", group="/atlas", path="b/model.py", size=1,
                              sha256="d" * 64)
    assert replaced.size == 1 and replaced.group == "/atlas"
    assert store.get_file("alice", "b/model.py") == replaced
    assert store.used_bytes("alice") == 6
    store.delete_file("alice", "a.root")
    with pytest.raises(NotFound, match="no file named 'a.root'"):
        store.get_file("alice", "a.root")
    with pytest.raises(NotFound, match="no file named 'a.root'"):
        store.delete_file("alice", "a.root")
    assert store.get_file("bob", "a.root").size == 100


# -- models ---------------------------------------------------------------------


def test_models(store: SqlStore) -> None:
    m, created = store.ensure_model("higgs", owner="alice", group="/cms")
    assert (m.owner, m.visibility, created) == ("alice", "private", True)
    again, created = store.ensure_model("higgs", owner="bob", group="/atlas",
                                        visibility="public")
    assert again == m and not created  # an existing name keeps its owner
    store.ensure_model("dijet", owner="bob", group="/atlas", visibility="group")
    assert [x.name for x in store.list_models()] == ["dijet", "higgs"]
    assert store.set_model_visibility("higgs", "public").visibility == "public"
    assert store.get_model("higgs").visibility == "public"
    with pytest.raises(ValueError, match="visibility 'open'"):
        store.set_model_visibility("higgs", "open")
    store.delete_model("higgs")
    for call in (lambda: store.get_model("higgs"), lambda: store.delete_model("higgs"),
                 lambda: store.set_model_visibility("higgs", "public")):
        with pytest.raises(NotFound, match="no model named 'higgs'"):
            call()


def test_ensure_model_racing_creators_agree(store: SqlStore) -> None:
    barrier = threading.Barrier(6)

    def claim(i: int) -> tuple[str, bool]:
        barrier.wait()
        record, created = store.ensure_model("shared", owner=f"user{i}", group="g")
        return record.owner, created

    with ThreadPoolExecutor(6) as pool:
        claims = list(pool.map(claim, range(6)))
    owners = {owner for owner, _ in claims}
    assert len(owners) == 1 and store.get_model("shared").owner in owners
    assert [created for _, created in claims].count(True) == 1  # one creator, who owns it
    assert next(owner for owner, created in claims if created) in owners
