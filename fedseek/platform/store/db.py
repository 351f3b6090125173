"""Platform DB: SQLAlchemy 2 typed ORM. The schema is created and evolved only by the Alembic
migrations in `fedseek/platform/store/migrations` (`fedseek db upgrade`), never by `create_all`."""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event, inspect)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Institution(Base):
    __tablename__ = "institutions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # hospital | bank | site
    epsilon_max: Mapped[float] = mapped_column(Float)  # lifetime budget over every job
    delta: Mapped[float | None] = mapped_column(Float)  # None: the delta of its first job
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # deployment: the SuperLink node id its registered key authenticates as, and that key's digest
    node_id: Mapped[str | None] = mapped_column(String(20), unique=True)
    public_key_sha256: Mapped[str | None] = mapped_column(String(64))


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    periods: Mapped[list[Period]] = relationship(back_populates="task", order_by="Period.position")


class Period(Base):
    """A continual-learning period of a task: a disjoint slice of every institution's records."""

    __tablename__ = "periods"
    __table_args__ = (UniqueConstraint("task_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)
    task: Mapped[Task] = relationship(back_populates="periods")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    data_scope: Mapped[str] = mapped_column(String(512), default="all")  # ledger_math.DataScope key
    status: Mapped[str] = mapped_column(String(20))  # running | finished | stopped | refused | failed
    message: Mapped[str] = mapped_column(Text, default="")
    config_json: Mapped[str] = mapped_column(Text)
    planned_rounds: Mapped[int] = mapped_column(Integer)
    final_accuracy: Mapped[float | None] = mapped_column(Float)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    runner: Mapped[str] = mapped_column(String(20), default="simulate")  # simulate | deploy
    owner: Mapped[str | None] = mapped_column(String(200))  # host:pid of the process running it
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    task: Mapped[Task] = relationship()


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    bytes_up: Mapped[int] = mapped_column(Integer)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))  # the global adapter after it
    committed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LedgerEntry(Base):
    """One DP release charged to an institution: a training round, a Fisher pass or noised counts."""

    __tablename__ = "privacy_ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    round_number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(10))  # train | fisher | validation
    data_scope: Mapped[str] = mapped_column(String(512), default="all")  # ledger_math.DataScope key
    sigma: Mapped[float] = mapped_column(Float)
    q: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    clip: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    epsilon_after: Mapped[float] = mapped_column(Float)  # institution's PRV epsilon after this entry
    epsilon_rdp_after: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    institution: Mapped[Institution] = relationship()


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    mlflow_model: Mapped[str | None] = mapped_column(String(200))
    mlflow_version: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PromotionDecision(Base):
    __tablename__ = "promotion_decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(20))
    promoted: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Schedule(Base):
    __tablename__ = "schedules"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_name: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(20))  # cron | new-data
    cron: Mapped[str | None] = mapped_column(String(100))
    watch_dir: Mapped[str | None] = mapped_column(Text)
    poll_seconds: Mapped[int] = mapped_column(Integer, default=60)
    job_args: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of the runner's options
    runner: Mapped[str] = mapped_column(String(20), default="simulate")  # simulate | deploy (federation)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    data_fingerprint: Mapped[str | None] = mapped_column(Text)  # last seen state of watch_dir
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_outcome: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    engine = create_engine(url, future=True)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # foreign keys + concurrent readers
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    return engine


def upgrade(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations on `url` up to `revision`."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    command.upgrade(config, revision)


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def _revision(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


class SchemaMissing(RuntimeError):
    """The DB has not been migrated."""


@contextmanager
def session_scope(url: str, migrate: bool = True):
    """A transaction: committed when the block ends, rolled back (nothing half-written) on error.
    With `migrate`, a DB without the schema is migrated first."""
    engine = engine_for(url)
    if not inspect(engine).has_table("privacy_ledger"):
        if not migrate:
            raise SchemaMissing(f"{url}: no FedSeek schema; run `fedseek db upgrade`")
        upgrade(url)
    elif _revision(engine) != head_revision():  # an older FedSeek's DB: migrate it forward
        upgrade(url)
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_or_create_task(session: Session, name: str) -> Task:
    task = session.query(Task).filter_by(name=name).one_or_none()
    if task is None:
        task = Task(name=name)
        session.add(task)
        session.flush()
    return task
