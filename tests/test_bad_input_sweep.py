"""Bad input across the public API: the documented error, at the call, nothing written.

Each test gives a public call an input of the wrong type or out of range (an int too
long to print, None for the saga, a saga name the database cannot hold, a model class
where a model is expected) and expects the error type README "Errors" documents for it.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
import saga.testing
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class In(BaseModel):
    n: int = 0


class Decision(BaseModel):
    ok: bool


sweep = saga.Saga("bad_input_sweep", input=In)


@sweep.step()
async def first(ctx: saga.Context[In]) -> int:
    return 1


decision = sweep.wait_for("decision", Decision, timeout=timedelta(hours=1))


@sweep.step()
async def last(ctx: saga.Context[In]) -> bool:
    return ctx.result(decision).ok


# An int too long to print: Python refuses str()/repr() of ints above 4,300 digits
# (sys.get_int_max_str_digits()), so an error message built with {value!r} raises
# ValueError instead of the saga error it was building.
HUGE = 10 ** (sys.get_int_max_str_digits() + 10)


def _shown(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:160]}"


# -- 1. ints too long to print ----------------------------------------------------------------

Call = Callable[[saga.Client, Any], Awaitable[Any]]

OPERATOR_CALLS: dict[str, tuple[Call, type[saga.SagaError]]] = {
    "list_runs(limit=)": (lambda c, v: saga.list_runs(c, limit=v), saga.ConfigurationError),
    "needs_attention(limit=)": (
        lambda c, v: saga.needs_attention(c, limit=v),
        saga.ConfigurationError,
    ),
    "prune(batch_size=)": (
        lambda c, v: saga.prune(c, older_than=timedelta(days=1), batch_size=v),
        saga.ConfigurationError,
    ),
    "cancel_runs(limit=)": (lambda c, v: saga.cancel_runs(c, limit=v), saga.ConfigurationError),
    "retry_runs(limit=)": (lambda c, v: saga.retry_runs(c, limit=v), saga.ConfigurationError),
    "saga.testing.advance(by=)": (
        lambda c, v: saga.testing.advance(c, "01a24b94-3bde-74fc-a4f6-568cd712def8", v),
        saga.InvalidInputError,
    ),
}


@pytest.mark.parametrize("sign", [1, -1], ids=["huge", "minus-huge"])
@pytest.mark.parametrize("call", list(OPERATOR_CALLS))
async def test_operator_calls_refuse_an_int_too_long_to_print_with_the_saga_error(
    open_client: ClientFactory, db: asyncpg.Connection, call: str, sign: int
) -> None:
    """README, "What you can rely on": "Settings that cannot work are refused when given,
    naming the setting"; "Operator API": "More than `limit` (at most 10,000) ... raise
    `ConfigurationError` and change nothing"; "Ages and time shifts (`older_than`,
    `newer_than`, `saga.testing.advance`, ...) go up to 1,000 years" (advance refuses
    others with InvalidInputError). Errors: "ConfigurationError  a bad runtime argument".

    Proves: an int of more digits than Python prints (10**4310, or its negative) given
    as a count or a duration is refused with the saga error naming the argument (its
    message cannot hold the int's digits), and nothing is written."""
    client = await open_client()
    fn, expected = OPERATOR_CALLS[call]
    value = sign * HUGE
    with anyio.fail_after(20):
        try:
            await fn(client, value)
        except expected:
            pass
        except Exception as exc:
            pytest.fail(
                f"{call} with an int of over 4300 digits: expected "
                f"saga.{expected.__name__} naming the argument, got {_shown(exc)}"
            )
        else:
            pytest.fail(f"{call} with an int of over 4300 digits was accepted")
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


@settings(max_examples=25, deadline=None)
@given(
    value=st.one_of(
        st.integers(min_value=HUGE, max_value=HUGE * 10**20),
        st.integers(min_value=-HUGE * 10**20, max_value=-HUGE),
    )
)
def test_definitions_refuse_any_int_too_long_to_print_with_a_definition_error(
    value: int,
) -> None:
    """README, API "Definitions": "Broken definitions fail at once with
    `DefinitionError`"; "Traffic control": "Refused at definition with a
    `DefinitionError` naming what is wrong: ... a `missed` policy or `catch_up` out of
    range"; "Child sagas": `max_children` bounds the children.

    Proves, for the whole class of ints longer than Python prints (either sign): a
    children step's ``max_children`` and a schedule's ``missed`` refuse them with a
    ``DefinitionError``, as their neighbours (``Retry(max_attempts=)``) do."""
    child = saga.Saga("sweep_child", input=In)

    @child.step()
    async def work(ctx: saga.Context[In]) -> int:
        return 1

    failures: list[str] = []

    def check(label: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except saga.DefinitionError:
            return
        except Exception as exc:
            failures.append(f"{label}: {_shown(exc)}")
            return
        failures.append(f"{label}: accepted")

    def children() -> Any:
        parent = saga.Saga("sweep_parent", input=In)

        @parent.step()
        async def split(ctx: saga.Context[In]) -> int:
            return 1

        # (a huge positive bound is a valid, if useless, bound: only below 1 is wrong)
        return parent.children("kids", child, lambda ctx: [], max_children=-abs(value))

    check("Saga.children(max_children=<minus a huge int>)", children)
    check(
        "Scheduled(missed=<huge int>)",
        lambda: saga.Scheduled(
            "sweep_schedule", child, saga.Schedule.cron("@daily"), In(), missed=value
        ),
    )
    # The neighbours refuse the same value cleanly (the test's premise).
    with pytest.raises(saga.DefinitionError):
        saga.Retry(max_attempts=value)
    assert not failures, "expected DefinitionError naming the setting; got " + "; ".join(failures)


# -- 2. start(None, ...) ----------------------------------------------------------------------


async def test_start_with_none_for_the_saga_is_a_configuration_error(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, "What you can rely on": "`start()` takes the very `Saga` object
    registered with the client (a second object of the same name and version ... is
    named as such)"; Errors: "ConfigurationError  a bad runtime argument". The code
    refuses ``start("bad_input_sweep", ...)`` and ``start(5, ...)`` with ``ConfigurationError:
    start() takes a saga.Saga, got ...``.

    Proves: ``orch.start(None, input)`` (a lookup such as ``SAGAS.get(name)`` that found
    nothing) is a ``ConfigurationError`` ("start() takes a saga.Saga"), nothing written."""
    orch = await orchestrator(sweep)
    not_a_saga: Any = None
    with anyio.fail_after(20):
        try:
            await orch.start(not_a_saga, In())
        except saga.ConfigurationError:
            pass
        except Exception as exc:
            pytest.fail(
                f"start({not_a_saga!r}, input): expected saga.ConfigurationError "
                f"('start() takes a saga.Saga'), got {_shown(exc)}"
            )
        else:
            pytest.fail(f"start({not_a_saga!r}, input) was accepted")
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


# -- 3. signal_key(saga=<bad name>) -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad_saga",
    ["sweep\x00x", "sweep\udc80x", 5, b"bad_input_sweep"],
    ids=["NUL", "lone-surrogate", "int", "bytes"],
)
async def test_signal_key_with_a_bad_saga_is_not_a_database_outage(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, bad_saga: Any
) -> None:
    """README, "Waits": "`await client.signal_key(saga, key, wait_or_name, payload)` ...
    The payload is validated against the wait's model and size-checked before anything
    is written (`InvalidInputError`, `PayloadTooLargeError`), as is the signal's name";
    "Bad input raises a clear error before anything is written: `InvalidInputError`
    (also for an idempotency key that is empty, ... or holds NUL or a lone surrogate)";
    Errors: "DatabaseError  a driver error, translated". The web section maps
    DatabaseError to 503 + Retry-After ("Postgres is unreachable ... Retrying is safe").

    Proves: a saga name holding NUL or a lone surrogate, or a saga that is neither a
    Saga nor a str, is refused before the database is asked (not a ``DatabaseError``,
    which a web app answers with "retry later"), and nothing is recorded."""
    orch = await orchestrator(sweep)
    run = await orch.start(sweep, In(), key="k-1")
    with anyio.fail_after(20):
        try:
            await orch.signal_key(bad_saga, "k-1", "decision", Decision(ok=True))
        except saga.DatabaseError as exc:
            pytest.fail(
                f"signal_key(saga={bad_saga!r}, ...): expected an input/configuration "
                f"error naming the saga argument, got {_shown(exc)} (cause: "
                f"{type(exc.__cause__).__name__})"
            )
        except (saga.InvalidInputError, saga.ConfigurationError, saga.DefinitionError):
            pass
        except saga.RunNotFoundError:
            pass  # a str the database can hold and no saga has: no run
    events = [e.kind for e in await run.history()]
    assert "signal_received" not in events, events
    assert "signal_refused" not in events, events


# -- 4. Scheduled(input=<the model class>) ------------------------------------------------------


class ReportRequest(BaseModel):
    days: int = 1


report = saga.Saga("sweep_report", input=ReportRequest)


@report.step()
async def build(ctx: saga.Context[ReportRequest]) -> int:
    return ctx.input.days


@pytest.mark.timeout(60)
async def test_scheduled_with_the_input_model_class_instead_of_an_instance_is_refused(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, "Traffic control": "`input` is a model, or a function (sync or async) of
    the slot's time returning one ... Refused at definition with a `DefinitionError`
    naming what is wrong: ... an input of another model"; "What you can rely on":
    "Settings that cannot work are refused when given, naming the setting".

    Proves: ``Scheduled(..., ReportRequest)`` (the model class, where the README's
    example has ``ReportRequest()``; a class is callable, but never with a slot) is a
    ``DefinitionError``."""
    try:
        scheduled = saga.Scheduled(
            "sweep-every-second",
            report,
            saga.Schedule.every(timedelta(seconds=1)),
            ReportRequest,  # type: ignore[arg-type]
            grace=timedelta(seconds=30),
        )
    except saga.DefinitionError:
        return
    with capture_logs() as logs:
        await orchestrator(report, schedules=[scheduled])
        await anyio.sleep(4)
    runs = await db.fetchval("SELECT count(*) FROM saga.runs")
    failed = [e for e in logs if e.get("event") == "schedule_input_failed"]
    pytest.fail(
        "Scheduled(input=<the input model class>) was accepted (expected DefinitionError); "
        f"in 4 s of a 1-second schedule: {runs} run(s) started, {len(failed)} "
        f"schedule_input_failed log line(s), error types "
        f"{sorted({str(e.get('error_type')) for e in failed})}"
    )


def _no_slot() -> ReportRequest:
    return ReportRequest()


async def _two_args(slot: Any, other: Any) -> ReportRequest:
    return ReportRequest()


def _keyword_only(*, slot: Any) -> ReportRequest:
    return ReportRequest()


@pytest.mark.parametrize("fn", [_no_slot, _two_args, _keyword_only, lambda: ReportRequest()])
def test_an_input_function_that_cannot_take_the_slot_is_refused(fn: Any) -> None:
    """README, "Traffic control": "`input` is a model, or a function (sync or async) of
    the slot's time returning one ... Refused at definition with a `DefinitionError`
    naming what is wrong".

    Before, a function taking no argument (or two, or only a keyword) passed the
    definition and every slot then failed (`schedule_input_failed`, a TypeError), for
    ever: now a ``DefinitionError`` naming the schedule's input and "(slot)". A function
    of the slot (one positional argument, or ``*args``) is accepted."""
    with pytest.raises(saga.DefinitionError, match=r"schedule 'bad-input': input .*\(slot\)"):
        saga.Scheduled("bad-input", report, saga.Schedule.every(timedelta(seconds=1)), fn)
    for fine in (lambda slot: ReportRequest(), _args_only, ReportRequest()):
        saga.Scheduled("fine-input", report, saga.Schedule.every(timedelta(seconds=1)), fine)


def _args_only(*args: Any) -> ReportRequest:
    return ReportRequest()


async def test_faults_refuse_what_is_not_an_orchestrator(
    open_client: ClientFactory,
) -> None:
    """README, "Testing your sagas": faults are attached to the orchestrator that
    executes the steps: a ``Client`` (which executes nothing) is a
    ``ConfigurationError`` naming what is wrong (not an ``AttributeError``)."""
    client = await open_client(sweep)
    with pytest.raises(saga.ConfigurationError, match="Orchestrator"):
        saga.testing.Faults().attach(client)  # type: ignore[arg-type]
