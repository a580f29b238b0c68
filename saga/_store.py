"""The store: every database operation of saga, and the only module that runs SQL.

Queries are named blocks in ``sql/queries.sql``; migrations are numbered files in
``sql/migrations``. The schema name is validated against a strict pattern and quoted
before it is placed in any statement. asyncpg errors are translated here into
:class:`saga.DatabaseError`, so no driver type escapes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any
from uuid import UUID

import asyncpg

from saga._errors import ConfigurationError, DatabaseError

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")

# Key for the transaction-scoped advisory lock serializing migrations of one schema.
_MIGRATION_LOCK_NAMESPACE = "saga.migrate:"


def validate_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"invalid schema name {schema!r}: it must match ^[a-z_][a-z0-9_]{{0,62}}$"
        )
    return schema


def _channel(schema: str, suffix: str) -> str:
    """A NOTIFY channel name of the schema: ``<schema>_<suffix>`` when that fits in
    Postgres' 63-byte identifiers, else a fixed-length name derived from the schema."""
    name = f"{schema}_{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]
    return f"saga_{digest}_{suffix}"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@cache
def _raw_queries() -> dict[str, str]:
    text = (resources.files("saga") / "sql" / "queries.sql").read_text("utf-8")
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        queries[name] = body.strip().rstrip(";")
    return queries


@cache
def _migrations() -> tuple[tuple[int, str, str], ...]:
    folder = resources.files("saga") / "sql" / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"saga migrations are not numbered 1..n: {versions}")
    return tuple(found)


def latest_migration() -> int:
    return len(_migrations())


@asynccontextmanager
async def translate_errors(what: str) -> AsyncIterator[None]:
    """Turn driver and connection errors into DatabaseError, keeping them as the cause."""
    try:
        yield
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        # Raised on a connection broken in the middle of an operation (server gone).
        asyncpg.InternalClientError,
        OSError,
    ) as exc:
        raise DatabaseError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


#: A saga definition as the database knows it: (name, version, fingerprint).
DefinitionKey = tuple[str, int, str | None]


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    run_id: UUID
    saga_name: str
    saga_version: int
    status: str
    step_name: str
    attempt: int
    lease_token: int
    input: str
    results: str
    completed_steps: list[str]
    cancel_requested: bool
    has_error: bool
    trace_context: str | None
    age: float  # seconds since the run was created, by the database clock
    expired_owner: str | None


@dataclass(frozen=True, slots=True)
class Census:
    """Runs per state (active ones and failed), oldest active age, scheduler lag (s)."""

    runs_by_status: dict[str, int]
    oldest_active_age: float
    scheduler_lag: float


@dataclass(frozen=True, slots=True)
class TransitionResult:
    lease_token: int
    cancel_requested: bool
    age: float = 0.0  # seconds since the run was created, by the database clock


@dataclass(frozen=True, slots=True)
class Transition:
    """One fenced state change of a leased run; see the ``transition`` query."""

    status: str
    step_name: str | None
    attempt: int
    events: list[dict[str, Any]]
    completed_step: str | None = None
    result_json: str | None = None
    output_json: str | None = None
    error: dict[str, Any] | None = None
    compensation_error: dict[str, Any] | None = None
    due_in: float | None = None
    lease_owner: str | None = None
    unless_cancelled: bool = False  # refused (None) if a cancel was requested meanwhile


class Store:
    """Database operations on one schema through an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "saga") -> None:
        self.pool = pool
        self.schema = validate_schema(schema)
        quoted = _quote_ident(self.schema)
        self._q = {name: sql.replace("__schema__", quoted) for name, sql in _raw_queries().items()}
        self.work_channel = _channel(self.schema, "work")
        self.done_channel = _channel(self.schema, "done")

    # -- migrations ---------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply pending migrations, one transaction each, under an advisory lock.

        Safe when several processes migrate at once: each transaction takes the lock,
        then re-reads what is applied. Returns the versions this call applied.
        """
        quoted = _quote_ident(self.schema)
        q = self._q
        applied_now: list[int] = []
        async with translate_errors("migration"), self.pool.acquire() as conn:
            for version, name, sql in _migrations():
                async with conn.transaction():
                    await conn.execute(q["migration_lock"], _MIGRATION_LOCK_NAMESPACE + self.schema)
                    await conn.execute(q["migration_prepare"])
                    if await conn.fetchval(q["migration_applied"], version):
                        continue
                    await conn.execute(sql.replace("__schema__", quoted))
                    await conn.execute(q["migration_record"], version, name)
                    applied_now.append(version)
        return applied_now

    async def applied_migrations(self) -> list[int]:
        async with translate_errors("reading migrations"):
            exists = await self.pool.fetchval(
                self._q["migrations_table_exists"], f"{_quote_ident(self.schema)}.migrations"
            )
            if not exists:
                return []
            rows = await self.pool.fetch(self._q["migrations_list"])
        return [r["version"] for r in rows]

    # -- runs ---------------------------------------------------------------------------

    async def start_run(
        self,
        run_id: UUID,
        saga_name: str,
        saga_version: int,
        key: str | None,
        input_json: str,
        first_step: str,
        trace_context: str | None = None,
        notify: bool = True,
        fingerprint: str | None = None,
    ) -> tuple[UUID, bool, str | None]:
        """Insert a run; returns (id, created, existing input). An existing key returns
        that run, with its input JSON so the caller can tell a replay from a conflict."""
        async with translate_errors("starting a run"):
            for _ in range(5):
                row = await self.pool.fetchrow(
                    self._q["start_run"],
                    run_id,
                    saga_name,
                    saga_version,
                    key,
                    input_json,
                    first_step,
                    self.work_channel,
                    trace_context,
                    notify,
                    fingerprint,
                )
                if row is not None:
                    return row["id"], True, None
                existing = await self.pool.fetchrow(self._q["find_run_by_key"], saga_name, key)
                if existing is not None:
                    return existing["id"], False, existing["input"]
                # The conflicting run was deleted in between (pruned); try again.
        raise DatabaseError(f"could not start run with key {key!r}: it keeps conflicting")

    async def claim(
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        definitions: Sequence[DefinitionKey],
    ) -> list[ClaimedItem]:
        async with translate_errors("claiming work"):
            rows = await self.pool.fetch(
                self._q["claim"], worker, limit, lease_seconds, *_definition_args(definitions)
            )
        return [
            ClaimedItem(
                run_id=r["id"],
                saga_name=r["saga_name"],
                saga_version=r["saga_version"],
                status=r["status"],
                step_name=r["step_name"],
                attempt=r["attempt"],
                lease_token=r["lease_token"],
                input=r["input"],
                results=r["results"],
                completed_steps=list(r["completed_steps"]),
                cancel_requested=r["cancel_requested"],
                has_error=r["has_error"],
                trace_context=r["trace_context"],
                age=r["age"],
                expired_owner=r["prev_owner"],
            )
            for r in rows
        ]

    async def transition(
        self, worker: str, run_id: UUID, lease_token: int, change: Transition
    ) -> TransitionResult | None:
        """Apply a fenced transition; ``None`` means nothing changed: the lease was lost,
        or (``change.unless_cancelled``) a cancel was requested meanwhile."""
        async with translate_errors("recording a transition"):
            row = await self.pool.fetchrow(
                self._q["transition"],
                run_id,
                lease_token,
                change.status,
                change.step_name,
                change.attempt,
                change.completed_step,
                change.result_json,
                change.output_json,
                _json_or_none(change.error),
                _json_or_none(change.compensation_error),
                change.due_in,
                change.lease_owner,
                json.dumps(change.events, separators=(",", ":")),
                self.done_channel,
                worker,
                change.unless_cancelled,
            )
        if row is None:
            return None
        return TransitionResult(row["lease_token"], row["cancel_requested"], row["age"])

    async def heartbeat(
        self, worker: str, leases: Sequence[tuple[UUID, int, float]]
    ) -> dict[UUID, bool]:
        """Extend (run id, token, seconds) leases; returns {run id: cancel requested} for
        the leases still held."""
        async with translate_errors("heartbeat"):
            rows = await self.pool.fetch(
                self._q["heartbeat"],
                worker,
                [run_id for run_id, _, _ in leases],
                [token for _, token, _ in leases],
                [seconds for _, _, seconds in leases],
            )
        return {r["id"]: r["cancel_requested"] for r in rows}

    async def release(self, worker: str, leases: Sequence[tuple[UUID, int]]) -> int:
        async with translate_errors("releasing leases"):
            rows = await self.pool.fetch(
                self._q["release"],
                worker,
                [run_id for run_id, _ in leases],
                [token for _, token in leases],
                self.work_channel,
            )
        return len(rows)

    async def get_run(self, run_id: UUID) -> asyncpg.Record | None:
        async with translate_errors("reading a run"):
            return await self.pool.fetchrow(self._q["get_run"], run_id)

    async def watch_run(self, run_id: UUID) -> bool:
        """Ask for a NOTIFY when the run ends; False when it has ended already (or does
        not exist), so that the waiter reads its state instead of waiting."""
        async with translate_errors("watching a run"):
            ended = await self.pool.fetchval(self._q["watch_run"], run_id)
        return ended is False

    async def ended_runs(self, run_ids: Sequence[UUID]) -> set[UUID]:
        """Which of these runs have ended."""
        async with translate_errors("polling runs"):
            rows = await self.pool.fetch(self._q["ended_runs"], list(run_ids))
        return {r["id"] for r in rows}

    async def notify_work(self, saga_name: str) -> None:
        async with translate_errors("notifying workers"):
            await self.pool.execute(self._q["notify_work"], self.work_channel, saga_name)

    async def get_events(self, run_id: UUID) -> list[asyncpg.Record]:
        async with translate_errors("reading a run's history"):
            return await self.pool.fetch(self._q["get_events"], run_id)

    async def request_cancel(self, run_id: UUID) -> bool:
        async with translate_errors("cancelling a run"):
            row = await self.pool.fetchrow(self._q["request_cancel"], run_id, self.work_channel)
        return row is not None

    async def count_unclaimable(
        self, definitions: Sequence[DefinitionKey]
    ) -> dict[DefinitionKey, int]:
        """Active runs of definitions not in ``definitions``, by (name, version,
        fingerprint); the fingerprint is ``None`` for runs that recorded none."""
        async with translate_errors("counting unclaimable runs"):
            rows = await self.pool.fetch(
                self._q["count_unclaimable"], *_definition_args(definitions)
            )
        return {
            (r["saga_name"], r["saga_version"], _fingerprint_or_none(r["fingerprint"])): r["runs"]
            for r in rows
        }

    async def census(self, definitions: Sequence[DefinitionKey]) -> Census:
        async with translate_errors("reading run statistics"):
            rows = await self.pool.fetch(self._q["census"], *_definition_args(definitions))
        ages = [r["oldest_age"] for r in rows if r["oldest_age"] is not None]
        return Census(
            runs_by_status={r["status"]: r["runs"] for r in rows},
            oldest_active_age=max(ages, default=0.0),
            scheduler_lag=max((r["lag"] for r in rows), default=0.0),
        )

    async def has_event(
        self, run_id: UUID, kind: str, step: str | None, attempt: int | None, worker: str
    ) -> bool:
        async with translate_errors("reading a run's history"):
            found = await self.pool.fetchval(
                self._q["has_event"], run_id, kind, step, attempt, worker
            )
        return bool(found)

    async def expire_lease(self, run_id: UUID) -> bool:
        async with translate_errors("expiring a lease"):
            return await self.pool.fetchval(self._q["expire_lease"], run_id) is not None

    async def retry_run(self, run_id: UUID) -> bool:
        async with translate_errors("retrying a run"):
            row = await self.pool.fetchrow(self._q["retry_run"], run_id, self.work_channel)
        return row is not None

    # -- operators (saga._operator, the CLI) ----------------------------------------------

    async def list_runs(
        self,
        *,
        saga_name: str | None,
        statuses: Sequence[str] | None,
        older_than: float | None,
        newer_than: float | None,
        before: UUID | None,
        limit: int,
        key: str | None = None,
    ) -> list[asyncpg.Record]:
        """Runs newest first, filtered; ``before`` is the page cursor (a run's id)."""
        async with translate_errors("listing runs"):
            return await self.pool.fetch(
                self._q["list_runs"],
                saga_name,
                None if statuses is None else list(statuses),
                older_than,
                newer_than,
                before,
                limit,
                key,
            )

    async def prune_runs(
        self, older_than: float, statuses: Sequence[str], batch_size: int
    ) -> tuple[int, int]:
        """Delete one batch of finished runs and their events; returns (runs, events)."""
        async with translate_errors("pruning runs"):
            row = await self.pool.fetchrow(
                self._q["prune_runs"], older_than, list(statuses), batch_size
            )
        assert row is not None
        return row["runs"], row["events"]

    async def count_prunable(self, older_than: float, statuses: Sequence[str]) -> tuple[int, int]:
        """What :meth:`prune_runs` would delete: (runs, events)."""
        async with translate_errors("counting prunable runs"):
            row = await self.pool.fetchrow(self._q["count_prunable"], older_than, list(statuses))
        assert row is not None
        return row["runs"], row["events"]

    async def find_runs_by_key(self, key: str, saga_name: str | None) -> list[tuple[UUID, str]]:
        """(run id, saga name) of the runs started with ``key``, one per saga at most."""
        async with translate_errors("finding runs by key"):
            rows = await self.pool.fetch(self._q["find_runs_by_key"], key, saga_name)
        return [(r["id"], r["saga_name"]) for r in rows]

    async def count_runs(
        self, *, saga_name: str | None, older_than: float | None, newer_than: float | None
    ) -> list[tuple[str, str, int]]:
        """(saga name, status, runs) for every pair that has runs, by saga name."""
        async with translate_errors("counting runs"):
            rows = await self.pool.fetch(self._q["count_runs"], saga_name, older_than, newer_than)
        return [(r["saga_name"], r["status"], r["runs"]) for r in rows]


def _json_or_none(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


#: Stands for "no fingerprint recorded" (runs started before fingerprints existed).
_NO_FINGERPRINT = "-"


def _definition_args(
    definitions: Sequence[DefinitionKey],
) -> tuple[list[str], list[int], list[str]]:
    """The (names, versions, fingerprints) arrays of the definition filters. Each
    definition also matches its runs without a fingerprint (started before they were
    recorded), which the queries read as ``'-'``."""
    names: list[str] = []
    versions: list[int] = []
    fingerprints: list[str] = []
    for name, version, fingerprint in definitions:
        for fp in (fingerprint or _NO_FINGERPRINT, _NO_FINGERPRINT):
            names.append(name)
            versions.append(version)
            fingerprints.append(fp)
    return names, versions, fingerprints


def _fingerprint_or_none(value: str) -> str | None:
    return None if value == _NO_FINGERPRINT else value
