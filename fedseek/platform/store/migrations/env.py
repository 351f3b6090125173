"""Alembic environment: the URL comes from `fedseek.platform.store.db.upgrade` (or FEDSEEK_DB_URL)."""
from alembic import context
from sqlalchemy import create_engine

from fedseek.platform.store.db import Base

config = context.config


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return url
    from fedseek.platform.store.settings import load_settings

    return load_settings().database_url


def _only_platform_tables(obj, name, type_, reflected, compare_to):
    return not (type_ == "table" and name.startswith("apscheduler"))  # the scheduler owns its table


def run_migrations() -> None:
    engine = create_engine(_url())
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          include_object=_only_platform_tables, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
