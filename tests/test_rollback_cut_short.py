"""An attempt cut short (its worker killed) while its run rolls back runs again to its
end and is compensated if it completes; a step with no attempt started (waiting out its
backoff) is not started. What tells them apart is the run's history (the query
``attempt_began``)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import saga
from saga._store import Store
from saga.testing import Faults
from tests._sagas import Fail, Job, Ledger, fast, permanent, small_saga
from tests.conftest import OrchestratorFactory

#: Three attempts, 300 s apart: a retry would not come within a test's time.
SLOW = saga.Retry(max_attempts=3, initial_delay=300, max_delay=300)


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


async def test_a_step_waiting_out_its_backoff_is_not_started_by_a_cancel_after_a_crash(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Operator actions: "`cancel()` ... then every completed step is
    compensated"; Parallel steps: "no new step starts".

    The other side of the tests above: a step whose last attempt recorded its outcome (a
    retryable failure, waiting out its backoff), and the run is cancelled; the worker
    claiming it to roll back dies before writing anything. The claim after that lease
    expired does not run the step again (nothing of it is running or was cut short):
    the run rolls back at once, and the step ran once."""
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


async def _crashed(faults: Faults) -> None:
    with anyio.fail_after(10):
        while faults.fired["crash_after"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)


def _rate_limited_saga(
    name: str, ledger: Ledger, rl: saga.RateLimit, graph: bool = False
) -> saga.Saga[Job]:
    s = saga.Saga(name, input=Job)

    async def one(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return "s1"

    async def undo_one(ctx: saga.Context[Job], value: str) -> None:
        ledger.record(ctx, value)

    async def two(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return "s2"

    async def undo_two(ctx: saga.Context[Job], value: str) -> None:
        ledger.record(ctx, value)

    s.step(name="s1", after=[] if graph else None)(one).compensate()(undo_one)
    s.step(name="s2", rate_limit=rl, after=["s1"] if graph else None)(two).compensate()(undo_two)
    return s


@pytest.mark.timeout(60)
async def test_graph_cut_short_rerun_fails_retryably_during_rollback_is_not_retried(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Steps run at least once: the re-run of an attempt cut short while its run
    rolls back is "one more attempt within its policy's limit and no retry after it".

    Graph a -> (b, c); b crashes (crash_after), c fails for good; b's re-run raises a
    retryable error (b's policy waits 300 s between attempts). The run must roll back
    now, not after a retry's backoff."""
    effects = Ledger()
    s = small_saga(
        "g_rerun_fails",
        ["a", "b", "c"],
        after={"a": [], "b": ["a"], "c": ["a"]},
        compensate=True,
        ledger=effects,
        delay={"c": 0.3},
        fail={
            "c": permanent("no"),
            "b": Fail(ConnectionError, "flaky", None, lambda c: c.attempt >= 2),
        },
        retry={"a": fast(3), "b": SLOW, "c": fast(3)},
    )
    faults = Faults()
    faults.crash_after("b")
    orch = await orchestrator(s, lease_seconds=1.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    await _crashed(faults)
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=20)
    assert effects.steps("step", run.id).count("b") == 2
    assert "b" not in effects.steps("compensation", run.id)


@pytest.mark.timeout(60)
async def test_cut_short_rerun_history_and_key(orchestrator: OrchestratorFactory) -> None:
    """README: "`ctx.idempotency_key` is `"<run id>:step:<step>"` for every attempt on
    every worker ... In the history: the step's `lease_expired` (or `lease_released`),
    then its `step_started`, after `cancel_requested` or `run_compensating`"."""
    effects = Ledger()
    s = small_saga("hist_cut", ["s1", "s2", "s3"], compensate=True, ledger=effects)
    faults = Faults()
    faults.crash_after("s2")
    orch = await orchestrator(s, lease_seconds=1.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    await _crashed(faults)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=20)
    keys = {c.key for c in effects.of("step", run.id) if c.step == "s2"}
    assert keys == {f"{run.id}:step:s2"}
    kinds = [(e.kind, e.step) for e in await run.history()]
    i = kinds.index(("cancel_requested", None)) if ("cancel_requested", None) in kinds else -1
    after = kinds[i + 1 :]
    assert ("lease_expired", "s2") in after, kinds
    j = after.index(("lease_expired", "s2"))
    assert ("step_started", "s2") in after[j:], kinds
    assert ("step_completed", "s2") in after[j:], kinds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("graph", [False, True])
async def test_cut_short_rate_limited_step_is_run_again_and_undone_during_a_cancel(
    orchestrator: OrchestratorFactory, graph: bool
) -> None:
    """README, cancel(): "the step running now finishes its attempt (run again to its end
    if its worker dies meanwhile), then every completed step is compensated"; Steps run
    at least once: an attempt cut short while its run rolls back "runs again to its end
    ... and its step is compensated if it completes".

    s2 has a rate limit (a token every 5 s); it takes the token, has its effect, and its
    worker dies (crash_after); the run is cancelled. s2's re-run must wait for its next
    token and run. Before, the re-run, waiting for its token, saw the cancel (as an
    attempt that never began would) and gave up: s2 was neither run again nor
    compensated, its effect stayed, and the run ended `cancelled`."""
    effects = Ledger()
    rl = saga.RateLimit("h38_rl3", per_second=0.2, burst=1)
    s = _rate_limited_saga(f"rl_crash_{graph}", effects, rl, graph)
    faults = Faults()
    faults.crash_after("s2")
    orch = await orchestrator(s, lease_seconds=1.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    await _crashed(faults)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=30)
    kinds = [(e.kind, e.step) for e in await run.history()]
    assert effects.net[f"{run.id}:step:s2"] == 0, (
        f"s2's effect stays: steps {effects.steps('step', run.id)}, undone"
        f" {effects.steps('compensation', run.id)}; {kinds}"
    )
