"""Group commit: the transitions of many runs written in one statement and one commit.

A writer that finds no write in flight goes at once, after one turn of the event loop
(the writers made ready with it join it): at low load nothing waits for a batch to
fill. Writers that arrive while a write is in flight queue up; when it ends, the first
of them leads the next write and takes everything queued by then (up to ``max_batch``)
into one statement. So batches grow with the load, by themselves, and each row of a
batch keeps its own fence (the store's statement checks every run's lease token and
owner). With ``leaders`` above one, up to that many writes are in flight at once, each
leading its own batch (of at most ``max_batch``): an executing orchestrator writes its
runs' steps in two statements at a time, each of at most half its runs, which Postgres
runs on two backends at once.

A write in the lead does not wait long for a row another transaction holds locked (a
caller's transaction that sent a run a signal holds its row until it commits): the
store's statements give up after a moment, having written nothing, and the batch's
writes go again one by one; a write whose row is still held answers ``BUSY``, and its
writer writes it again, waiting for that lock by itself, once the lead is handed on. So
one run's lock holds up no other run's write, neither in its batch nor queued behind it.

A batch the database refused outright (an error reported by the server: nothing
committed) is written again one run at a time, so a row that fails fails its run alone.
A batch whose connection broke may have committed: every writer in it gets the error and
resolves its own run from the history, as a single write does (see ``saga._write``).

No task of its own: the leader is one of the writers, and a writer cancelled while it
waits or leads hands the lead on, so nothing queued is ever stranded.

With ``flights``, a write that may lease work to its worker (the next step, a run claimed
along, a graph's new items) is not cancelled in flight: the leader's statement runs in a
task of its own, kept in ``flights`` until it ends, and a leader cancelled meanwhile
leaves it to finish (the batch's other writers still get their outcomes). asyncpg cannot
take back a statement the server already runs: one cut short by a shutdown could commit
after the shutdown gave its worker's leases back, leasing work to a worker that is gone.
The shutdown waits for the flights, a little, before it gives them back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

import anyio
import asyncpg

A = TypeVar("A")  # what one write is: the statement's arguments for one run
R = TypeVar("R")  # what one write returns (a row, or None: its fence refused it)
T = TypeVar("T")

#: A batch's answer: for each write, its result or the error it alone ended with.
Outcomes = list[Any]


class _Lead:
    """A queued writer's turn to lead the next batch."""


LEAD = _Lead()


class _Busy:
    """A batch's answer for a write whose row another transaction held: write it alone."""


BUSY = _Busy()


def definitely_not_committed(exc: BaseException) -> bool:
    """The server answered the statement with an error: its transaction rolled back.
    (A broken connection, or the server going away, leaves the outcome unknown.)"""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError,
    )


class _Waiter(Generic[A]):
    __slots__ = ("args", "future")

    def __init__(self, args: A, future: asyncio.Future[Any]) -> None:
        self.args = args
        self.future = future


async def or_busy(write: Awaitable[R]) -> R | _Busy:
    """``write``, or ``BUSY`` when it gave up on a row another transaction held (its
    statements' ``lock_timeout``: nothing was written)."""
    try:
        return await write
    except asyncpg.LockNotAvailableError:
        return BUSY


async def patiently(
    waiting: anyio.Semaphore | None,
    wait: Callable[[], Awaitable[R]],
    attempt: Callable[[], Awaitable[R | _Busy]],
) -> R:
    """A write whose row another transaction may hold (a caller's transaction that sent
    its run a signal, until it ends), with bounded use of the pool: ``wait()`` writes it
    waiting for the lock, on a connection, while one of the ``waiting`` permits is free
    (the permits keep most of the pool for the other runs' writes); without a permit,
    ``attempt()`` writes it if the lock is free within a moment (else ``BUSY``, having
    written nothing), tried again from time to time, holding nothing meanwhile."""
    delay = 0.02
    while True:
        if waiting is not None:
            try:
                waiting.acquire_nowait()
            except anyio.WouldBlock:
                pass
            else:
                try:
                    return await wait()
                finally:
                    waiting.release()
        outcome = await attempt()
        if not isinstance(outcome, _Busy):
            return outcome
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.5)


class GroupCommit(Generic[A, R]):
    """Write ``A``s alone when nothing is in flight, else in batches.

    ``single`` writes one and ``batch`` several in one statement, returning their
    results keyed by ``key(args)`` (a missing key: that write's fence refused it); a
    write whose row another transaction holds is ``BUSY`` (or the batch fails, having
    written nothing, and its writes go again as singles). ``wait`` writes one
    (as ``alone(args)``), waiting for its row's lock: a busy write's writer calls it
    once out of the lead (None: ``single`` never answers ``BUSY``), when one of the
    ``waiting`` permits is free (a write waiting for a lock holds a connection: the
    permits keep most of the pool for the others); without one it tries ``single``
    again, from time to time, holding nothing meanwhile. ``alone(args)`` is also what a
    write of a refused batch becomes when written again alone.
    """

    def __init__(
        self,
        single: Callable[[A], Awaitable[R | None]],
        batch: Callable[[Sequence[A]], Awaitable[dict[Hashable, R]]],
        key: Callable[[A], Hashable],
        *,
        wait: Callable[[A], Awaitable[R | None]] | None = None,
        waiting: anyio.Semaphore | None = None,
        alone: Callable[[A], A] = lambda args: args,
        leaders: int = 1,
        max_batch: int = 256,
        flights: set[asyncio.Future[Any]] | None = None,
    ) -> None:
        self._single = single
        self._wait = wait or single
        self._waiting = waiting
        self._as_alone = alone
        self._batch = batch
        self._key = key
        self._max_leaders = leaders
        self._max_batch = max_batch
        self._flights = flights
        self._leaders = 0  # writes in flight (each led by one writer)
        self._queue: deque[_Waiter[A]] = deque()
        #: Batches written and the writes in them (for tests and benchmarks).
        self.batches = 0
        self.batched = 0

    async def write(self, args: A) -> R | None:
        if self._leaders < self._max_leaders and not self._queue:
            self._leaders += 1
            try:
                # One turn of the event loop: the writers made ready with this one (the
                # runs a batch just answered) queue up behind it.
                await asyncio.sleep(0)
                outcome = await self._lead(args)
            finally:
                self._hand_over()
        else:
            waiter: _Waiter[A] = _Waiter(args, asyncio.get_running_loop().create_future())
            self._queue.append(waiter)
            try:
                outcome = await waiter.future
            except BaseException:
                self._abandon(waiter)
                raise
            if outcome is LEAD:
                try:
                    outcome = await self._lead(args)
                finally:
                    self._hand_over()
        if outcome is BUSY:  # out of any lead: only this write waits for its row
            return await self._busy(self._as_alone(args))
        return outcome

    async def _busy(self, args: A) -> R | None:
        """Write ``args`` (whose row another transaction held) once that lock is free
        (see :func:`patiently`): its try without waiting is a flight, its wait is not
        (it waits for someone else's transaction, which a shutdown does not; the release
        leaves its row too)."""
        return await patiently(
            self._waiting, partial(self._wait, args), lambda: self._flown(self._single(args))
        )

    def _abandon(self, waiter: _Waiter[A]) -> None:
        """A queued writer was cancelled: out of the queue, or (its turn to lead had
        come) the lead goes on to the next."""
        future = waiter.future
        if not future.done() or future.cancelled():
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
        elif future.exception() is None and future.result() is LEAD:
            self._hand_over()

    def resize(self, leaders: int, max_batch: int) -> None:
        """Allow up to ``leaders`` writes in flight, each of at most ``max_batch``, from
        now on: the writes in flight finish as they are, and the next hand-overs follow
        the new limits."""
        self._max_leaders, self._max_batch = leaders, max_batch

    def _hand_over(self) -> None:
        """A write ended: the first writers still waiting lead the next batches (one, or
        more when the limit of writes in flight has grown; none while it has shrunk
        below the writes still in flight, whose hand-overs lead the queue on)."""
        self._leaders -= 1
        queue = self._queue
        while queue and self._leaders < self._max_leaders:
            nxt = queue.popleft()
            if not nxt.future.done():
                nxt.future.set_result(LEAD)
                self._leaders += 1

    async def _lead(self, args: A) -> R | None:
        """Write ``args`` and (up to ``max_batch`` in all) the writes queued by now."""
        queue = self._queue
        waiters: list[_Waiter[A]] = []
        while queue and len(waiters) + 1 < self._max_batch:
            waiter = queue.popleft()
            if not waiter.future.done():
                waiters.append(waiter)
        if not waiters:
            return await self._flown(self._single(args))
        self.batches += 1
        self.batched += len(waiters) + 1
        return await self._flown(self._led(args, waiters))

    async def _led(self, args: A, waiters: list[_Waiter[A]]) -> R | None:
        """A batch: ``args`` and the queued ``waiters``' writes; each waiter gets its own
        outcome."""
        try:
            outcomes = await self._write_batch([args] + [w.args for w in waiters])
        except BaseException:
            # Cancelled while the batch was in flight: its fate is unknown, so each
            # writer in it resolves its own run, as after a lost connection.
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(
                        ConnectionAbortedError("the batch holding this write was interrupted")
                    )
            raise
        _deliver(waiters, outcomes[1:])
        mine = outcomes[0]
        if isinstance(mine, BaseException):
            raise mine
        return mine  # type: ignore[no-any-return]

    async def _flown(self, write: Awaitable[T]) -> T:
        flights = self._flights
        return await (write if flights is None else fly(flights, write))

    async def _write_batch(self, batch: list[A]) -> Outcomes:
        try:
            found = await self._batch(batch)
        except Exception as exc:
            if not definitely_not_committed(exc):
                # Maybe committed: each writer resolves its own run from the history.
                return [exc] * len(batch)
            return [await self._alone(self._as_alone(args)) for args in batch]
        return [found.get(self._key(args)) for args in batch]

    async def _alone(self, args: A) -> Any:
        try:
            return await self._single(args)
        except Exception as exc:
            return exc


async def fly(flights: set[asyncio.Future[Any]], statement: Awaitable[T]) -> T:
    """Await ``statement`` in a task of its own, kept in ``flights`` until it ends, that a
    cancel of its caller does not cut short (see the module's docstring). The outcome
    comes back through a plain future, set in the same turn as those of the batch's
    other writers (a shield would wake this writer one turn after them)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[T] = loop.create_future()
    flight = loop.create_task(_carry(statement, outcome))
    flights.add(flight)
    flight.add_done_callback(flights.discard)
    return await outcome


async def _carry(statement: Awaitable[T], outcome: asyncio.Future[T]) -> None:
    """A flight: ``statement``'s outcome to ``outcome``, unless its writer is gone."""
    try:
        result = await statement
    except asyncio.CancelledError:  # (a shutdown gave up waiting for it)
        outcome.cancel()
        raise
    except BaseException as exc:
        if not outcome.done():
            outcome.set_exception(exc)
    else:
        if not outcome.done():
            outcome.set_result(result)


def _deliver(waiters: list[_Waiter[Any]], outcomes: Outcomes) -> None:
    """Each queued writer of a batch gets its own outcome (a result, or an error)."""
    for waiter, outcome in zip(waiters, outcomes, strict=True):
        if waiter.future.done():
            continue  # cancelled meanwhile: its write happened all the same
        if isinstance(outcome, BaseException):
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result(outcome)
