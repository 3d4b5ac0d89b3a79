"""Prompt-store databases for tests: a SQLite file, or a fresh uniquely named PostgreSQL database on the server at
127.0.0.1:5432 (trust auth, user postgres; override with $DIFFUSE_TEST_PG="host=... port=... user=..."), created for
the test and dropped after it. Without a reachable server the Postgres variants are skipped, saying why."""

from __future__ import annotations

import os
import uuid

import pytest

PG_DSN = os.environ.get("DIFFUSE_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3")


def _admin():
    import psycopg2

    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return conn


def postgres_database():
    """Context manager: yields a SQLAlchemy URL of a new empty database, drops it afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        import psycopg2

        try:
            admin = _admin()
        except psycopg2.OperationalError as e:
            pytest.skip(f"PostgreSQL not reachable ({PG_DSN}): {str(e).strip()[:200]} -- Postgres tests skipped")
        name = f"diffuse_test_{uuid.uuid4().hex[:12]}"
        params = admin.get_dsn_parameters()
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg2://{params['user']}@{params['host']}:{params['port']}/{name}"
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()

    return cm()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'prompts.db'}"
        return
    with postgres_database() as url:
        yield url
