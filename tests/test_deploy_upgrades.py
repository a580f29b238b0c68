"""Migrations and deploys as operators live them: a newer release migrating while this
one waits for the lock, a long read holding a new day's partitions back, and the
gauges and the dashboard of runs no live worker can take."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import BaseModel

import saga
import saga._migrate
from tests.test_telemetry import points


class Inp(BaseModel):
    n: int = 0


tick = saga.Saga("upgrade_tick", input=Inp)


@tick.step()
async def t1(ctx: saga.Context[Inp]) -> int:
    return 1


def _ordered(version: int) -> saga.Saga[Inp]:
    s = saga.Saga("upgrade_deploy", input=Inp, version=version)

    @s.step()
    async def one(ctx: saga.Context[Inp]) -> int:
        return version

    if version > 1:

        @s.step()
        async def two(ctx: saga.Context[Inp]) -> int:
            return version * 10

    return s


async def test_unclaimable_gauge_reads_zero_once_drained(dsn: str) -> None:
    """README, metrics: `saga.runs.unclaimable` gauge (`saga.name`, `saga.version`,
    `saga.fingerprint`) counts "runs waiting for a definition no worker here
    registered", and "A per-saga gauge (a saga's queue, its waiting runs, a schedule's
    lateness) reads 0 once its runs are gone, rather than vanishing (a backend keeping a
    gauge's last value would show the queue full for ever)". README, Deploys:
    "Draining: start one worker with the old definition ... until unclaimable_runs() is
    empty". Once the v2 runs an old worker could not take are drained by a v2 worker,
    the old worker's `saga.runs.unclaimable` series for v2 reads 0."""
    v1, v2 = _ordered(1), _ordered(2)
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])

    def unclaimable() -> list[float]:
        return [
            v
            for a, v in points(reader).get("saga.runs.unclaimable", [])
            if a.get("saga.name") == "upgrade_deploy" and a.get("saga.version") == 2
        ]

    with anyio.fail_after(60):
        async with saga.Orchestrator(
            dsn, sagas=[v1], meter_provider=meters, census_interval=0.1, poll_interval=0.2
        ) as old:
            async with saga.Client(dsn, sagas=[v2]) as client:
                run = await client.start(v2, Inp())
            while True:  # the old worker's census counts the v2 run
                if unclaimable() == [1]:
                    break
                await anyio.sleep(0.05)
            assert await old.unclaimable_runs() == {("upgrade_deploy", 2, v2.fingerprint): 1}
            async with saga.Orchestrator(dsn, sagas=[v2], poll_interval=0.2) as new:
                assert await new.get_run(run.id).result(timeout=20) == 20
            assert await old.unclaimable_runs() == {}
            await anyio.sleep(0.6)  # several censuses of the old worker
            assert unclaimable() == [0], (
                f"saga.runs.unclaimable for the drained v2 reports {unclaimable()}: the "
                "series vanishes instead of reading 0"
            )


async def test_a_release_waiting_for_the_migration_lock_is_refused_once_a_newer_one_migrated(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Deploys: "a process of an earlier release opening on a schema a newer
    release migrated is refused (`MigrationError`)"; Storage: migrations are "applied
    under a transaction-scoped advisory lock, so processes starting together migrate
    safely". This release (migrations 1-10) opens with migrate=True on a schema at 9
    while a newer release (1-11) is migrating it: this one reads version 9 and waits
    for the migration lock; once it has it, it finds 10 applied (by the newer release,
    with 11), and is refused."""
    from saga._db import migrations as all_migrations
    from saga._db import quote_ident

    with monkeypatch.context() as patch:  # an installation at migration 9
        patch.setattr(saga._migrate, "migrations", lambda: all_migrations()[:9])
        assert await saga.migrate(dsn, schema="rolling") == list(range(1, 10))
    conn = await asyncpg.connect(dsn)
    outcome: list[Any] = []
    try:
        with anyio.fail_after(60):
            # The newer release's migrate holds the lock (as saga.migrate() does) ...
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('saga.migrate:rolling'))")

            async def this_release() -> None:
                try:
                    async with saga.Orchestrator(dsn, sagas=[tick], schema="rolling"):
                        outcome.append("opened")
                except BaseException as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(this_release)
                while True:  # until this release waits for the lock
                    if await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ):
                        break
                    await anyio.sleep(0.02)
                # ... and applies 10 and its own 11.
                ten = all_migrations()[9]
                await conn.execute(ten.sql.replace("__schema__", quote_ident("rolling")))
                await conn.execute(
                    "INSERT INTO rolling.migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    ten.version,
                    ten.name,
                    ten.checksum,
                )
                await conn.execute("ALTER TABLE rolling.runs ADD COLUMN future_column integer")
                await conn.execute(
                    "INSERT INTO rolling.migrations (version, name, checksum)"
                    " VALUES (11, 'future', 'f00d')"
                )
                await tx.commit()
        assert await conn.fetchval("SELECT max(version) FROM rolling.migrations") == 11
        assert len(outcome) == 1
        assert isinstance(outcome[0], saga.MigrationError), (
            f"this release (10 migrations) opened on a schema at migration 11: {outcome}"
        )
    finally:
        await conn.close()


async def test_an_orchestrator_opens_while_a_report_reads_the_runs_and_a_day_lacks_its_partitions(
    dsn: str,
) -> None:
    """README, Retention: "`saga migrate` and executing orchestrators create today's and
    the next two days' partitions ahead (a check every ten minutes; the log says
    `partitions_created`, or `partitions_not_created` with the error's type, for example
    `LockNotAvailableError` for a lock not granted within 500 ms, retried a minute
    later)"; Runtime: `async with` an Orchestrator "opens it (migrating the schema
    unless `migrate=False`)". When no executing orchestrator ran for a few days (their
    partitions were never made) and an operator's report (or a backup) holds a read of
    the runs open, an orchestrator opening on the up-to-date schema logs
    `partitions_not_created` and goes on: its runs land in the DEFAULT partition, as
    README says for a day without one."""
    from datetime import UTC, datetime

    from saga._partitions import TABLES, partition

    today = datetime.now(UTC).date()
    conn = await asyncpg.connect(dsn)
    reader = await asyncpg.connect(dsn)
    try:
        for k in range(3):  # the days no executing orchestrator was up to create
            for table, _ in TABLES:
                await conn.execute(
                    f"DROP TABLE IF EXISTS saga.{partition(table, today + timedelta(days=k))}"
                )
        report = reader.transaction()
        await report.start()
        await reader.fetchval("SELECT count(*) FROM saga.runs")  # e.g. `saga stats`, a backup
        with anyio.fail_after(60):
            try:
                async with saga.Orchestrator(dsn, sagas=[tick], poll_interval=0.2) as orch:
                    run = await orch.start(tick, Inp())
                    assert await run.result(timeout=20) == 1
                    opened: BaseException | None = None
            except saga.DatabaseError as exc:
                opened = exc
        await report.rollback()
        assert opened is None, (
            f"the orchestrator could not open while a read of the runs was open: {opened!r}"
        )
    finally:
        await reader.close()
        await conn.close()


def _fan(version: int) -> saga.Saga[Inp]:
    """A saga whose first four steps run side by side (after=[]), then a join; v2 adds
    a last step (another definition)."""
    s = saga.Saga("upgrade_fan", input=Inp, version=version)
    roots = []
    for name in ("a", "b", "c", "d"):

        async def branch(ctx: saga.Context[Inp]) -> int:
            return 1

        branch.__name__ = name
        roots.append(s.step(after=[])(branch))

    @s.step(after=roots)
    async def join(ctx: saga.Context[Inp]) -> int:
        return version

    if version > 1:

        @s.step(after=[join])
        async def last(ctx: saga.Context[Inp]) -> int:
            return version

    return s


async def test_dashboard_work_nobody_runs_counts_runs_not_their_parallel_steps(
    dsn: str,
) -> None:
    """README, Dashboard: the overview shows "*work nobody runs* (runs due for over a
    minute that no worker took: usually a definition version no live worker has)", in a
    table whose column is "Runs". One run of a v2 definition no live worker has, whose
    four first steps run side by side, shows as 1 run (as `saga.queues()` counts it),
    not one per step ready."""
    import re

    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from saga.testing import advance
    from saga.web import Operator, dashboard

    v1, v2 = _fan(1), _fan(2)

    async def authorize(request: Any) -> Operator:
        return Operator("ana")

    with anyio.fail_after(60):
        async with saga.Orchestrator(dsn, sagas=[v1], poll_interval=0.2) as old:
            async with saga.Client(dsn, sagas=[v2]) as client:
                run = await client.start(v2, Inp())
            await advance(old, run, timedelta(minutes=2))  # nobody took it for 2 minutes
            assert await old.unclaimable_runs() == {("upgrade_fan", 2, v2.fingerprint): 1}
            queued = [q.runs for q in (await saga.queues(old)).due if q.saga == "upgrade_fan"]
            app = Starlette(routes=[Mount("/saga", app=dashboard(old, authorize=authorize))])
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                page = await http.get("/saga/")
            assert page.status_code == 200
            table = page.text[page.text.index('data-testid="overdue-table"') :]
            row = re.search(
                r"<tr><td>upgrade_fan</td><td>2</td><td[^>]*>[0-9a-f]+</td><td>(\d+)</td>", table
            )
            assert row is not None, table[:1500]
            assert (queued, int(row[1])) == ([1], 1), (
                f"one overdue run of upgrade_fan v2: saga.queues() counts {queued}, the "
                f"dashboard's work nobody runs shows {row[1]} runs"
            )
