"""An orchestrator that stalls without dying (SIGSTOP, as tests/_harness.Child.pause: a
paused VM, a frozen container) while it holds a schedule's turn: the schedule's row and
the keys of the keyed runs it starts are locked by its transaction. Postgres ends that
transaction once it sits idle for 5 s, so the other orchestrators go on.

To stall the process at that instant, the child orchestrator stops itself from the
saga's ``priority`` function, which the scheduler calls for each slot inside its
transaction (any stall between the lock and the commit has the same effect).
"""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._harness import Children, python_env
from tests._sagas import Job

pytestmark = pytest.mark.timeout(60)

EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))

_PRIORITY_CALLS: list[int] = []


def _stall_priority(job: Job) -> int:
    """In a child started with SAGA_TEST_STALL=N, the N-th priority computed freezes the whole
    process (SIGSTOP). Elsewhere: priority 0."""
    _PRIORITY_CALLS.append(1)
    if os.environ.get("SAGA_TEST_STALL") == str(len(_PRIORITY_CALLS)):
        os.kill(os.getpid(), signal.SIGSTOP)
    return 0


async def _slow_input(slot: datetime) -> Job:
    """0.5 s in the test's own process (not in the child): the child always locks a
    slot's schedule row first, so it is the one that stalls holding it."""
    if "SAGA_TEST_STALL" not in os.environ:
        await anyio.sleep(0.5)
    return Job()


stall = saga.Saga("stall", input=Job, priority=_stall_priority)


@stall.step()
async def stall_step(ctx: saga.Context[Job]) -> int:
    return 1


TICKS = saga.Scheduled("ticks", stall, EVERY_SECOND, Job())
TICKS_SLOW_INPUT = saga.Scheduled("ticks_slow_input", stall, EVERY_SECOND, _slow_input)

keyed = saga.Saga("keyed", input=Job, priority=_stall_priority, concurrency_key=lambda j: "acct")


@keyed.step()
async def keyed_step(ctx: saga.Context[Job]) -> int:
    await anyio.sleep(3 if ctx.input.n == 1 else 0.01)
    return ctx.input.n


KEYED_TICKS = saga.Scheduled("keyed_ticks", keyed, EVERY_SECOND, Job(n=5), missed="all")

# ``python -c CHILD DSN SAGA SCHEDULE``: an orchestrator holding one schedule of this module.
_CHILD = """
import sys, anyio, saga
from tests import test_stalled_orchestrators as t
async def main():
    async with saga.Orchestrator(sys.argv[1], sagas=[getattr(t, sys.argv[2])],
                                 schedules=[getattr(t, sys.argv[3])],
                                 lease_seconds=1, poll_interval=0.2):
        print("READY", flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def _stalling_child(children: Children, dsn: str, saga_name: str, schedule: str, nth: int) -> Any:
    return children.python(
        "-c", _CHILD, dsn, saga_name, schedule,
        name="stalling", env=python_env(dsn, SAGA_TEST_STALL=str(nth)), ready="READY",
    )  # fmt: skip


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


async def _until_stalled(child: Any) -> datetime:
    with anyio.fail_after(15):
        while not (child.alive and _stopped(child.pid)):  # noqa: ASYNC110 - another process
            await anyio.sleep(0.05)
    return datetime.now(UTC)


def _slot(key: str) -> datetime:
    stamp = key.split(":", 2)[2]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


async def _slots_run(db: asyncpg.Connection, name: str) -> list[datetime]:
    rows = await db.fetch(
        "SELECT idempotency_key FROM saga.runs WHERE idempotency_key LIKE $1",
        f"schedule:{name}:%",
    )
    return sorted(_slot(r[0]) for r in rows)


async def _outcome(run: saga.RunHandle, timeout: float) -> Any:
    try:
        return await run.result(timeout=timeout)
    except saga.RunError as exc:
        return exc


_OPTIONS: dict[str, Any] = {"poll_interval": 0.2, "shutdown_timeout": 0.5}


async def test_an_orchestrator_stalled_in_a_schedules_turn_does_not_stop_its_slots(
    children: Children, dsn: str, db: asyncpg.Connection
) -> None:
    """README, Schedules: any number of orchestrators may hold a schedule; "Each slot
    starts at most one run ... and exactly one while at least one is up".

    Two orchestrators hold an every-second schedule; the other one stalls while it
    handles a slot (its transaction holds the schedule's row). This test's goes on
    firing the slots (3 or more in the next 10 s). Before, its SKIP LOCKED skipped the
    held row every second for as long as the stall lasted: no slot ran."""
    options = {**_OPTIONS, "sagas": [stall], "schedules": [TICKS_SLOW_INPUT]}
    async with saga.Orchestrator(dsn, **options):
        with anyio.fail_after(10):
            while not await _slots_run(db, TICKS_SLOW_INPUT.name):  # noqa: ASYNC110
                await anyio.sleep(0.1)  # the healthy orchestrator fires slots
        child = _stalling_child(children, dsn, "stall", "TICKS_SLOW_INPUT", 1)
        stalled_at = await _until_stalled(child)
        await anyio.sleep(10)
        slots = [s for s in await _slots_run(db, TICKS_SLOW_INPUT.name) if s > stalled_at]
        child.kill()
    assert len(slots) >= 3, (
        f"an orchestrator stalled while handling the schedule: in the 5 s after, with "
        f"another orchestrator holding the schedule up, {len(slots)} slots ran"
    )


async def test_an_orchestrator_opens_while_another_is_stalled_in_a_schedules_turn(
    children: Children, dsn: str, db: asyncpg.Connection
) -> None:
    """README, Schedules: "exactly one [run per slot] while at least one is up".

    The only orchestrator holding an every-second schedule stalls while it handles a
    slot; a second one started to take over opens and fires the slots. Before, its
    registration of the schedule (an upsert of the row) waited for the stalled
    transaction's lock for as long as the stall lasted."""
    child = _stalling_child(children, dsn, "stall", "TICKS", 1)
    stalled_at = await _until_stalled(child)
    opened = anyio.Event()

    async def take_over() -> None:
        async with saga.Orchestrator(dsn, sagas=[stall], schedules=[TICKS], **_OPTIONS):
            opened.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take_over)
        await anyio.sleep(10)
        was_open = opened.is_set()
        slots = [s for s in await _slots_run(db, TICKS.name) if s > stalled_at]
        child.kill()  # frees the row: the orchestrator above can open, then close
        with anyio.fail_after(15):
            await opened.wait()
        tg.cancel_scope.cancel()
    assert (was_open, len(slots) >= 3) == (True, True), (
        f"a second orchestrator given the schedule while the first is stalled: opened "
        f"within 10 s: {was_open}; slots run meanwhile: {len(slots)}"
    )


async def test_a_stalled_scheduler_does_not_keep_a_keys_holder_from_ending(
    children: Children, dsn: str
) -> None:
    """README, One at a time per key: "When a run with that key ends, the oldest waiting
    one ... is admitted in the same transaction"; "nothing can leak a slot".

    Run H holds key "acct" (a 3 s step), run Q waits for it. An orchestrator handling a
    `missed="all"` schedule of the same saga locks the key's row in its transaction
    (the first slot's start), then stalls. H ends, and Q is admitted and ends. Before,
    H's end waited for the key's row for as long as the stall lasted: H stayed
    `running` and Q was never admitted."""
    options = {**_OPTIONS, "sagas": [keyed]}
    async with saga.Orchestrator(dsn, schedules=[KEYED_TICKS], **options):
        pass  # registers the schedule
    await anyio.sleep(3)  # nothing holds it up: its slots are missed
    async with saga.Orchestrator(dsn, **options) as orch:
        holder = await orch.start(keyed, Job(n=1))
        queued = await orch.start(keyed, Job(n=2))
        with anyio.fail_after(10):
            while "step_started" not in [e.kind for e in await holder.history()]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        child = _stalling_child(children, dsn, "keyed", "KEYED_TICKS", 2)
        await _until_stalled(child)
        ended = None
        with anyio.move_on_after(14):
            ended = (await _outcome(holder, 14), await _outcome(queued, 14))
        status = (await holder.info()).status
        child.kill()
    assert ended == (1, 2), (
        f"the key's holder (3 s step) did not end within 14 s (status {status}); the run "
        f"waiting for the key was never admitted"
    )


@pytest.mark.timeout(40)
async def test_a_stalled_session_of_sagas_own_pool_frees_its_locks(
    orchestrator: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Runtime: the pools saga owns run with `idle_in_transaction_session_timeout`
    (60 s): a process that stalls inside one of saga's transactions does not hold its
    row locks longer. With the setting at 2 s (the module's constant, read when a pool
    opens), a session of an orchestrator's pool takes a lock in a transaction and sends
    nothing more, as a frozen process would: Postgres ends it, and the lock is free for
    another session; the sessions say the setting."""
    import saga._db
    from saga._client import store_of

    assert saga._db.IDLE_IN_TRANSACTION == "60s"
    monkeypatch.setattr(saga._db, "IDLE_IN_TRANSACTION", "2s")
    orch = await orchestrator()
    pool = store_of(orch).pool
    assert await pool.fetchval("SHOW idle_in_transaction_session_timeout") == "2s"
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SELECT pg_advisory_xact_lock(4242)")
        assert not await db.fetchval("SELECT pg_try_advisory_lock(4242)")  # held
        with anyio.fail_after(10):
            while not await db.fetchval("SELECT pg_try_advisory_lock(4242)"):  # noqa: ASYNC110 - the server's timeout
                await anyio.sleep(0.2)
        await db.execute("SELECT pg_advisory_unlock(4242)")
