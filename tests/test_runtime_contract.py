"""The runtime's promises at first contact: run ids given as text (or not a UUID) to the
client's own methods, settings that cannot work, and step functions saga could never
call, each refused when given with the error the README names."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import ONCE, Gate, Job, small_saga


@pytest.mark.timeout(30)
async def test_result_by_str_run_id_returns_when_the_run_ends(
    orchestrator: Any,
) -> None:
    """README, Runtime: Client "does ... `result(run_id, timeout=None)`"; What you can
    rely on: "`await run.result(timeout=...)` is woken by LISTEN/NOTIFY ... As a
    fallback, each orchestrator polls every `poll_interval`", and a ConfigurationError
    "for a run id that is not a UUID" (so a run id's text is otherwise taken, as
    `get_run()` takes it).

    `orch.result(str(run_id))` used to register its waiter under the str while
    notifications and the poll report UUIDs: it was never woken, and returned only when
    its timeout ran out (without one, never). The text is read as the UUID it is.
    """
    gate = Gate("a")
    s = small_saga("bytext", ["a"], gate=gate)
    orch = await orchestrator(s)
    run = await s.start(Job())
    with anyio.fail_after(5):
        await gate.entered.wait()

    async def release() -> None:
        await anyio.sleep(0.2)
        gate.release.set()

    releasing = asyncio.ensure_future(release())
    began = time.monotonic()
    assert await orch.result(str(run.id), timeout=3) == "a"
    took = time.monotonic() - began
    await releasing
    assert took < 2, f"result() returned {took:.1f} s after it was called; the run ended at 0.2 s"


@pytest.mark.timeout(30)
async def test_client_methods_refuse_a_run_id_that_is_not_a_uuid(orchestrator: Any) -> None:
    """README, What you can rely on: "`ConfigurationError` for ... a run id that is not a
    UUID" (`get_run()` does so).

    The Client's own methods used to pass the text to the database: `info("...")` raised
    DatabaseError (as if the database failed), and `result("...")` took it for an outage
    and retried until its timeout (forever without one), failing the shared waiter poll
    of every other waiter meanwhile. Each now raises ConfigurationError at once.
    """
    s = small_saga("ids", ["a"])
    orch = await orchestrator(s)
    for call in (orch.info, orch.history, orch.result, orch.cancel, orch.retry):
        with pytest.raises(saga.ConfigurationError, match="not a run id"), anyio.fail_after(5):
            await call("not-a-run-id")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("tracer_provider", "not a provider"),
        ("meter_provider", 5),
        ("sagas", None),
        ("sagas", "a single saga, not in a list"),
    ],
)
def test_orchestrator_refuses_providers_and_sagas_that_cannot_work(
    setting: str, value: Any
) -> None:
    """README, What you can rely on: "Settings that cannot work are refused when given,
    naming the setting"; Errors: "ConfigurationError  a bad runtime argument".

    They used to raise AttributeError, TypeError (a weak reference to an int, 'NoneType'
    / 'Saga' object is not iterable), naming no setting.
    """
    s = small_saga("settings", ["a"])
    options: dict[str, Any] = {"sagas": [s], setting: value}
    if value == "a single saga, not in a list":
        options["sagas"] = s
    with pytest.raises(saga.ConfigurationError, match=setting):
        saga.Orchestrator("postgresql://nowhere.invalid/db", **options)


def _kw_only_step() -> None:
    s = saga.Saga("kw_only", input=Job)

    @s.step()  # type: ignore[arg-type]  # mypy sees it; the runtime must too
    async def reserve(ctx: saga.Context[Job], *, warehouse: str) -> None: ...


def _three_positionals_and_varargs() -> None:
    s = saga.Saga("varargs", input=Job)

    @s.step()  # type: ignore[arg-type]
    async def reserve(ctx: Any, stock: Any, price: Any, *more: Any) -> None: ...


def _kw_only_compensation() -> None:
    s = saga.Saga("kw_only_undo", input=Job)

    @s.step()
    async def reserve(ctx: saga.Context[Job]) -> str:
        return "r"

    @reserve.compensate  # type: ignore[arg-type]
    async def release(ctx: saga.Context[Job], reservation: str, *, reason: str) -> None: ...


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "define", [_kw_only_step, _three_positionals_and_varargs, _kw_only_compensation]
)
def test_steps_and_compensations_that_cannot_be_called_are_refused(define: Any) -> None:
    """README, Definitions: "Broken definitions fail at once with `DefinitionError`:
    ... wrong parameters"; a step is `async def step(ctx)`, a compensation
    `async def undo(ctx, result)`.

    A required keyword-only parameter (`async def step(ctx, *, warehouse)`, `async def
    undo(ctx, result, *, reason)`) and extra required positionals next to `*args`
    (`async def step(ctx, stock, price, *more)`) used to be accepted; every attempt then
    failed with a TypeError.
    """
    with pytest.raises(saga.DefinitionError):
        define()


@pytest.mark.timeout(10)
def test_pivot_refuses_a_truthy_stand_in() -> None:
    """README, What you can rely on: "Settings that cannot work are refused when given,
    naming the setting" (saga's own check of flags says a truthy stand-in must not
    silently turn a setting on; `migrate="false"` is refused so).

    `@saga.step(pivot="no")` used to make the step a pivot (`bool("no")`): a point of
    no return, never asked for.
    """
    s = saga.Saga("pivot_flag", input=Job)
    with pytest.raises(saga.DefinitionError, match="pivot"):

        @s.step(pivot="no")  # type: ignore[arg-type]
        async def ship(ctx: saga.Context[Job]) -> None: ...


class Order(BaseModel):
    n: int = 0


forward = saga.Saga("forward_ref", input=Order)


@forward.step(retry=ONCE)
async def charge(ctx: saga.Context[Order]) -> Receipt:  # defined below, as modules often do
    return Receipt(charge_id=f"c-{ctx.input.n}")


class Receipt(BaseModel):
    charge_id: str


@pytest.mark.timeout(30)
async def test_a_forward_referenced_return_annotation_is_the_result_type(
    orchestrator: Any,
) -> None:
    """README, Definitions: "The return annotation is the result's type: results are
    stored as JSON and read back as that type (pydantic)"; "Broken definitions fail at
    once with `DefinitionError`".

    With `from __future__ import annotations` (as here) and a result model defined after
    the step, the annotation used to be resolved when the decorator ran, failed, and was
    silently taken as `Any`: every run then failed its step with a SerializationError
    asking for the annotation it has. It is resolved when the saga is registered; one
    that names what is never defined (imported under TYPE_CHECKING only) is a
    DefinitionError then, naming it.
    """
    orch = await orchestrator(forward)
    run = await orch.start(forward, Order(n=1))
    assert await run.result(timeout=10) == Receipt(charge_id="c-1")


async def test_a_return_annotation_naming_nothing_defined_is_refused_at_registration(
    orchestrator: Any,
) -> None:
    """A step whose return annotation names a class that is never defined at run time
    (imported under TYPE_CHECKING only) is a DefinitionError when registered, naming
    the step and the name: its results could never be read back as that type."""
    s = saga.Saga("never_defined", input=Order)

    @s.step()
    async def quote(ctx: saga.Context[Order]) -> Quote:  # type: ignore[name-defined]  # noqa: F821
        raise AssertionError("never called")

    with pytest.raises(saga.DefinitionError, match="step 'quote' names 'Quote'"):
        await orchestrator(s)


@pytest.mark.timeout(30)
async def test_a_second_aclose_returns_only_once_the_orchestrator_is_closed(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README, Runtime: "`aclose()` is the same [as leaving: ... cancels the rest and
    releases their leases so another process takes them at once] and may be called more
    than once."

    A second `aclose()` called while the first is still closing (a signal handler and a
    lifespan both closing, say) used to return at once, the orchestrator still
    `closing`, its step running and its lease held: an application exiting its event
    loop then never gave the lease back. It returns once the close ended.
    """
    gate = Gate("hold")  # never released
    s = small_saga("twice", ["hold"], gate=gate)
    orch = saga.Orchestrator(dsn, sagas=[s], shutdown_timeout=1.0, lease_seconds=60)
    await orch.__aenter__()
    await s.start(Job())
    with anyio.fail_after(5):
        await gate.entered.wait()
    first = asyncio.ensure_future(orch.aclose())
    await asyncio.sleep(0)  # the first close has begun
    try:
        await orch.aclose()
        held = await db.fetchval("SELECT count(*) FROM saga.runs WHERE lease_owner IS NOT NULL")
        why = f"second aclose() returned while the first is still closing: state={orch._state!r}"
        assert first.done(), why
        assert held == 0, f"{why}; leases still held: {held}"
    finally:
        await first


@pytest.mark.timeout(30)
async def test_aclose_while_opening_closes_it(dsn: str) -> None:
    """README, Runtime: "`aclose()` is the same [as leaving] and may be called more than
    once. An orchestrator cannot be reopened." Errors: LifecycleError for an
    orchestrator "used before open / after close".

    `aclose()` called while `async with` is still opening (a shutdown signal during
    startup) used to fail with a bare AssertionError, and the opening then completed
    with `is_open` True while its loops had stopped. It now waits for the opening, then
    closes: the orchestrator ends closed.
    """
    s = small_saga("opening", ["a"])
    orch = saga.Orchestrator(dsn, sagas=[s], poll_interval=0.2)
    opening = asyncio.ensure_future(orch.__aenter__())
    await asyncio.sleep(0.001)  # opening: connecting and migrating
    try:
        closed_error: BaseException | None = None
        try:
            await orch.aclose()
        except BaseException as exc:
            closed_error = exc
        await asyncio.wait([opening])
        assert not isinstance(closed_error, AssertionError), "aclose() raised AssertionError"
        assert not orch.is_open, "the orchestrator is open after aclose()"
    finally:
        await orch.aclose()
