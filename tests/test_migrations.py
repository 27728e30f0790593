"""Alembic migrations upgrade and downgrade an empty SQLite and PostgreSQL, and match the models."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core import db
from core.db import Base

TABLES = {"api_keys", "jobs", "uploads"}


def _roundtrip(url: str) -> None:
    engine = db.make_engine(url)
    try:
        assert db.is_empty(engine)

        db.upgrade(url)
        assert TABLES <= set(inspect(engine).get_table_names())
        assert db.current_revision(engine) == db.head_revision()
        db.check_schema(engine)
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []

        db.downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) & TABLES == set()
        assert db.current_revision(engine) is None
        with pytest.raises(db.SchemaOutOfDate, match="sealer migrate"):
            db.check_schema(engine)

        db.upgrade(url)
        assert db.current_revision(engine) == db.head_revision()
    finally:
        engine.dispose()


def test_sqlite_up_and_down(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'sealer.db'}")


@pytest.mark.services
def test_postgres_up_and_down(postgres_url):
    _roundtrip(postgres_url)
