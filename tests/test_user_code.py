"""Nothing a step raises or returns stops an orchestrator, loops forever, or waits out a
lease: every failure is recorded at once, and the orchestrator keeps working."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Gate, Job, Ledger, fast, small_saga
from tests.conftest import OrchestratorFactory

TWICE = fast(2)


class Receipt(BaseModel):
    charge_id: str


async def _stray_cancel() -> NoReturn:
    """Await a future that something else cancelled: asyncio raises CancelledError here
    although nobody cancels this task."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future
    raise AssertionError("unreachable")


async def _cancel_itself() -> NoReturn:
    """Cancel the step's own task, as a step calling ``current_task().cancel()`` does:
    a real cancellation of the task, yet none of saga's doing."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(1)
    raise AssertionError("unreachable")


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class _StrNotStr(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


class _Custom(BaseException):
    pass


class _Weird(Exception):
    pass


_Weird.__qualname__ = "We\x00ird\udc80"  # type() itself refuses such names


def _raise(exc: BaseException) -> Callable[[], Any]:
    async def raiser() -> NoReturn:
        raise exc

    return raiser


# (what the step does, the error type recorded)
RAISED: dict[str, tuple[Callable[[], Any], str]] = {
    "stray CancelledError": (_stray_cancel, "asyncio.exceptions.CancelledError"),
    "the step cancels its own task": (_cancel_itself, "asyncio.exceptions.CancelledError"),
    "GeneratorExit": (_raise(GeneratorExit()), "GeneratorExit"),
    "SystemExit": (_raise(SystemExit(3)), "SystemExit"),
    "KeyboardInterrupt": (_raise(KeyboardInterrupt()), "KeyboardInterrupt"),
    "BaseException subclass": (_raise(_Custom("x")), "tests.test_user_code._Custom"),
    "__str__ raises": (_raise(_StrRaises()), "tests.test_user_code._StrRaises"),
    "__str__ returns an int": (_raise(_StrNotStr()), "tests.test_user_code._StrNotStr"),
    "NUL in the message": (_raise(ValueError("a\x00b")), "ValueError"),
    "lone surrogate in the message": (_raise(ValueError("bad \udc80 text")), "ValueError"),
    "a 2 MB message": (_raise(ValueError("x" * 2_000_000)), "ValueError"),
    "a type name with NUL and a surrogate": (
        _raise(_Weird("boom")),
        "tests.test_user_code.We\\x00ird\\udc80",
    ),
}


class _BadMapping(Mapping[str, int]):
    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("iteration is broken")

    def __len__(self) -> int:
        return 1


class _Opaque:
    pass


def _cyclic() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


def _deep() -> list[Any]:
    value: list[Any] = []
    for _ in range(10_000):
        value = [value]
    return value


# (what the step returns, its declared return type)
RETURNED: dict[str, tuple[Callable[[], Any], Any]] = {
    "a mapping whose iteration raises": (_BadMapping, Any),
    "a dict where a model is declared": (lambda: {"charge_id": "c"}, Receipt),
    "a str where an int is declared": (lambda: "seven", int),
    "an int where a model is declared": (lambda: 7, Receipt),
    "NaN": (lambda: float("nan"), float),
    "bytes": (lambda: b"raw", Any),
    "an arbitrary object": (_Opaque, Any),
    "a cycle": (_cyclic, Any),
    "10,000 levels of nesting": (_deep, Any),
    "a tuple with no declared type": (lambda: (1, 2), Any),
    "NUL in a str": (lambda: "a\x00b", str),
    "a 2 MB str": (lambda: "x" * 2_000_000, str),
}


def _failing_saga(name: str, body: Callable[[], Any], result_type: Any) -> saga.Saga[Job]:
    """reserve (compensated), then a step whose body is ``body``, declared to return
    ``result_type`` (written out: the odd step's body and annotation are the point)."""
    s = saga.Saga(name, input=Job)

    @s.step(retry=TWICE)
    async def reserve(ctx: saga.Context[Job]) -> str:
        return "held"

    @reserve.compensate
    async def release(ctx: saga.Context[Job], held: str) -> None:
        return None

    async def odd(ctx: saga.Context[Job]) -> Any:
        return await body() if asyncio.iscoroutinefunction(body) else body()

    odd.__annotations__["return"] = result_type
    s.step(name="odd", retry=TWICE)(odd)
    return s


def _plain_saga() -> saga.Saga[Job]:
    return small_saga("plain", ["double"], result=lambda ctx: ctx.input.n * 2, retry=None)


async def _assert_still_works(orch: saga.Orchestrator, plain: saga.Saga[Job]) -> None:
    assert orch.is_open
    with anyio.fail_after(5):
        assert await (await orch.start(plain, Job(n=21))).result() == 42


@pytest.mark.parametrize("case", sorted(RAISED))
async def test_whatever_a_step_raises_is_recorded_at_once(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, case: str
) -> None:
    """Each BaseException a step can let escape (not only Exception) is that attempt's
    failure: recorded at once with its type (no waiting out the 30 s lease), retried per
    the policy, the completed step compensated; the orchestrator keeps running runs."""
    body, error_type = RAISED[case]
    odd, plain = _failing_saga("odd_raise", body, Any), _plain_saga()
    orch = await orchestrator(odd, plain, lease_seconds=30)
    run = await orch.start(odd, Job(n=1))
    with anyio.fail_after(5), pytest.raises(saga.RunCompensatedError) as raised:
        await run.result()
    error = raised.value.error
    assert error is not None
    assert error.type == error_type
    assert error.step == "odd"
    assert "\x00" not in error.message
    failed = [e.attempt for e in await run.history() if e.kind == "step_failed"]
    assert failed == [1, 2]  # both attempts ran and were recorded: none was lost
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE kind = 'lease_expired'") == 0
    await _assert_still_works(orch, plain)


@pytest.mark.parametrize("case", sorted(RETURNED))
async def test_whatever_a_step_returns_is_stored_or_refused_at_once(
    orchestrator: OrchestratorFactory, case: str
) -> None:
    """A return value that cannot be stored and read back unchanged fails the attempt
    for good at once with a SerializationError naming the step (no lease wait, no
    retry), the completed step is compensated, and the orchestrator keeps working."""
    body, result_type = RETURNED[case]
    odd, plain = _failing_saga("odd_return", body, result_type), _plain_saga()
    orch = await orchestrator(odd, plain, lease_seconds=30)
    run = await orch.start(odd, Job(n=1))
    with anyio.fail_after(5), pytest.raises(saga.RunCompensatedError) as raised:
        await run.result()
    error = raised.value.error
    assert error is not None
    assert error.type in ("saga.SerializationError", "saga.PayloadTooLargeError")
    assert "'odd'" in error.message
    failed = [e.attempt for e in await run.history() if e.kind == "step_failed"]
    assert failed == [1]  # permanent: a value does not become storable on a retry
    await _assert_still_works(orch, plain)


@pytest.mark.parametrize(
    "error", [RuntimeError("a bug"), asyncio.CancelledError()], ids=["bug", "stray cancel"]
)
async def test_a_dying_loop_is_reported_not_hidden(
    orchestrator: OrchestratorFactory, error: BaseException
) -> None:
    """When one of the orchestrator's own loops dies (simulated through the private
    store: its census raises, as a bug would, or raises a stray CancelledError, on which
    anyio would end the loop silently), the orchestrator says so: is_open turns false,
    start() raises LifecycleError (the orchestrator's, and the saga's own: not "not
    registered"), waiters are woken with LifecycleError, and
    wait_stopped() raises. (Private: nothing public can make a loop fail.)"""
    plain = _plain_saga()
    orch = await orchestrator(plain, concurrency=0, census_interval=0.05)
    parked = await orch.start(plain, Job(n=1))  # nobody executes it: it waits
    assert orch._store is not None

    async def census(*args: Any) -> Any:
        raise error

    async def wait() -> None:
        with pytest.raises(saga.LifecycleError):
            await parked.result(timeout=10)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.05)
            orch._store.census = census  # type: ignore[method-assign]
            with pytest.raises((RuntimeError, saga.LifecycleError)):
                await orch.wait_stopped()
    assert not orch.is_open
    with pytest.raises(saga.LifecycleError, match="stopped"):
        await orch.start(plain, Job(n=2))
    with pytest.raises(saga.LifecycleError, match="stopped"):  # the saga's own start too
        await plain.start(Job(n=3))
    await orch.aclose()


async def test_a_step_cancelled_by_its_timeout_is_a_retryable_failure(
    orchestrator: OrchestratorFactory,
) -> None:
    """The orchestrator's own cancellations still cancel: a step past its timeout fails
    with TimeoutError and is retried, it is not mistaken for a stray CancelledError."""
    ledger = Ledger()
    s = small_saga(
        "slow",
        ["nap"],
        ledger=ledger,
        gate=Gate("nap", times=1),  # the first attempt is held (never released)
        timeout=0.05,
        retry=TWICE,
        result=lambda ctx: ctx.attempt,
    )
    orch = await orchestrator(s)
    with anyio.fail_after(5):
        assert await (await orch.start(s, Job(n=1))).result() == 2
    assert ledger.attempts("nap") == [1, 2]


async def test_a_step_released_again_and_again_ends_by_the_attempt_limit(
    dsn: str, db: asyncpg.Connection
) -> None:
    """A step that never ends before its worker shuts down (every shutdown gives the
    lease back) is not retried forever: the first release of an attempt is free, a second
    one counts it, so with max_attempts=2 the run gives up on the step after at most four
    releases, and the completed step is compensated."""
    ledger = Ledger()
    s = small_saga(
        "hangs",
        ["reserve", "hang"],
        compensate={"reserve"},
        ledger=ledger,
        delay={"hang": 100},
        retry={"hang": saga.Retry(max_attempts=2)},
        undo_retry=None,
    )

    run_id = None
    for _ in range(8):
        async with saga.Orchestrator(
            dsn, sagas=[s], shutdown_timeout=0.05, poll_interval=0.05
        ) as worker:
            if run_id is None:
                run_id = (await worker.start(s, Job(n=1))).id
            with anyio.fail_after(10):
                while not await db.fetchval(  # noqa: ASYNC110 - polling the database
                    "SELECT due_at IS NULL OR (lease_owner IS NOT NULL AND step_name = 'hang')"
                    " FROM saga.runs WHERE id = $1",
                    run_id,
                ):
                    await anyio.sleep(0.01)
            ended = await db.fetchval("SELECT due_at IS NULL FROM saga.runs WHERE id = $1", run_id)
            if ended:
                run = worker.get_run(run_id)
                with pytest.raises(saga.RunCompensatedError) as raised:
                    await run.result(timeout=5)
                break
    else:
        raise AssertionError("the run was released eight times and never ended")
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"
    assert [(c.step, c.value) for c in ledger.of("compensation")] == [("reserve", "reserve")]
    releases = await db.fetch(
        "SELECT attempt, data FROM saga.events WHERE run_id = $1 AND kind = 'lease_released'"
        " ORDER BY id",
        run_id,
    )
    assert 2 <= len(releases) <= 4
