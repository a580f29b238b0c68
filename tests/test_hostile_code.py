"""Hostile user code (steps, children inputs, schedule inputs, concurrency keys, input
models) against the promises that nothing a step raises or returns, and no
setting a user can pass, stops an orchestrator or makes a run retry forever; that
whatever escapes a step is that attempt's failure, recorded at once; and that no payload
appears in logs."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
from datetime import timedelta
from typing import Any, NoReturn

import anyio
import asyncpg
import pytest
from pydantic import BaseModel, field_validator
from structlog.testing import capture_logs

import saga
from tests import _harness
from tests._sagas import Job, fast, small_saga
from tests.conftest import OrchestratorFactory

TWICE = fast(2)
EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))


def _plain() -> saga.Saga[Job]:
    return small_saga("plain", ["double"], result=lambda ctx: ctx.input.n * 2, retry=None)


async def _still_works(orch: saga.Orchestrator, plain: saga.Saga[Job]) -> None:
    assert orch.is_open, "the orchestrator stopped"
    with anyio.fail_after(5):
        assert await (await orch.start(plain, Job(n=21))).result() == 42


class _Custom(BaseException):
    pass


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


async def _stray_cancel() -> NoReturn:
    """Await a future cancelled elsewhere: a CancelledError nobody meant for this task."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future
    raise AssertionError("unreachable")


# -- schedules -------------------------------------------------------------------------


def _raising_input(exc: BaseException) -> Any:
    def build(slot: Any) -> Job:
        raise exc

    return build


async def _stray_input(slot: Any) -> Job:
    await _stray_cancel()


SCHEDULE_INPUTS = {
    "SystemExit": _raising_input(SystemExit(2)),
    "GeneratorExit": _raising_input(GeneratorExit()),
    "BaseException subclass": _raising_input(_Custom("x")),
    "stray CancelledError (async input)": _stray_input,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(SCHEDULE_INPUTS))
async def test_a_schedule_input_raising_a_base_exception_does_not_stop_the_orchestrator(
    orchestrator: OrchestratorFactory, case: str
) -> None:
    """Promise (DESIGN "Deploys are safe"; README "Schedules"): no setting a user can pass
    stops an orchestrator, and a slot whose input function raises is logged
    (schedule_input_failed) and tried again. Here the input function lets a
    BaseException (not an Exception) escape: the orchestrator must stay open and keep
    running other runs."""
    s, plain = small_saga("sched", 1), _plain()
    bad = saga.Scheduled("bad", s, EVERY_SECOND, SCHEDULE_INPUTS[case])
    with capture_logs() as logs:
        orch = await orchestrator(s, plain, schedules=[bad], poll_interval=0.2)
        await anyio.sleep(2.5)
        await _still_works(orch, plain)
    assert any(e["event"] == "schedule_input_failed" for e in logs)


KEYBOARD_INTERRUPT_APP = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import timedelta
    from pydantic import BaseModel
    import saga

    class Job(BaseModel):
        n: int = 0

    s = saga.Saga("tick", input=Job)

    @s.step()
    async def double(ctx: saga.Context[Job]) -> int:
        return ctx.input.n * 2

    def build(slot):
        raise KeyboardInterrupt  # a hostile (or interrupted) input function

    ticks = saga.Scheduled("ticks", s, saga.Schedule.every(timedelta(seconds=1)), build)

    async def main() -> None:
        async with saga.Orchestrator(
            sys.argv[1], sagas=[s], schedules=[ticks], poll_interval=0.2
        ) as orch:
            await asyncio.sleep(2.5)
            assert await (await orch.start(s, Job(n=21))).result(timeout=5) == 42
        print("SURVIVED")

    asyncio.run(main())
    """
)


@pytest.mark.timeout(90)
async def test_a_schedule_input_raising_keyboard_interrupt_does_not_kill_the_process(
    dsn: str,
) -> None:
    """Promise: no setting a user can pass stops an orchestrator (README: an input
    function that raises is logged and tried again). A KeyboardInterrupt from an input
    function escapes the scheduler's task, and asyncio re-raises it out of the event
    loop: the whole application process dies. (A subprocess: it would kill pytest.)"""
    done = await _harness.run("-c", KEYBOARD_INTERRUPT_APP, dsn, timeout=60)
    assert "SURVIVED" in done.stdout, (done.returncode, done.stderr[-2000:])
    assert done.returncode == 0


ENTERED: list[anyio.Event] = []


async def _never_returns(slot: Any) -> Job:
    ENTERED[-1].set()
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def _m_good_runs(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE idempotency_key LIKE 'schedule:m_good:%'"
    )
    return count


async def _hanging_orchestrator(orchestrator: OrchestratorFactory) -> saga.Saga[Job]:
    """An orchestrator holding "a_hangs" (an input function that never returns) and
    "m_good" (a plain input), both every second, once it is inside the hanging input."""
    ENTERED.append(anyio.Event())
    s = small_saga("tick", 1)
    hang = saga.Scheduled("a_hangs", s, EVERY_SECOND, _never_returns)
    good = saga.Scheduled("m_good", s, EVERY_SECOND, Job(n=1))
    await orchestrator(s, schedules=[hang, good], poll_interval=0.2)
    with anyio.fail_after(5):
        await ENTERED[-1].wait()
    return s


@pytest.mark.timeout(60)
async def test_a_hanging_schedule_input_does_not_stop_the_other_schedules(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Promise (README "Schedules"): each slot starts exactly one run while at least one
    orchestrator holding the schedule is up; a failing input function only holds back
    its own schedule's later slots. Here schedule "a_hangs"'s input function never
    returns: the scheduler (saga/_scheduler.py fire_due) calls it inside the one
    transaction that locked every due schedule row, so that transaction stays open
    (idle in transaction) and "m_good", on the same orchestrator, never fires again."""
    with capture_logs():
        await _hanging_orchestrator(orchestrator)
        before = await _m_good_runs(db)
        await anyio.sleep(4)
        fired = await _m_good_runs(db) - before
    assert fired >= 2, f"m_good started {fired} runs in 4 s (every second)"


OTHER_ORCHESTRATOR_APP = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import timedelta
    from pydantic import BaseModel
    import saga

    class Job(BaseModel):
        n: int = 0
        fail: str = ""

    s = saga.Saga("tick", input=Job)

    @s.step(retry=saga.Retry(max_attempts=3, initial_delay=0.01, max_delay=0.05))
    async def s1(ctx: saga.Context[Job]) -> str:
        return "s1"

    good = saga.Scheduled("m_good", s, saga.Schedule.every(timedelta(seconds=1)), Job(n=1))

    async def main() -> None:
        async with saga.Orchestrator(
            sys.argv[1], sagas=[s], schedules=[good], poll_interval=0.2
        ):
            print("OPENED", flush=True)
            await asyncio.sleep(3)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(90)
async def test_a_hanging_schedule_input_does_not_block_another_process_from_opening(
    orchestrator: OrchestratorFactory, dsn: str, db: asyncpg.Connection
) -> None:
    """Promise (README "Schedules"; DESIGN: no setting a user can pass stops an
    orchestrator): any number of orchestrators may hold the same schedule, and each
    slot runs while one is up. With one orchestrator stuck in a hanging input function
    (its transaction holding the locks of every due schedule row), a second process
    holding "m_good" opens: registering its schedule (an UPDATE of m_good's row) waits
    for that lock forever, and the open, shielded (saga/_lifecycle.py _opening), cannot
    even be cancelled. A deploy's new workers never start."""
    with capture_logs():
        await _hanging_orchestrator(orchestrator)
        before = await _m_good_runs(db)
        try:
            done = await _harness.run("-c", OTHER_ORCHESTRATOR_APP, dsn, timeout=20)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError("the second orchestrator never finished opening") from exc
        fired = await _m_good_runs(db) - before
    assert "OPENED" in done.stdout, done.stderr[-2000:]
    assert fired >= 2


# -- concurrency keys ------------------------------------------------------------------


def _key_raising_unprintable(job: Job) -> str:
    raise _StrRaises()


@pytest.mark.timeout(30)
async def test_a_concurrency_key_raising_an_unprintable_error_is_invalid_input(
    orchestrator: OrchestratorFactory,
) -> None:
    """Promise (README "Traffic control", Bad input): a concurrency_key function that
    raises is an InvalidInputError at start. When its exception's __str__ raises, the
    message formatting in saga/_traffic.py raises instead, and start() lets a bare
    RuntimeError out."""
    s = small_saga("keyed", 1, traffic={"concurrency_key": _key_raising_unprintable})
    orch = await orchestrator(s)
    with pytest.raises(saga.InvalidInputError):
        await orch.start(s, Job(n=1))


@pytest.mark.timeout(60)
async def test_a_scheduled_saga_whose_key_error_is_unprintable_does_not_stop_the_orchestrator(
    orchestrator: OrchestratorFactory,
) -> None:
    """Promise: no setting a user can pass stops an orchestrator; a slot whose start is
    refused is logged (schedule_start_refused) and tried again. The same key function
    as above, on a scheduled saga: the RuntimeError is not a SagaError, escapes the
    scheduler loop and stops the orchestrator."""
    s = small_saga("keyed", 1, traffic={"concurrency_key": _key_raising_unprintable})
    plain = _plain()
    keyed = saga.Scheduled("keyed", s, EVERY_SECOND, Job(n=1))
    with capture_logs():
        orch = await orchestrator(s, plain, schedules=[keyed], poll_interval=0.2)
        await anyio.sleep(2.5)
        await _still_works(orch, plain)


# -- stored payloads whose validators raise --------------------------------------------

BROKEN: list[bool] = []


class _Halt(BaseException):
    pass


class Touchy(BaseModel):
    """An input model whose validator, once BROKEN is set, raises a BaseException."""

    n: int

    @field_validator("n")
    @classmethod
    def _check(cls, value: int) -> int:
        if BROKEN:
            raise _Halt("validator gave up")
        return value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stored", ["input", "result"])
async def test_a_stored_payload_whose_validator_raises_a_base_exception_does_not_retry_forever(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, stored: str
) -> None:
    """Promise (DESIGN): nothing a step raises or returns can make a run retry forever;
    a crash counts as an attempt and the attempt limit always ends retries. A payload
    (the run's input, or a step's result) validated when it was stored; reading it back
    at a claim, its model's validator raises a BaseException (decode_stored in
    saga/_codec.py turns only an Exception into an Unreadable). Runner.active
    (saga/_runner.py:157) raises before the attempt limit is checked in _attempt: the
    run waits out its lease and is claimed again, attempt after attempt, forever. With
    max_attempts=2 it must have ended long before attempt 6."""
    BROKEN.clear()
    model = Touchy if stored == "input" else Job
    s = saga.Saga(f"touchy_{stored}", input=model)

    @s.step(retry=TWICE)
    async def first(ctx: saga.Context[Any]) -> Touchy:
        return Touchy(n=1)

    s.sleep(1)  # the next claim reads the result back

    @s.step(retry=TWICE)
    async def second(ctx: saga.Context[Any]) -> int:
        return 2

    try:
        with capture_logs():
            if stored == "input":
                orch = await orchestrator(s, lease_seconds=0.3, concurrency=0)
                run = await orch.start(s, Touchy(n=1))
                BROKEN.append(True)
                await orchestrator(s, lease_seconds=0.3)  # a worker claims it from now on
            else:
                orch = await orchestrator(s, lease_seconds=0.3)
                run = await orch.start(s, Job(n=1))
                with anyio.fail_after(5):
                    while (await run.info()).status is not saga.RunStatus.SLEEPING:  # noqa: ASYNC110 - polling the database
                        await anyio.sleep(0.01)
                BROKEN.append(True)
            await anyio.sleep(6)
            attempt = await db.fetchval("SELECT attempt FROM saga.runs WHERE id = $1", run.id)
            info = await run.info()
    finally:
        BROKEN.clear()
    assert attempt <= 3, f"attempt {attempt} of a step allowed 2: retried without end"
    assert info.status.is_terminal


# -- exceptions that break saga's own handling of the failure ---------------------------


def _deep_group(levels: int) -> BaseExceptionGroup[Any]:
    exc: BaseException = ValueError("leaf")
    for _ in range(levels):
        exc = ExceptionGroup("nested", [exc])
    return exc  # type: ignore[return-value]


class _ClassRaises(Exception):
    """isinstance() reads __class__ when the type check fails: this one raises."""

    @property  # type: ignore[misc]
    def __class__(self) -> Any:  # type: ignore[override]
        raise RuntimeError("no class for you")


class _NoQualname(type):
    def __getattribute__(cls, name: str) -> Any:
        if name == "__qualname__":
            raise RuntimeError("no name for you")
        return super().__getattribute__(name)


class _Nameless(Exception, metaclass=_NoQualname):
    pass


class _Sly(str):
    def __len__(self) -> int:
        raise RuntimeError("no length for you")


class _SlyMessage(Exception):
    def __str__(self) -> str:
        return _Sly("boom")


class _SelfGroup(ExceptionGroup):  # type: ignore[type-arg]
    """A group that lists itself among its exceptions."""

    @property
    def exceptions(self) -> Any:  # type: ignore[override]
        return (self,)


class _BadCheck(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        raise RuntimeError("cannot tell")


class _Unclassifiable(Exception, metaclass=_BadCheck):
    """Listed in non_retryable: isinstance() against it raises."""


RAISED = {
    "an ExceptionGroup nested 2000 deep": (lambda: _deep_group(2000), TWICE),
    "an ExceptionGroup listing itself": (lambda: _SelfGroup("g", [ValueError("v")]), TWICE),
    "an exception whose __class__ raises": (lambda: _ClassRaises("boom"), TWICE),
    "an exception type whose __qualname__ raises": (lambda: _Nameless("boom"), TWICE),
    "an exception whose __str__ returns a str subclass whose len raises": (
        _SlyMessage,
        TWICE,
    ),
    "non_retryable holds a type whose isinstance check raises": (
        lambda: ValueError("boom"),
        saga.Retry(max_attempts=2, initial_delay=0.01, non_retryable=(_Unclassifiable,)),
    ),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", sorted(RAISED))
async def test_whatever_escapes_a_step_is_recorded_at_once_even_when_it_breaks_inspection(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, case: str
) -> None:
    """Promise (README "Nothing a step raises or returns stops an orchestrator"):
    whatever escapes a step is that attempt's failure, recorded at once with its type
    and message; retries follow the policy. These exceptions (or the policy's
    non_retryable setting) make saga's own failure handling (Retry.retryable,
    exception_type, isinstance in call_user) raise inside its except clause: the runner
    logs internal_error and the attempt waits out its 30 s lease instead of being
    recorded. The run must end compensated within 5 s."""
    make, retry = RAISED[case]
    s, plain = saga.Saga("odd", input=Job), _plain()

    @s.step(retry=TWICE)
    async def reserve(ctx: saga.Context[Job]) -> str:
        return "held"

    @reserve.compensate
    async def release(ctx: saga.Context[Job], held: str) -> None:
        return None

    @s.step(retry=retry)
    async def odd(ctx: saga.Context[Job]) -> str:
        raise make()

    with capture_logs() as logs:
        orch = await orchestrator(s, plain, lease_seconds=30)
        run = await orch.start(s, Job(n=1))
        with anyio.fail_after(5), pytest.raises(saga.RunCompensatedError) as raised:
            await run.result()
    assert raised.value.error is not None
    assert raised.value.error.step == "odd"
    assert [e for e in logs if e["event"] == "internal_error"] == []
    await _still_works(orch, plain)


@pytest.mark.timeout(60)
async def test_an_until_function_raising_an_uninspectable_error_fails_the_run_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """Promise (README): a failure of a sleep's until() rolls the run back (step
    included), recorded at once. An until() raising an exception whose __class__ raises
    breaks isinstance() in saga/_parked.py sleep_length's except clause: internal_error,
    and the run waits out its 30 s lease. The run must end within 5 s."""
    s = saga.Saga("napper", input=Job)

    @s.step(retry=TWICE)
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    def until(ctx: Any) -> Any:
        raise _ClassRaises("boom")

    s.sleep(until=until)

    @s.step()
    async def second(ctx: saga.Context[Job]) -> int:
        return 2

    with capture_logs() as logs:
        orch = await orchestrator(s, lease_seconds=30)
        run = await orch.start(s, Job(n=1))
        with anyio.fail_after(5), pytest.raises(saga.RunError):
            await run.result()
    assert [e for e in logs if e["event"] == "internal_error"] == []


def _halting_inputs(ctx: Any) -> list[Job]:
    raise _Halt("inputs gave up")


@pytest.mark.timeout(60)
async def test_a_children_step_whose_inputs_raise_a_base_exception_fails_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """Promise (README): whatever escapes a step is that attempt's failure, recorded at
    once. A children step's inputs function letting a BaseException escape
    (saga/_spawner.py catches Exception only) is an internal_error instead: the item
    waits out its 30 s lease, attempt after attempt. The run must end within 5 s."""
    child = small_saga("kid", 1)
    parent = saga.Saga("parent", input=Job)

    @parent.step()
    async def split(ctx: saga.Context[Job]) -> int:
        return 1

    parent.children("kids", child, _halting_inputs, after=[split])
    with capture_logs() as logs:
        orch = await orchestrator(parent, child, lease_seconds=30)
        run = await orch.start(parent, Job(n=1))
        with anyio.fail_after(5), pytest.raises(saga.RunError):
            await run.result()
    assert [e for e in logs if e["event"] == "internal_error"] == []


# -- the default log renderer ----------------------------------------------------------

SECRET = "4111-1111-1111-1111"

DEFAULT_LOGGING_APP = textwrap.dedent(
    """
    import asyncio, sys
    from pydantic import BaseModel
    import saga

    class Card(BaseModel):
        number: str

    class Unclassifiable(type):
        def __instancecheck__(cls, instance):
            raise RuntimeError("cannot tell")

    class Refused(Exception, metaclass=Unclassifiable):
        pass

    class Declined(Exception):
        @property
        def __class__(self):
            raise RuntimeError("no class")

    CASE = sys.argv[3]
    s = saga.Saga("pay", input=Card)
    retry = saga.Retry(max_attempts=1, non_retryable=(Refused,) if CASE == "leak" else ())

    @s.step(retry=retry)
    async def charge(ctx: saga.Context[Card]) -> int:
        if CASE == "leak":
            raise ValueError(f"card {ctx.input.number} declined")
        raise Declined("declined")

    async def main() -> None:
        async with saga.Orchestrator(
            sys.argv[1], sagas=[s], poll_interval=0.1, lease_seconds=1, shutdown_timeout=1
        ) as orch:
            run = await orch.start(s, Card(number=sys.argv[2]))
            try:
                await run.result(timeout=20)
            except saga.RunError as exc:
                print("ENDED", exc.status)
            assert orch.is_open
        print("SURVIVED")

    asyncio.run(main())
    """
)


@pytest.mark.timeout(90)
async def test_a_step_exception_whose_class_attribute_raises_does_not_crash_a_default_app(
    dsn: str,
) -> None:
    """Promise (DESIGN "Deploys are safe"; README "Nothing a step raises or returns stops
    an orchestrator"). In an app that never configured structlog (saga's own default
    renderer, which prints tracebacks), a step raises an exception whose ``__class__``
    raises: saga's handling fails (internal_error), and rendering that line's exc_info
    (traceback.print_exception walks the chained step exception) raises again inside
    Runner.guard's except clause (saga/_runner.py:135): the orchestrator crashes."""
    done = await _harness.run("-c", DEFAULT_LOGGING_APP, dsn, SECRET, "crash", timeout=60)
    assert "SURVIVED" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.timeout(90)
async def test_no_input_payload_in_the_default_logs_of_a_failing_step(dsn: str) -> None:
    """Promise (DESIGN "Observability"): no input or result payload appears in logs by
    default (saga logs error types, never messages, which may carry payload). A step's
    ValueError quotes the input; the step's non_retryable type cannot be checked, so
    saga's handling fails and Runner.guard logs internal_error with exc_info: the
    default renderer prints the chained traceback, the card number from the input
    included."""
    done = await _harness.run("-c", DEFAULT_LOGGING_APP, dsn, SECRET, "leak", timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert SECRET not in done.stderr, done.stderr[-3000:]
