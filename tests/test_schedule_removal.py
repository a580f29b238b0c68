"""Removing a schedule gone from the code: it stops showing (late for ever, before), the
runs it started stay, and one a running orchestrator still declares comes back."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import saga
from tests._sagas import Job, small_saga
from tests.conftest import Cli, OrchestratorFactory
from tests.test_telemetry import points


async def _until(check: Callable[[], Any]) -> None:
    """Poll ``check`` (sync or async) until it is truthy (the caller bounds the time)."""
    while True:
        value = check()
        if await value if inspect.isawaitable(value) else value:
            return
        await anyio.sleep(0.05)


async def _at_least(db: asyncpg.Connection, runs: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM saga.runs") >= runs)


def _late(reader: InMemoryMetricReader) -> dict[str, float]:
    return {a["saga.schedule"]: v for a, v in points(reader).get("saga.schedules.late", [])}


@pytest.mark.timeout(60)
async def test_a_schedule_gone_from_the_code_is_removed_and_stops_showing_late(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, cli: Cli
) -> None:
    """README (Traffic control): "`remove_schedule(client, name)` (forgets a schedule no
    orchestrator declares any more ...: it leaves `list_schedules`, and the
    `saga.schedules.late` gauge reports it 0; the runs it started stay"; (Command line)
    `saga remove-schedule NAME`; an unknown name is a `ConfigurationError` (the CLI
    exits 2).

    Before, a schedule removed from the code kept its row: `saga schedules` showed it
    late, and the gauge every orchestrator reports grew, for ever (pausing it was the
    only way to quiet it). An orchestrator without it (a later deploy) reports the stale
    row late until it is removed, then 0; the runs it started stay."""
    s = small_saga("report", 1)
    ticks = saga.Scheduled("old-ticks", s, saga.Schedule.every(timedelta(seconds=1)), Job())
    first = await orchestrator(s, schedules=[ticks], poll_interval=0.2)
    with anyio.fail_after(20):
        await _until(lambda: db.fetchval("SELECT count(*) FROM saga.runs"))
    await first.aclose()  # the deploy without the schedule
    await db.execute("UPDATE saga.schedules SET next_fire = now() - interval '1 hour'")
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    later = await orchestrator(s, meter_provider=meters, census_interval=0.1)
    [stale] = await saga.list_schedules(later)
    assert stale.late > 3000
    with anyio.fail_after(10):
        await _until(lambda: _late(reader))
    assert set(_late(reader)) == {"old-ticks"}
    runs = await db.fetchval("SELECT count(*) FROM saga.runs")

    code, out, err = await cli("remove-schedule", "old-ticks", "--json")
    assert code == 0, err
    assert '"removed": true' in out
    assert await saga.list_schedules(later) == []
    assert (await cli.json("schedules"))["schedules"] == []
    with anyio.fail_after(10):  # a census later: 0 (not late), as a series gone does
        await _until(lambda: _late(reader) == {"old-ticks": 0})
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == runs  # its runs stay
    with pytest.raises(saga.ConfigurationError, match="no schedule named 'old-ticks'"):
        await saga.remove_schedule(later, "old-ticks")
    code, out, err = await cli("remove-schedule", "old-ticks")
    assert code == 2, (code, out, err)
    assert "old-ticks" in err


@pytest.mark.timeout(60)
async def test_a_schedule_removed_while_an_orchestrator_declares_it_comes_back(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Traffic control): "One that a running orchestrator still declares is
    registered again by it (as new: next due at its next slot, not paused)"; "Each slot
    starts at most one run".

    A paused every-second schedule removed while its orchestrator runs: within a second
    its row is back, not paused, next due at a later slot, and runs start again from
    it, one per slot."""
    s = small_saga("tick", 1)
    ticks = saga.Scheduled("ticks", s, saga.Schedule.every(timedelta(seconds=1)), Job())
    orch = await orchestrator(s, schedules=[ticks], poll_interval=0.2)
    await saga.pause_schedule(orch, "ticks")
    await saga.remove_schedule(orch, "ticks")
    with anyio.fail_after(10):
        await _until(lambda: saga.list_schedules(orch))
        [info] = await saga.list_schedules(orch)
        assert not info.paused, info
        assert info.late < 1.5, info
        await _until(lambda: _at_least(db, 2))
    keys = [r[0] for r in await db.fetch("SELECT idempotency_key FROM saga.runs")]
    assert len(keys) == len(set(keys)), keys
