"""Graph runs' writes racing other workers' claims: a decision taken under the run's lock
must see what a claim of one of its items committed meanwhile (a claim locks the item, not
the run). A trigger sleeping inside the claim's transaction makes the race certain."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Gate, Job, Ledger, permanent, small_saga
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


async def _until_sleeping(db: Any) -> None:
    """Until a backend sleeps in a test trigger (pg_sleep)."""
    while not await db.fetchval(  # noqa: ASYNC110 - polling the database
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
    ):
        await anyio.sleep(0.01)


async def test_a_branch_claimed_while_another_fails_is_not_dropped_under_its_worker(
    orchestrator: OrchestratorFactory, db: Any
) -> None:
    """When a step fails for good, no new step starts; branches already running finish
    their attempt, and if they complete they are compensated too (README, "Steps in
    parallel").

    f and a start together; a completes and makes x1 and x2 ready: x1 is leased to the
    worker that wrote a (its last free slot), x2 is left due for any worker. Another
    worker's claim of x2 (claim_items: it locks the item row, never the run's row) is
    held 2 s inside its transaction by a trigger. Meanwhile f fails for good: its write
    locks the run, reads the items (graph_items: x2 is not leased in that snapshot, the
    claim has not committed), the plan starts the rollback and drops x2 as "not
    started", and graph_write's DELETE of x2 waits for the claim's row lock. Once the
    claim commits, the DELETE re-checks only the item's key and deletes the item the
    claim just leased. The claim read the run as running (its snapshot predates the
    failure), so x2's step starts and completes; its write found no item (lease "lost")
    and recorded nothing: the run ended compensated with x2 done and never undone. Now
    the write locks the run's items, waits for the claim, and sees x2 running."""
    ledger = Ledger()
    gate = Gate("f")
    s = small_saga(
        "fanout",
        ["f", "a", "x1", "x2"],
        after={"f": [], "a": [], "x1": ["a"], "x2": ["a"]},
        compensate={"a", "x1", "x2"},
        fail={"f": permanent()},
        delay={"x1": 4.0},
        ledger=ledger,
        gate=gate,
    )
    await db.execute(
        """
        CREATE FUNCTION saga.slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_sleep(2);
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow_claim AFTER UPDATE ON saga.items
            FOR EACH ROW WHEN (NEW.step = 'x2' AND NEW.phase = 'step'
                               AND OLD.lease_owner IS NULL AND NEW.lease_owner IS NOT NULL)
            EXECUTE FUNCTION saga.slow_claim();
        """
    )
    first = await orchestrator(s, concurrency=2)
    handle = await first.start(s, Job())
    with anyio.fail_after(30):
        await gate.entered.wait()
        while not await db.fetchval(  # noqa: ASYNC110 - polling the database
            "SELECT count(*) FROM saga.items WHERE run_id = $1 AND step = 'x2'", handle.id
        ):
            await anyio.sleep(0.01)
        await orchestrator(s, concurrency=1)  # a worker with a free slot claims x2
        await _until_sleeping(db)
        gate.release.set()  # f fails for good while x2's claim is held
        with pytest.raises(saga.RunCompensatedError):
            await handle.result()
        await anyio.sleep(0.5)  # x2's worker has written (or not) by now
    ran = "x2" in ledger.steps("step")
    undone = "x2" in ledger.steps("compensation")
    assert not ran or undone, (
        f"x2 ran after f failed and was never compensated: {ledger.trace(handle.id)}"
    )
