"""Traffic control at its edges: queues of parallel sagas, schedules whose input fails or
is async or whose worker's clock is off, lanes and the census, keys held through a
child's undo and queued in start order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest
from pydantic import BaseModel, field_validator
from structlog.testing import capture_logs

import saga
import saga._scheduler
from tests._sagas import Gate, Job, parked_saga, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory


async def test_queues_show_the_due_work_of_sagas_with_parallel_steps(
    open_client: ClientFactory,
) -> None:
    """`saga.queues(client)` shows the work due and not taken per saga: three runs of a
    saga whose steps run in parallel (`after=`), started with no worker for it, count
    as three, exactly as three runs of a linear saga do."""
    linear = small_saga("linear", 1)
    fanout = small_saga("fanout", ["a", "b", "c"], after={"c": ["a", "b"]})
    client = await open_client(linear, fanout)
    for _ in range(3):
        await client.start(linear, Job())
        await client.start(fanout, Job())
    q = await saga.queues(client)
    due = {d.saga: d.runs for d in q.due}
    assert due.get("linear") == 3
    assert due.get("fanout", 0) >= 3, f"queues() shows no due work of 'fanout': {q.due}"


class Report(BaseModel):
    region: str

    @field_validator("region")
    @classmethod
    def known_region(cls, region: str) -> str:
        return {"eu": "eu-west-1", "us": "us-east-1"}[region]  # KeyError: unknown region


@pytest.mark.timeout(60)
async def test_a_schedule_input_that_fails_validation_does_not_stop_the_orchestrator(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """No setting can stop an orchestrator: a schedule whose input (a mapping) fails a
    validator raising KeyError (pydantic passes all but ValueError on) is refused slot
    after slot, and the orchestrator stays open and runs other sagas."""
    reports = small_saga("reports", 1, input=Report)
    other = small_saga("other", 1)
    bad = saga.Scheduled(
        "bad-region", reports, saga.Schedule.every(timedelta(seconds=1)),
        lambda slot: {"region": "mars"},
    )  # fmt: skip
    with capture_logs():
        orch = await orchestrator(reports, other, schedules=[bad], poll_interval=0.2)
        await anyio.sleep(2.5)  # two or three slots came due
        failure = getattr(orch, "_failure", None)
        assert orch.is_open, f"the orchestrator's loops died of the schedule's input: {failure!r}"
        run = await orch.start(other, Job())
        with anyio.fail_after(10):
            assert await run.result() == "s1"


class SkewedClock(datetime):
    """The worker's wall clock, an hour behind the database's."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:  # type: ignore[override]
        return datetime.now(tz) - timedelta(hours=1)


@pytest.mark.timeout(60)
async def test_a_new_schedule_does_not_run_slots_from_before_it_existed(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A brand-new every-minute schedule with missed="all", registered by a worker whose
    clock is an hour behind the database's, starts no run for a slot from before it
    existed: its first slot comes from the database's clock."""
    monkeypatch.setattr(saga._scheduler, "datetime", SkewedClock)
    s = small_saga("minutely", 1)
    every_minute = saga.Scheduled(
        "every-minute", s, saga.Schedule.every(timedelta(minutes=1)), Job(), missed="all"
    )
    registered = datetime.now(UTC)
    await orchestrator(s, schedules=[every_minute], poll_interval=0.2)
    await anyio.sleep(1.5)
    keys = [
        r[0]
        for r in await db.fetch(
            "SELECT idempotency_key FROM saga.runs WHERE idempotency_key LIKE 'schedule:%'"
        )
    ]
    before = [
        k
        for k in keys
        if datetime.strptime(k.split(":", 2)[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        < registered - timedelta(seconds=1)
    ]
    assert before == [], f"{len(before)} runs for slots before the schedule existed: {before}"


@pytest.mark.timeout(60)
async def test_a_lane_orchestrator_does_not_report_its_own_sagas_as_unknown(
    orchestrator: OrchestratorFactory,
) -> None:
    """An orchestrator with lanes= registered the other lane's saga: its runs are not
    logged as `unknown_definition_waiting` (only runs of definitions it did not register
    are, as `unclaimable_runs()` counts)."""
    urgent = small_saga("urgent", 1, traffic={"lane": "payments"})
    bulk = parked_saga("bulk")
    with capture_logs() as logs:
        orch = await orchestrator(urgent, bulk, lanes=["payments"], census_interval=0.1)
        await orch.start(bulk, Job())
        assert await orch.unclaimable_runs() == {}
        await anyio.sleep(1.0)
    unknown = [e for e in logs if e.get("event") == "unknown_definition_waiting"]
    assert unknown == [], f"a registered saga reported as an unknown definition: {unknown}"


@pytest.mark.timeout(60)
async def test_a_reverted_keyed_child_compensates_holding_its_key(
    orchestrator: OrchestratorFactory,
) -> None:
    """At most `concurrency_limit` runs of a key are active, compensation included: a
    keyed child that completed (its key released) and is undone by its parent's
    rollback waits for the key, held meanwhile by another run in its step, before its
    compensation runs; then it runs, and the parent ends compensated."""
    undo_started = anyio.Event()
    holder_in_step = anyio.Event()
    holder_release = anyio.Event()
    parent_entered = anyio.Event()
    parent_release = anyio.Event()

    kid = saga.Saga("kid", input=Job, concurrency_key=lambda job: "acct-1")

    @kid.step()
    async def debit(ctx: saga.Context[Job]) -> int:
        if ctx.input.n == 2:
            holder_in_step.set()
            await holder_release.wait()
        return ctx.input.n

    @debit.compensate
    async def refund(ctx: saga.Context[Job], n: int) -> None:
        undo_started.set()

    parent = saga.Saga("parent", input=Job)
    kids = parent.children("kids", kid, lambda ctx: [Job(n=1)])

    @parent.step(after=[kids])
    async def boom(ctx: saga.Context[Job]) -> None:
        parent_entered.set()
        await parent_release.wait()
        raise saga.PermanentError("the order was refused")

    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job())
    with anyio.fail_after(10):
        await parent_entered.wait()  # the child completed: the key is free
    holder = await orch.start(kid, Job(n=2))
    with anyio.fail_after(10):
        await holder_in_step.wait()  # holder holds acct-1, in its step
    assert not (await holder.info()).waiting_for_key
    parent_release.set()  # the parent fails: its children step reverts the child
    overlapped = False
    with anyio.move_on_after(4):
        await undo_started.wait()
        overlapped = True
    assert not overlapped, (
        "the reverted child's compensation ran while another run held its key acct-1"
    )
    holder_release.set()
    with anyio.fail_after(20), pytest.raises(saga.RunCompensatedError):
        await run.result()
    assert undo_started.is_set()
    assert await holder.result(timeout=10) == 2


@pytest.mark.timeout(60)
async def test_a_slot_whose_input_failed_once_still_runs(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A slot handled within `grace` always runs: one whose input function fails once
    (a blip) is tried again and runs once, and is not counted as a late slot skipped."""
    failed: list[datetime] = []

    def build(slot: datetime) -> Job:
        if not failed:
            failed.append(slot)
            raise ConnectionError("config service unavailable")
        return Job(n=slot.second)

    s = small_saga("blip", 1)
    blip = saga.Scheduled("blip", s, saga.Schedule.every(timedelta(seconds=1)), build)
    with capture_logs():
        orch = await orchestrator(s, schedules=[blip], poll_interval=0.2)
        with anyio.fail_after(10):
            while not failed:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await anyio.sleep(2.5)  # well within the 1-minute grace of the failed slot
    (info,) = await saga.list_schedules(orch)
    key = f"schedule:blip:{failed[0].strftime('%Y-%m-%dT%H:%M:%SZ')}"
    ran = await db.fetchval("SELECT count(*) FROM saga.runs WHERE idempotency_key = $1", key)
    assert ran == 1, (
        f"the on-time slot {failed[0].isoformat()} never ran (skipped={info.skipped}, "
        f"next_fire={info.next_fire.isoformat()})"
    )


@pytest.mark.timeout(60)
async def test_runs_waiting_for_a_key_are_admitted_in_start_order_with_conn(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Runs waiting for a key are admitted in start order: run B, started while the key
    is held, goes before run A, started afterwards inside a caller's transaction
    (`conn=`) that had begun before B's start."""
    gate = Gate("s1", when=lambda ctx: ctx.input.n == 1)
    s = small_saga("acct", 1, gate=gate, traffic={"concurrency_key": lambda job: "k"})
    orch = await orchestrator(s, concurrency=8)
    holder = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    tx = db.transaction()
    await tx.start()
    await db.execute("SELECT 1")  # the caller's transaction does its own work first
    await anyio.sleep(0.05)
    first = await orch.start(s, Job(n=2))  # B: started and committed while A's tx is open
    second = await orch.start(s, Job(n=3), conn=db)  # A
    await tx.commit()
    assert (await first.info()).waiting_for_key
    assert (await second.info()).waiting_for_key
    gate.release.set()
    with anyio.fail_after(20):
        for run in (holder, first, second):
            await run.result()
    order = [
        r[0]
        for r in await db.fetch(
            "SELECT run_id FROM saga.events WHERE kind = 'key_admitted' AND run_id = ANY($1)"
            " ORDER BY id",
            [first.id, second.id],
        )
    ]
    assert order == [first.id, second.id], "the run started later was admitted first"


async def _async_input(slot: datetime) -> Job:
    await anyio.lowlevel.checkpoint()
    return Job(n=slot.second)


@pytest.mark.timeout(60)
async def test_an_async_input_function_is_awaited(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A schedule's input may be an async function of the slot's time: it is awaited,
    and the slot's run gets the model it returns."""
    s = small_saga("ticking", 1)
    ticking = saga.Scheduled("ticking", s, saga.Schedule.every(timedelta(seconds=1)), _async_input)
    await orchestrator(s, schedules=[ticking], poll_interval=0.2)
    with anyio.fail_after(10):
        while True:
            rows = await db.fetch(
                "SELECT idempotency_key, input FROM saga.runs WHERE saga_name = 'ticking'"
            )
            if rows:
                break
            await anyio.sleep(0.1)
    key, text = rows[0]
    slot = datetime.strptime(key.split(":", 2)[2], "%Y-%m-%dT%H:%M:%SZ")
    assert Job.model_validate_json(text) == Job(n=slot.second)


def test_lanes_that_are_not_names_get_a_configuration_error() -> None:
    """`lanes=` takes lane names: a nested list (`lanes=[["payments"]]`, say from a
    config loader) is a ConfigurationError naming the setting."""
    s = small_saga("pay", 1, traffic={"lane": "payments"})
    with pytest.raises(saga.ConfigurationError, match="lanes"):
        saga.Orchestrator("postgresql://nobody@/nowhere", sagas=[s], lanes=[["payments"]])


@pytest.mark.timeout(60)
async def test_queue_depth_counts_linear_and_parallel_versions_of_one_saga_together(
    open_client: ClientFactory,
) -> None:
    """During a deploy that turns a linear saga into one whose steps run in parallel
    (same name, next version), runs of both versions are due: `saga.queues()` shows one
    row for the (saga, priority) pair counting all five, and so does the census behind
    the gauge `saga.queue.depth`."""
    v1 = saga.Saga("deployed", input=Job, version=1)

    @v1.step()
    async def a1(ctx: saga.Context[Job]) -> int:
        return 1

    @v1.step()
    async def b1(ctx: saga.Context[Job]) -> int:
        return 2

    v2 = saga.Saga("deployed", input=Job, version=2)

    @v2.step()
    async def a2(ctx: saga.Context[Job]) -> int:
        return 1

    @v2.step(after=[a2])
    async def b2(ctx: saga.Context[Job]) -> int:
        return 2

    @v2.step(after=[a2])
    async def c2(ctx: saga.Context[Job]) -> int:
        return 3

    client = await open_client(v1, v2)  # executes nothing: every run stays due
    assert v1.graph is None
    assert v2.graph is not None
    for n in range(2):
        await client.start(v1, Job(n=n))
    for n in range(3):
        await client.start(v2, Job(n=n))
    found = await saga.queues(client)
    rows = [(q.saga, q.priority, q.runs) for q in found.due if q.saga == "deployed"]
    store = client._store_or_raise()
    census = await store.census([("deployed", 1, v1.fingerprint), ("deployed", 2, v2.fingerprint)])
    gauge = sum(runs for (name, _), (runs, _) in census.queues.items() if name == "deployed")
    assert (len(rows), gauge) == (1, 5), f"queues() rows {rows}; saga.queue.depth {gauge}"
