"""Alembic environment of the prompt store. Run through pipeline.generation.prompt_store.migrate() (or
`diffuse prompts migrate`), which passes an open connection in config.attributes["connection"]."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from pipeline.generation.prompt_store.models import Base

config = context.config
# one constant key: concurrent openers of the same Postgres store wait for each other's migration
_PG_LOCK = 73_501_117


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER goes through batch mode
                      compare_type=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
