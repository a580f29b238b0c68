"""The error contract of the public API, called as an attacker would: each bad call
raises the documented saga error naming what is wrong (never a password), writes
nothing, and every error crosses a process boundary (pickle) intact."""

from __future__ import annotations

import pickle
import uuid
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Job, parked_saga

SECRET = "hunter2pw"


async def _snapshot(db: asyncpg.Connection) -> tuple[Any, ...]:
    """Everything a call could have written: runs (all columns), events, signals, key
    slots."""
    runs = await db.fetch("SELECT * FROM saga.runs ORDER BY id")
    events = await db.fetchval("SELECT count(*) FROM saga.events")
    signals = await db.fetchval("SELECT count(*) FROM saga.signals")
    slots = await db.fetch("SELECT * FROM saga.key_slots ORDER BY 1")
    return ([tuple(r.values()) for r in runs], events, signals, [tuple(r.values()) for r in slots])


class Pay(BaseModel):
    account: str = "acct"


class Approval(BaseModel):
    ok: bool = True


@pytest.mark.parametrize(
    "dsn",
    [
        f"pg://:{SECRET}@db.internal/app",  # a short scheme
        f"u:{SECRET}@db/app",  # the scheme forgotten
    ],
)
@pytest.mark.parametrize("build", ["Client", "Orchestrator", "migrate"])
async def test_a_dsn_with_a_wrong_scheme_is_refused_without_its_password(
    dsn: str, build: str
) -> None:
    """README ("What you can rely on", settings): "The DSN must be a `postgresql://` (or
    `postgres://`) URI; one asyncpg cannot read (...) is a `ConfigurationError` when the
    client is built, never repeating the password".

    A DSN whose scheme is wrong (or missing) is refused naming the scheme only. Before,
    the error quoted its first 12 characters: for `pg://:hunter2pw@...` that was
    `'pg://:hunter2'`, most of the password, in an exception that ends up in logs."""

    async def built() -> object:
        if build == "Client":
            return saga.Client(dsn)
        if build == "Orchestrator":
            return saga.Orchestrator(dsn, sagas=[])
        return await saga.migrate(dsn)

    with anyio.fail_after(10), pytest.raises(saga.ConfigurationError) as caught:
        await built()
    message = str(caught.value)
    assert "postgresql://" in message  # it does name what is wrong
    leaked = [SECRET[:n] for n in range(3, len(SECRET) + 1) if SECRET[:n] in message]
    assert not leaked, f"the error repeats the password's start {leaked[-1]!r}: {message}"


@pytest.mark.parametrize("name", [["approve"], {"approve": 1}, {"approve"}])
async def test_signal_key_refuses_a_signal_name_that_is_not_text_as_signal_does(
    open_client: Any, db: asyncpg.Connection, name: Any
) -> None:
    """README ("Waits", Signals): "The payload is validated against the wait's model and
    size-checked before anything is written (`InvalidInputError`,
    `PayloadTooLargeError`), as is the signal's name"; README "Errors": every error
    derives from `SagaError`.

    `signal_key(saga, key, ["approve"], ...)` is refused with `InvalidInputError` naming
    the signal name, as `signal()` refuses it, and writes nothing. Before, it skipped
    the check and died in a dict lookup with a bare `TypeError: unhashable type`."""
    s = saga.Saga("h36_sig", input=Job)

    @s.step()
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    s.wait_for("approve", Approval)

    @s.step()
    async def last(ctx: saga.Context[Job]) -> int:
        return 2

    with anyio.fail_after(20):
        client = await open_client(s)
        run = await client.start(s, Job(), key="order-1")
        with pytest.raises(saga.InvalidInputError):  # the same name through signal()
            await client.signal(run.id, name, {"ok": True})
        before = await _snapshot(db)
        with pytest.raises(saga.InvalidInputError, match="signal name"):
            await client.signal_key(s, "order-1", name, {"ok": True})
        assert await _snapshot(db) == before


@pytest.mark.parametrize("action", ["cancel_runs", "retry_runs"])
async def test_a_bulk_expect_out_of_range_is_a_configuration_error(
    open_client: Any, db: asyncpg.Connection, action: str
) -> None:
    """README (Operator API, bulk actions): "More than `limit` (...) matching runs, or
    (given `expect`, the count an operator confirmed) another number, raise
    `ConfigurationError` and change nothing."

    An `expect` of 5,000 digits (hostile, say from a parsed request) is refused as out of
    range (a count is at most 10,000) with `ConfigurationError`, changing nothing.
    Before, it passed the check and the refusal's own message formatted it, which Python
    refuses past 4,300 digits: a bare `ValueError`."""
    s = parked_saga("h36_bulk")
    with anyio.fail_after(20):
        client = await open_client(s)
        await client.start(s, Job())
        before = await _snapshot(db)
        act = getattr(saga, action)
        with pytest.raises(saga.ConfigurationError, match="expect must be"):
            await act(client, limit=10, saga="h36_bulk", expect=10**5000, by="ana")
        with pytest.raises(saga.ConfigurationError, match="expect must be"):
            await act(client, limit=10, saga="h36_bulk", expect=10_001, by="ana")
        assert await _snapshot(db) == before


def _errors(rid: uuid.UUID) -> list[saga.SagaError]:
    info = saga.ErrorInfo("saga.PermanentError", "declined", "charge")
    return [
        saga.RunNotFoundError(rid),
        saga.RunNotFoundError(key="order-1", saga="checkout"),
        saga.IdempotencyConflictError("key reused", rid),
        saga.RunCompensatedError(rid, "compensated", info, None),
        saga.RunCancelledError(rid, "cancelled", None, None),
        saga.RunFailedError(rid, "failed", info, info),
        saga.RunStoppedError(rid, "stopped", info, None),
        saga.InvalidInputError("bad input"),
        saga.DatabaseError("away"),
        saga.RunTimeoutError("late"),
    ]


def test_every_error_crosses_a_process_intact() -> None:
    """README (Errors): `RunError` carries the failure's type name and message so that
    it can cross processes, and `IdempotencyConflictError` and `RunNotFoundError` carry
    the run's id (or the key). Each error pickled and read back (multiprocessing,
    ProcessPoolExecutor, task queues) is of the same type, says the same, and carries
    the same attributes. Before, `RunError`s and `IdempotencyConflictError` failed to
    unpickle (`__init__` called with the message only), and `RunNotFoundError` came back
    as "no run with id no run with id ..."."""
    rid = uuid.uuid4()
    for error in _errors(rid):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert str(back) == str(error)
        assert vars(back) == vars(error)


@pytest.mark.parametrize("by", ["   ", "\t\n"], ids=["spaces", "tab and newline"])
async def test_a_blank_operator_name_is_refused_before_anything_is_written(
    open_client: Any, db: asyncpg.Connection, by: str
) -> None:
    """README (Operator API): every action is recorded "with who did it and why". A
    blank `by` names no one: `ConfigurationError` naming `by`, nothing written, as for
    the dashboard's `Operator` name. Before, it was recorded as who acted."""
    from saga.web import Operator

    s = parked_saga("h36_by")
    with anyio.fail_after(20):
        client = await open_client(s)
        run = await client.start(s, Job())
        before = await _snapshot(db)
        with pytest.raises(saga.ConfigurationError, match="by must name someone"):
            await run.cancel(by=by)
        assert await _snapshot(db) == before
    with pytest.raises(saga.ConfigurationError, match="operator's name must name someone"):
        Operator(by)
