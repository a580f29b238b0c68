"""The state machine, table-driven and without a database: from a run's state and how an
attempt went, the transition to write (every status, outcome, and a cancel at each
point)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

import saga
from saga import _plan
from saga._claims import claim_table
from saga._model import EventKind as K
from saga._model import RunStatus as S
from saga._transition import Failed, RunState, Succeeded, Transition


class In(BaseModel):
    n: int


STEP_RETRY = saga.Retry(max_attempts=3, initial_delay=1, multiplier=2, jitter=0)
COMP_RETRY = saga.Retry(max_attempts=2, initial_delay=5, jitter=0)


def _definition() -> saga.Saga[In]:
    """reserve (compensated), notify (nothing to undo), charge (compensated)."""
    s = saga.Saga("plan", input=In)

    async def forward(ctx: saga.Context[In]) -> int:
        return 1

    async def undo(ctx: saga.Context[In], result: int) -> None:
        return None

    s.step(name="reserve", retry=STEP_RETRY, lease_seconds=7)(forward).compensate(retry=COMP_RETRY)(
        undo
    )
    s.step(name="notify", retry=STEP_RETRY)(forward)
    s.step(name="charge", retry=STEP_RETRY)(forward).compensate(retry=COMP_RETRY)(undo)
    return s


SAGA = _definition()
ERROR = {"type": "ValueError", "message": "boom", "step": "x"}


def lease_for(step: str) -> float:
    return SAGA.get_step(step).lease_seconds or 30.0


@dataclass(frozen=True)
class Expect:
    status: S
    step: str | None
    attempt: int
    kinds: tuple[K, ...]
    due_in: float | None = None
    leased: bool = False
    retry: bool = False
    completed_step: str | None = None
    error: bool = False
    compensation_error: bool = False
    unless_cancelled: bool = False
    plan: list[str] | None = None  # of the run_compensating event


def _running(step: str, attempt: int = 1, done: tuple[str, ...] = (), **kw: Any) -> RunState:
    return RunState(status=S.RUNNING, step=step, attempt=attempt, completed=done, **kw)


def _comp(step: str, attempt: int = 1, **kw: Any) -> RunState:
    done = ("reserve", "notify", "charge")
    return RunState(status=S.COMPENSATING, step=step, attempt=attempt, completed=done, **kw)


OK = Succeeded('"r"')
FAIL = Failed(ERROR, retryable=True)
PERMANENT = Failed(ERROR, retryable=False)

AFTER_ATTEMPT: list[tuple[str, RunState, Any, bool, Expect]] = [
    # forward steps completing
    (
        "first step done, goes on: next step leased to us",
        _running("reserve"),
        OK,
        True,
        Expect(
            S.RUNNING,
            "notify",
            1,
            (K.STEP_COMPLETED, K.STEP_STARTED),
            30.0,
            True,
            completed_step="reserve",
        ),
    ),
    (
        "first step done while stopping: next step due now, not leased",
        _running("reserve"),
        OK,
        False,
        Expect(S.RUNNING, "notify", 0, (K.STEP_COMPLETED,), 0.0, completed_step="reserve"),
    ),
    (
        "last step done: completed, unless a cancel came meanwhile",
        _running("charge", done=("reserve", "notify")),
        OK,
        True,
        Expect(
            S.COMPLETED,
            None,
            1,
            (K.STEP_COMPLETED, K.RUN_COMPLETED),
            completed_step="charge",
            unless_cancelled=True,
        ),
    ),
    (
        "first step done, cancel seen meanwhile: it is undone at once",
        _running("reserve", cancel_requested=True),
        OK,
        True,
        Expect(
            S.COMPENSATING,
            "reserve",
            1,
            (K.STEP_COMPLETED, K.RUN_COMPENSATING, K.COMPENSATION_STARTED),
            7.0,
            True,
            completed_step="reserve",
            plan=["reserve"],
        ),
    ),
    (
        "middle step without compensation done, cancel seen: the earlier one is undone",
        _running("notify", done=("reserve",), cancel_requested=True),
        OK,
        True,
        Expect(
            S.COMPENSATING,
            "reserve",
            1,
            (K.STEP_COMPLETED, K.RUN_COMPENSATING, K.COMPENSATION_STARTED),
            7.0,
            True,
            completed_step="notify",
            plan=["reserve"],
        ),
    ),
    (
        "last step done, cancel seen: every completed step undone, newest first",
        _running("charge", done=("reserve", "notify"), cancel_requested=True),
        OK,
        False,
        Expect(
            S.COMPENSATING,
            "charge",
            0,
            (K.STEP_COMPLETED, K.RUN_COMPENSATING),
            0.0,
            completed_step="charge",
            plan=["charge", "reserve"],
        ),
    ),
    # forward steps failing
    (
        "step fails, attempts left: retried after the backoff, unless a cancel came",
        _running("notify", attempt=2, done=("reserve",)),
        FAIL,
        True,
        Expect(S.RUNNING, "notify", 2, (K.STEP_FAILED,), 2.0, retry=True, unless_cancelled=True),
    ),
    (
        "step fails, attempts left, cancel seen: no retry, rolled back at once",
        _running("notify", attempt=2, done=("reserve",), cancel_requested=True),
        FAIL,
        True,
        Expect(
            S.COMPENSATING,
            "reserve",
            1,
            (K.STEP_FAILED, K.RUN_COMPENSATING, K.COMPENSATION_STARTED),
            7.0,
            True,
            plan=["reserve"],
        ),
    ),
    (
        "step fails on its last attempt: the completed steps are undone",
        _running("notify", attempt=3, done=("reserve",)),
        FAIL,
        True,
        Expect(
            S.COMPENSATING,
            "reserve",
            1,
            (K.STEP_FAILED, K.RUN_COMPENSATING, K.COMPENSATION_STARTED),
            7.0,
            True,
            error=True,
            plan=["reserve"],
        ),
    ),
    (
        "step fails for good with nothing to undo: compensated at once",
        _running("reserve"),
        PERMANENT,
        True,
        Expect(
            S.COMPENSATED,
            None,
            0,
            (K.STEP_FAILED, K.RUN_COMPENSATING, K.RUN_COMPENSATED),
            error=True,
            plan=[],
        ),
    ),
    (
        "step fails for good while a cancel is requested: still a failure (compensated)",
        _running("charge", done=("reserve", "notify"), cancel_requested=True),
        PERMANENT,
        False,
        Expect(
            S.COMPENSATING,
            "reserve",
            0,
            (K.STEP_FAILED, K.RUN_COMPENSATING),
            0.0,
            error=True,
            plan=["reserve"],
        ),
    ),
    # compensations
    (
        "compensation done, more to undo: the next one, leased to us",
        _comp("charge"),
        Succeeded(),
        True,
        Expect(
            S.COMPENSATING,
            "reserve",
            1,
            (K.COMPENSATION_COMPLETED, K.COMPENSATION_STARTED),
            7.0,
            True,
        ),
    ),
    (
        "last compensation done after a failure: compensated",
        _comp("reserve", failed_forward=True),
        Succeeded(),
        True,
        Expect(S.COMPENSATED, None, 0, (K.COMPENSATION_COMPLETED, K.RUN_COMPENSATED)),
    ),
    (
        "last compensation done after a cancel: cancelled",
        _comp("reserve"),
        Succeeded(),
        True,
        Expect(S.CANCELLED, None, 0, (K.COMPENSATION_COMPLETED, K.RUN_CANCELLED)),
    ),
    (
        "compensation fails, attempts left: retried with its own policy",
        _comp("charge"),
        FAIL,
        True,
        Expect(S.COMPENSATING, "charge", 1, (K.COMPENSATION_FAILED,), 5.0, retry=True),
    ),
    (
        "compensation gives up: failed, waiting for an operator",
        _comp("charge", attempt=2),
        FAIL,
        True,
        Expect(
            S.FAILED, "charge", 2, (K.COMPENSATION_FAILED, K.RUN_FAILED), compensation_error=True
        ),
    ),
    (
        "compensation fails for good (permanent): failed at once",
        _comp("reserve", failed_forward=True),
        PERMANENT,
        True,
        Expect(
            S.FAILED, "reserve", 1, (K.COMPENSATION_FAILED, K.RUN_FAILED), compensation_error=True
        ),
    ),
    (
        "a cancel requested while compensating changes nothing",
        _comp("charge", cancel_requested=True),
        Succeeded(),
        True,
        Expect(
            S.COMPENSATING,
            "reserve",
            1,
            (K.COMPENSATION_COMPLETED, K.COMPENSATION_STARTED),
            7.0,
            True,
        ),
    ),
]


def _check(change: Transition, expect: Expect) -> None:
    assert (change.status, change.step, change.attempt) == (
        expect.status,
        expect.step,
        expect.attempt,
    )
    assert tuple(e.kind for e in change.events) == expect.kinds
    assert change.due_in == expect.due_in
    assert change.leased == expect.leased
    assert change.retry == expect.retry
    assert change.completed_step == expect.completed_step
    assert (change.error is not None) == expect.error
    assert (change.compensation_error is not None) == expect.compensation_error
    assert change.unless_cancelled == expect.unless_cancelled
    assert change.terminal == expect.status.is_terminal
    if expect.plan is not None:
        [compensating] = [e for e in change.events if e.kind is K.RUN_COMPENSATING]
        assert compensating.data is not None
        assert compensating.data["plan"] == expect.plan
    started = [e for e in change.events if e.kind in (K.STEP_STARTED, K.COMPENSATION_STARTED)]
    assert all((e.step, e.attempt) == (change.step, 1) for e in started)
    assert bool(started) == change.leased


@pytest.mark.parametrize(
    ("state", "outcome", "goes_on", "expect"),
    [pytest.param(*row[1:], id=row[0]) for row in AFTER_ATTEMPT],
)
def test_after_an_attempt(state: RunState, outcome: Any, goes_on: bool, expect: Expect) -> None:
    """after_attempt() gives the documented transition for each (state, outcome)."""
    change = _plan.after_attempt(SAGA, state, outcome, lease_for if goes_on else None, lambda: 0)
    _check(change, expect)


@pytest.mark.parametrize("step", ["reserve", "notify", "charge"])
@pytest.mark.parametrize("goes_on", [True, False])
def test_a_cancel_before_a_step_starts_rolls_back_instead(step: str, goes_on: bool) -> None:
    """A forward item of a run being cancelled does not start, at any step: the steps
    completed before it are undone, newest first (or the run ends cancelled at once)."""
    done = ("reserve", "notify", "charge")[: ("reserve", "notify", "charge").index(step)]
    state = _running(step, done=done, cancel_requested=True)
    change = _plan.cancelled_before_start(SAGA, state, lease_for if goes_on else None)
    assert change is not None
    plan = [s for s in reversed(done) if SAGA.get_step(s).compensation]
    if plan:
        assert (change.status, change.step) == (S.COMPENSATING, plan[0])
    else:
        assert (change.status, change.events[-1].kind) == (S.CANCELLED, K.RUN_CANCELLED)
    assert _plan.cancelled_before_start(SAGA, _running(step, done=done), lease_for) is None
    assert _plan.cancelled_before_start(SAGA, _comp("charge", cancel_requested=True), None) is None


@pytest.mark.parametrize(
    ("state", "lost"),
    [
        (_running("reserve", attempt=3), False),
        (_running("reserve", attempt=4), True),
        (_comp("charge", attempt=2), False),
        (_comp("charge", attempt=3), True),
    ],
)
def test_an_attempt_beyond_the_limit_fails_as_lost(state: RunState, lost: bool) -> None:
    """An attempt number above the policy's limit (its predecessor's worker died without
    an outcome) does not run: it fails for good with saga.AttemptLost."""
    change = _plan.attempts_exhausted(SAGA, state, lease_for)
    assert (change is not None) == lost
    if change is not None:
        failed = change.events[0]
        assert failed.kind in (K.STEP_FAILED, K.COMPENSATION_FAILED)
        assert failed.data is not None
        assert failed.data["error"]["type"] == "saga.AttemptLost"
        assert not change.retry


def test_a_completion_refused_for_a_cancel_becomes_a_rollback() -> None:
    """cancel_instead(): the last step's completion, refused because a cancel was
    accepted meanwhile, becomes a rollback that undoes that step too."""
    state = _running("charge", done=("reserve", "notify"))
    completion = _plan.after_attempt(SAGA, state, OK, lease_for)
    change = _plan.cancel_instead(SAGA, state, completion, lease_for)
    _check(
        change,
        Expect(
            S.COMPENSATING,
            "charge",
            1,
            (K.STEP_COMPLETED, K.RUN_COMPENSATING, K.COMPENSATION_STARTED),
            30.0,
            True,
            completed_step="charge",
            plan=["charge", "reserve"],
        ),
    )
    assert change.result_json == '"r"'


def test_the_claim_table_covers_every_claimable_state() -> None:
    """What a claim does, for every active status, cancel flag and signal: pending
    becomes running; compensations always start; forward steps of a cancelled run do not
    (a parked one included); a sleep wakes; a wait wakes with its signal, and without it
    stays waiting (its timeout applies)."""
    table = {(b, c, sig): claimed for b, c, sig, claimed in claim_table()}
    flags = (False, True)
    expected = {(s, c, False) for s in S.active() for c in flags}
    assert set(table) == expected | {(S.WAITING, c, True) for c in flags}

    def row(before: S, cancel: bool, signalled: bool = False) -> tuple[S, K | None, K | None]:
        c = table[(before, cancel, signalled)]
        return c.status, c.woke, c.start

    assert row(S.PENDING, False) == (S.RUNNING, None, K.STEP_STARTED)
    assert row(S.PENDING, True) == (S.RUNNING, None, None)
    assert row(S.RUNNING, False) == (S.RUNNING, None, K.STEP_STARTED)
    assert row(S.RUNNING, True) == (S.RUNNING, None, None)
    assert row(S.COMPENSATING, True) == (S.COMPENSATING, None, K.COMPENSATION_STARTED)
    assert row(S.SLEEPING, False) == (S.RUNNING, K.WOKE, K.STEP_STARTED)
    assert row(S.SLEEPING, True) == (S.RUNNING, None, None)
    assert row(S.WAITING, False, True) == (S.RUNNING, K.WOKE, K.STEP_STARTED)
    assert row(S.WAITING, False, False) == (S.WAITING, None, None)
    assert row(S.WAITING, True, True) == (S.RUNNING, None, None)


def test_every_status_is_covered() -> None:
    """Every status appears in the tables above as a start or an end state (those of
    sleeps and waits in test_plan_waits.py)."""
    seen = {row[1].status for row in AFTER_ATTEMPT} | {row[4].status for row in AFTER_ATTEMPT}
    assert seen | {S.PENDING, S.SLEEPING, S.WAITING, S.STOPPED} == set(S)
