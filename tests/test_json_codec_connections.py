"""Connections with the application's own JSON codecs (asyncpg's documented
`set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads)` in a pool's init):
a caller's connection given as `conn=`, or a whole pool handed to a client. saga's
statements neither take nor return json/jsonb as such, so such codecs never apply to
what saga writes or reads."""

from __future__ import annotations

import json
from datetime import timedelta

import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga._db import queries
from tests._sagas import FAST, Job, Ledger, permanent, small_saga, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Go(BaseModel):
    ok: bool = True


async def _json_codecs(conn: asyncpg.Connection) -> None:
    """What asyncpg's docs recommend for JSON columns, in an application's pool init."""
    for t in ("json", "jsonb"):
        await conn.set_type_codec(t, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def test_a_run_started_on_an_app_connection_with_a_json_codec_runs(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """README, "In your transaction": `start(conn=)` writes the run in the caller's
    transaction, on the caller's connection. On a connection whose pool registered
    asyncpg's json/jsonb codecs, the run runs: its step once, the run completed. Before,
    its trace context was stored encoded twice and every claim died before the step
    (an internal error, the lease expiring, claimed again for ever: attempt 12 of 3)."""
    ledger = Ledger()
    s = small_saga("codec_start", ["a"], ledger=ledger, retry=FAST)
    orch = await orchestrator(s, lease_seconds=1)
    app_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=_json_codecs)
    try:
        async with app_pool.acquire() as conn, conn.transaction():
            run = await orch.start(s, Job(n=5), conn=conn)
    finally:
        await app_pool.close()
    assert await run.result(timeout=10) == "a"
    assert len(ledger.of("step")) == 1


async def test_a_signal_by_and_note_sent_on_an_app_connection_with_a_json_codec(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """README: every action's history event has `data["by"]` and `data["note"]` when
    given; `signal()` takes `conn=`. Sent on a connection with the codecs, the
    `signal_received` event has both. Before, its data was a JSON array (saga's text
    encoded again by the codec, then `string || object`), without them."""
    s = saga.Saga("codec_signal", input=Job)

    @s.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    go = s.wait_for("go", Go)

    @s.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> bool:
        return ctx.result(go).ok

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await until_status(run, saga.RunStatus.WAITING)
    app_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=_json_codecs)
    try:
        async with app_pool.acquire() as conn, conn.transaction():
            assert await orch.signal(run.id, go, Go(), conn=conn, by="ops", note="by phone")
    finally:
        await app_pool.close()
    assert await run.result(timeout=10) is True
    event = next(e for e in await run.history() if e.kind == "signal_received")
    assert event.data == {"signal": "go", "by": "ops", "note": "by phone"}


async def test_a_client_on_a_pool_with_json_codecs_runs_sagas_end_to_end(dsn: str) -> None:
    """README: a client takes a DSN or an asyncpg pool. An orchestrator on the
    application's pool with json/jsonb codecs runs a saga whose last step fails: the run
    ends compensated with its error, its history and timeline read back, its key
    returns it, and prune deletes it. Before, the first step's completion was stored
    encoded twice and the run never ended."""
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=6, init=_json_codecs)
    s = small_saga("codec_pool", 3, compensate=True, fail={"s3": permanent("no stock")})
    try:
        async with saga.Orchestrator(pool, sagas=[s], poll_interval=0.1) as orch:
            run = await orch.start(s, Job(), key="order-1")
            with pytest.raises(saga.RunCompensatedError, match="no stock"):
                await run.result(timeout=20)
            history = await run.history()
            assert [e.kind for e in history][-3:] == [
                "compensation_started",
                "compensation_completed",
                "run_compensated",
            ]
            assert [a.outcome for a in saga.timeline(history)] == ["completed"] * 2 + ["failed"] + [
                "completed"
            ] * 2
            info = await run.info()
            assert info.error is not None
            assert info.error.message == "no stock"
            again = await orch.start(s, Job(), key="order-1")
            assert (again.id, again.created) == (run.id, False)
            pruned = await saga.prune(orch, older_than=timedelta(0))
            assert pruned.runs == 1
    finally:
        await pool.close()


#: Statements that cannot be prepared alone (placeholders filled at run time, several
#: commands, a fragment): none of them takes or returns JSON.
_UNPREPARED = {
    "claim_prioritized_candidates",
    "day_any_kept",
    "day_copy_kept_rows",
    "day_copy_kept_runs",
    "day_counts",
    "day_events_gone",
    "day_kept",
    "day_key_holders",
    "day_lock",
    "day_parents_gone",
    "day_rows",
    "migration_prepare",
    "partition_fill",
    "partition_lock_timeout",
    "transition_claim_rows",
}


async def test_no_statement_takes_or_returns_json_as_such(db: asyncpg.Connection) -> None:
    """The class behind the tests above: every statement of queries.sql, prepared on
    the migrated schema, has no json/jsonb parameter (saga passes JSON as text, cast in
    SQL) and no json/jsonb result column (returned as text), so a caller's codecs never
    apply. Before, 7 statements took jsonb parameters (a transition's error and events,
    an operator's data, a start's trace context, a signal's sender)."""
    found = []
    skipped = set()
    for name, sql in sorted(queries("saga").items()):
        try:
            statement = await db.prepare(sql)
        except asyncpg.PostgresError:
            skipped.add(name)
            continue
        params = [n for n, t in enumerate(statement.get_parameters(), 1) if "json" in t.name]
        columns = [a.name for a in statement.get_attributes() if "json" in a.type.name]
        if params or columns:
            found.append((name, params, columns))
    assert found == []
    assert skipped == _UNPREPARED


async def test_a_run_whose_trace_context_cannot_be_read_runs_in_a_trace_of_its_own(
    open_client: ClientFactory, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """DESIGN: nothing stored can make a run retry forever. A run whose stored trace
    context is not a carrier (a JSON string, as a caller's codec once wrote) runs and
    completes, its step once. Before, each claim failed before the step (an internal
    error in reading the carrier) and the run was claimed again for ever."""
    ledger = Ledger()
    s = small_saga("bad_carrier", ["a"], ledger=ledger)
    client = await open_client(s)
    run = await client.start(s, Job())
    await db.execute("UPDATE saga.runs SET trace_context = '\"{}\"'::jsonb WHERE id = $1", run.id)
    await orchestrator(s, lease_seconds=1)
    assert await run.result(timeout=10) == "a"
    assert len(ledger.of("step")) == 1
