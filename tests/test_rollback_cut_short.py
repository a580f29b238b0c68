"""An attempt cut short (its worker killed) while its run rolls back runs again to its
end and is compensated if it completes; a step leased but never begun is not started.
What tells them apart is the run's history (the query ``attempt_began``)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import saga
from saga._store import Store
from saga.testing import Faults
from tests._sagas import Fail, Job, Ledger, fast, permanent, small_saga
from tests.conftest import OrchestratorFactory


@pytest.mark.parametrize("how", ["failure", "cancel"])
async def test_a_branch_cut_short_while_its_run_rolls_back_finishes_and_is_undone(
    orchestrator: OrchestratorFactory, how: str
) -> None:
    """README, Parallel steps: "When a step fails for good (or the run is cancelled), no
    new step starts; branches already running finish their attempt, and if they complete
    they are compensated too"; DESIGN: "A crash, a deploy ... loses nothing".

    Branch b runs, then its worker dies before recording it (crash_after), and the run
    starts rolling back while b's lease waits to expire: branch c fails for good, or the
    run is cancelled. b's attempt, cut short, is run again to its end and compensated
    before a. Before, the claim after the expired lease dropped b as a step that never
    ran: its effect stayed, uncompensated, though the run ended compensated/cancelled."""
    effects = Ledger()
    s = small_saga(
        f"g_cut_{how}",
        ["a", "b", "c"],
        after={"a": [], "b": ["a"], "c": ["a"]},
        compensate=True,
        ledger=effects,
        delay={"c": 0.3} if how == "failure" else {"c": 2.0},
        fail={"c": permanent("no")} if how == "failure" else None,
    )
    faults = Faults()
    faults.crash_after("b")
    orch = await orchestrator(s, lease_seconds=1.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        while faults.fired["crash_after"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    if how == "cancel":
        await run.cancel()
    ends = saga.RunCompensatedError if how == "failure" else saga.RunCancelledError
    with pytest.raises(ends):
        await run.result(timeout=20)
    assert effects.steps("step", run.id).count("b") == 2
    undone = effects.steps("compensation", run.id)
    assert "b" in undone, undone
    assert undone.index("b") < undone.index("a"), undone
    assert effects.net[f"{run.id}:step:b"] == 0, "b's effect stayed"


async def test_a_step_leased_but_never_begun_is_still_dropped_by_a_cancel(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Operator actions: "`cancel()` ... then every completed step is
    compensated"; Parallel steps: "no new step starts".

    The other side of the test above: a step whose last attempt recorded its outcome (a
    retryable failure, waiting out its backoff) is leased by a worker that dies before
    starting it, and the run is cancelled. The claim after that lease expired does not
    run the step again (nothing of it is running or was cut short): the run rolls
    back at once, and the step ran once."""
    effects = Ledger()
    slow = saga.Retry(max_attempts=3, initial_delay=300, max_delay=300)
    s = small_saga(
        "never_begun",
        ["s1", "s2"],
        compensate=True,
        ledger=effects,
        fail={"s2": Fail(ValueError, "once", 1)},
        retry={"s1": fast(3), "s2": slow},
    )
    orch = await orchestrator(s)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        while effects.steps("step", run.id) != ["s1", "s2"]:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await orch.aclose()
    # A worker (gone now) leased it and died before it started s2's next attempt.
    await db.execute(
        "UPDATE saga.runs SET lease_owner = 'gone', lease_token = lease_token + 1,"
        " attempt = attempt + 1, due_at = now() - interval '1 second',"
        " cancel_requested = true WHERE id = $1",
        run.id,
    )
    again = await orchestrator(s)
    with pytest.raises(saga.RunCancelledError):
        await again.get_run(run.id).result(timeout=10)
    assert effects.steps("step", run.id) == ["s1", "s2"]
    assert effects.steps("compensation", run.id) == ["s1"]


#: Forward events of step s1 (and one of s2) in history order, and whether s1's latest
#: attempt began and recorded no outcome.
HISTORIES = [
    ([], False),
    (["step_ready"], False),
    (["step_started"], True),
    (["step_started", "lease_expired"], True),
    (["step_started", "lease_released", "rate_limited"], True),
    (["step_started", "step_completed"], False),
    (["step_started", "step_failed"], False),
    (["step_started", "step_failed", "step_started"], True),
    (["step_started", "step_failed", "lease_expired"], False),
    (["step_started", "sleep_started"], False),
    (["step_started", "wait_started"], False),
    (["step_started", "children_waiting"], False),
    (["s2:step_started"], False),
    (["step_started", "s2:step_completed"], True),
]


@pytest.mark.parametrize(("kinds", "began"), HISTORIES)
async def test_what_tells_an_attempt_cut_short_from_one_never_begun(
    store: Store, db: asyncpg.Connection, kinds: list[str], began: bool
) -> None:
    """The history decides: s1's attempt was cut short when its latest forward event is
    its start (lease events, rate limits and other steps' events do not count)."""
    s = small_saga("histories", ["s1", "s2"])
    async with saga.Client(store.pool, sagas=[s]) as client:
        run = await client.start(s, Job(n=1))
    for n, kind in enumerate(kinds):
        step, _, kind = kind.rpartition(":")
        await db.execute(
            "INSERT INTO saga.events (run_id, kind, step, attempt, worker)"
            " VALUES ($1, $2, $3, $4, 'w')",
            run.id,
            kind,
            step or "s1",
            n + 1,
        )
    assert await store.attempt_began(run.id, "s1") is began
