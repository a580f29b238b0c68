"""Schema migrations: forward-only numbered files, applied under an advisory lock, each
recorded with the checksum of its file so that a changed migration is caught.

``sql/schema.sql`` is the resulting schema as a reader should see it; a test applies the
migrations to an empty database and compares the catalog with it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from saga import _partitions as partitions
from saga._db import (
    Migration,
    latest_migration,
    migrations,
    queries,
    quote_ident,
    translate_errors,
)
from saga._errors import ConfigurationError, DatabaseError, MigrationError
from saga._log import logger

# Key of the transaction-scoped advisory lock serializing migrations of one schema.
_LOCK_NAMESPACE = "saga.migrate:"


async def migrate(pool: asyncpg.Pool, schema: str) -> list[int]:
    """Apply pending migrations, one transaction each, under an advisory lock, then create
    the coming days' partitions (saga/_partitions.py); return the versions this call
    applied.

    Safe when several processes migrate at once: each transaction takes the lock, then
    re-reads what is applied. Raises :class:`MigrationError` when a recorded migration's
    file has changed since it was applied (its checksum differs): the database holds what
    the old file did, and nothing is applied until that is resolved.
    """
    version = await applied_version(pool, schema)
    _not_newer(version, schema)
    q = queries(schema)
    quoted = quote_ident(schema)
    applied_now: list[int] = []
    if version and await _up_to_date(pool, q):
        pending: tuple[Migration, ...] = ()  # every one recorded, unchanged: no lock
    else:
        pending = migrations()
    async with translate_errors("migration"), pool.acquire() as conn:
        for migration in pending:
            for tries_left in (2, 1, 0):
                try:
                    if await _apply(conn, q, schema, quoted, migration):
                        applied_now.append(migration.version)
                    break
                except asyncpg.UniqueViolationError:
                    # A catalog row another migrator's transaction created meanwhile (a
                    # new schema's): that transaction has ended; look again, under the lock.
                    if not tries_left:
                        raise
    if pending:
        # A newer release may have migrated while this one waited for the lock (it found
        # its own migrations applied by that one): refused as at the first check.
        _not_newer(await applied_version(pool, schema), schema)
    await _create_partitions(pool, schema)
    return applied_now


async def _create_partitions(pool: asyncpg.Pool, schema: str) -> None:
    """The coming days' partitions, created when missing (and said in the log)."""
    try:
        async with translate_errors("creating partitions"):
            created = await partitions.ensure(pool, schema)
    except DatabaseError as exc:
        if not isinstance(exc.__cause__, asyncpg.LockNotAvailableError):
            raise
        # A long read of the runs (a report, a backup) holds a lock the new day's
        # partition needs: the day's runs go to the DEFAULT partition meanwhile, and
        # executing orchestrators try again a minute later (saga/_census.py).
        logger.warning("partitions_not_created", schema=schema, error_type="LockNotAvailableError")
        return
    if created:
        logger.info("partitions_created", schema=schema, days=[str(d) for d in created])


async def _up_to_date(pool: asyncpg.Pool, q: dict[str, str]) -> bool:
    """Whether every migration is recorded with its file's checksum (one read; the
    locked path, a write transaction per migration, then only runs when one is not)."""
    async with translate_errors("reading migrations"):
        try:
            rows = await pool.fetch(q["migrations_recorded"])
        except asyncpg.UndefinedColumnError:
            return False  # a table from before checksums: the locked path adds the column
    recorded = {r["version"]: r["checksum"] for r in rows}
    return all(recorded.get(m.version) == m.checksum for m in migrations())


async def _verify(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    q: dict[str, str],
    schema: str,
    migration: Migration,
    checksum: str | None,
) -> None:
    if checksum is None:
        # Applied before checksums were recorded: trust the file as it is now.
        await conn.execute(q["migration_set_checksum"], migration.version, migration.checksum)
    elif checksum != migration.checksum:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name}.sql of schema {schema!r} "
            f"changed since it was applied (checksum {checksum[:12]} recorded, "
            f"{migration.checksum[:12]} now): migrations are immutable once applied; "
            "restore the file, or add a new migration for the change"
        )


async def _apply(
    conn: Any, q: dict[str, str], schema: str, quoted: str, migration: Migration
) -> bool:
    """Apply ``migration`` in a transaction of its own, under the lock, unless recorded
    (then verified); whether this call applied it."""
    async with conn.transaction():
        await conn.execute(q["migration_lock"], _LOCK_NAMESPACE + schema)
        await conn.execute(q["migration_prepare"])
        recorded = await conn.fetchrow(q["migration_applied"], migration.version)
        if recorded is not None:
            await _verify(conn, q, schema, migration, recorded["checksum"])
            return False
        await conn.execute(migration.sql.replace("__schema__", quoted))
        await conn.execute(
            q["migration_record"], migration.version, migration.name, migration.checksum
        )
        return True


async def applied_version(pool: asyncpg.Pool, schema: str) -> int:
    """The highest migration applied to ``schema`` (0 when it was never migrated)."""
    q = queries(schema)
    async with translate_errors("reading migrations"):
        exists = await pool.fetchval(
            q["migrations_table_exists"], f"{quote_ident(schema)}.migrations"
        )
        if not exists:
            return 0
        return int(await pool.fetchval(q["migrations_latest"]) or 0)


async def check_migrated(pool: asyncpg.Pool, schema: str) -> None:
    """Raise ConfigurationError unless every migration this version knows is applied."""
    applied = await applied_version(pool, schema)
    _not_newer(applied, schema)
    if applied < latest_migration():
        raise ConfigurationError(
            f"schema {schema!r} is not migrated (at migration {applied} of "
            f"{latest_migration()}); run `saga migrate` (or saga.migrate()) first, or open "
            "with migrate=True"
        )


def _not_newer(applied: int, schema: str) -> None:
    """A schema a newer release of saga migrated: this one's statements may not work on
    it (a rolling deploy runs the newer release's ``saga migrate`` once its previous
    processes are gone, or says in its CHANGELOG that they may stay)."""
    if applied > latest_migration():
        raise MigrationError(
            f"schema {schema!r} was migrated by a newer release of saga (migration "
            f"{applied}; this one knows {latest_migration()}): run the newer release"
        )
