"""The schema cannot drift: schema.sql is what the migrations build, and an applied
migration's file cannot change unnoticed."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import saga
from saga._db import migrations, schema_sql

CATALOG = {
    "tables": """
        SELECT c.relname AS name, c.relkind::text AS kind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND c.relname !~ '_p[0-9]{8}$'
    """,
    "partitions": """
        SELECT p.relname AS parent, c.relname AS name, pg_get_expr(c.relpartbound, c.oid)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname !~ '_p[0-9]{8}$'
    """,
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable,
               column_default, is_identity, identity_generation
        FROM information_schema.columns x
        JOIN pg_class c ON c.relname = x.table_name
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = x.table_schema
        WHERE table_schema = $1 AND NOT c.relispartition
    """,
    "constraints": """
        SELECT t.relname AS table_name, c.conname, c.contype::text,
               pg_get_constraintdef(c.oid) AS definition
        FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = $1
          AND NOT t.relispartition
    """,
    "indexes": """
        SELECT tablename, indexname, replace(indexdef, $1 || '.', '<schema>.') AS definition
        FROM pg_indexes x JOIN pg_class c ON c.relname = x.tablename
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = x.schemaname
        WHERE schemaname = $1 AND NOT c.relispartition
    """,
}


async def _catalog(db: asyncpg.Connection, schema: str) -> dict[str, set[tuple[Any, ...]]]:
    found: dict[str, set[tuple[Any, ...]]] = {}
    for part, query in CATALOG.items():
        rows = await db.fetch(query, schema)
        # Defaults that name the schema (identity sequences) are compared without it.
        found[part] = {
            tuple(str(v).replace(schema + ".", "<schema>.") for v in row.values()) for row in rows
        }
    return found


async def test_schema_sql_is_what_the_migrations_build(db: asyncpg.Connection, dsn: str) -> None:
    """Applying every migration in order to an empty schema gives the same catalog
    (tables, their DEFAULT partitions, columns with types, nullability, defaults and
    identity, constraints, indexes; the day partitions and the insides of partitions
    aside) as applying saga/sql/schema.sql to another: schema.sql is the schema a reader
    can trust."""
    await saga.migrate(dsn, schema="by_migrations")
    await db.execute(schema_sql("by_schema_sql"))
    migrated = await _catalog(db, "by_migrations")
    declared = await _catalog(db, "by_schema_sql")
    for part in CATALOG:
        assert migrated[part] == declared[part], (
            part,
            sorted(migrated[part] - declared[part]),
            sorted(declared[part] - migrated[part]),
        )
    assert migrated["tables"]  # the premise: there is something to compare


async def test_migrate_records_each_file_checksum(db: asyncpg.Connection) -> None:
    """Every applied migration is recorded with the sha256 of its file."""
    rows = await db.fetch("SELECT version, checksum FROM saga.migrations ORDER BY version")
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in migrations()
    ]


async def test_a_changed_migration_file_stops_migrate(db: asyncpg.Connection, dsn: str) -> None:
    """When an applied migration's recorded checksum differs from its file (the file was
    edited after it was applied, as 0002 once was), migrate refuses with a MigrationError
    naming the file, and applies nothing; opening an orchestrator refuses likewise."""
    await db.execute("UPDATE saga.migrations SET checksum = 'f00d' WHERE version = 2")
    with pytest.raises(saga.MigrationError, match=r"0002_\w+\.sql .*changed"):
        await saga.migrate(dsn)
    with pytest.raises(saga.MigrationError):
        async with saga.Client(dsn):
            pass


async def test_migrations_applied_before_checksums_get_theirs(
    db: asyncpg.Connection, dsn: str
) -> None:
    """A database migrated before checksums were recorded (NULL checksums) is accepted,
    and migrate records the current files' checksums for it."""
    await db.execute("UPDATE saga.migrations SET checksum = NULL")
    assert await saga.migrate(dsn) == []
    assert await db.fetchval("SELECT count(*) FROM saga.migrations WHERE checksum IS NULL") == 0


async def test_a_migrations_table_without_checksums_gains_them(
    db: asyncpg.Connection, dsn: str
) -> None:
    """A migrations table made before checksums were recorded (no checksum column at
    all) gains the column on the next migrate, which applies nothing and records every
    file's checksum."""
    await db.execute("ALTER TABLE saga.migrations DROP COLUMN checksum")
    assert await saga.migrate(dsn) == []
    rows = await db.fetch("SELECT version, checksum FROM saga.migrations ORDER BY version")
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in migrations()
    ]


async def test_migrating_an_up_to_date_schema_writes_nothing(
    db: asyncpg.Connection, dsn: str
) -> None:
    """Every orchestrator migrates as it opens: on a schema where every migration is
    recorded, unchanged, that takes no write transaction (it used to take one per
    migration file, under the lock), so opening many workers costs the database reads
    only."""
    next_xid = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    before = await db.fetchval(next_xid)
    assert await saga.migrate(dsn) == []
    assert await db.fetchval(next_xid) == before
