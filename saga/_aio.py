"""Cancellation, told apart from exceptions that merely look like it.

``asyncio.CancelledError`` means two things: "this task is being cancelled" (by a cancel
scope, a timeout, ``Task.cancel()``), and, when user code lets one escape from a future
that was cancelled elsewhere, nothing of the sort. anyio silently ends a task on the
second kind too, so an orchestrator would lose a loop without a word. saga tells them
apart with ``Task.cancelling()`` (Python 3.11): a real cancellation of the current task
is pending exactly when it is above zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the current task being cancelled (not a stray CancelledError)."""
    if not issubclass(type(exc), asyncio.CancelledError):  # (exc.__class__ may lie)
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def is_cancellation_by_saga(exc: BaseException) -> bool:
    """Whether ``exc``, escaping the user's function, is saga cancelling the call (lease
    lost, shutdown: a cancel scope around it was cancelled), as opposed to the function
    cancelling its own task (``asyncio.current_task().cancel()``), which is its failure
    like any other exception: the task then no longer counts as cancelled (a timeout
    around the call raises TimeoutError, never gets here)."""
    if not is_cancellation(exc):
        return False
    if anyio.current_effective_deadline() == -math.inf:
        return True  # a scope around the call was cancelled: the cancellation is saga's
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()
    return False


#: The writes started in this context, when a caller asks (saga._cli: whether an
#: operator's action interrupted by Ctrl-C has a write in flight); None elsewhere.
started_writes: ContextVar[list[asyncio.Future[Any]] | None] = ContextVar(
    "saga_started_writes", default=None
)


async def uncancellable(coro: Coroutine[Any, Any, T], then: Callable[[T], None] | None = None) -> T:
    """Run ``coro`` to completion even if the caller is cancelled meanwhile, by any means
    (anyio scopes, ``asyncio.timeout``, ``wait_for``, ``Task.cancel()``). For writes whose
    outcome must not depend on the caller staying around. ``then`` gets the outcome of a
    write that succeeded, cancelled caller or not: what must follow the write (a
    wake-up, a count) is not lost with the caller.

    Under an anyio cancel scope the outcome is returned (the scope cancels the caller
    again at its next checkpoint, as a shielded scope would); under a plain asyncio
    cancellation, which is delivered once, the caller's CancelledError is re-raised once
    the write is done.
    """
    task = asyncio.ensure_future(coro)
    writes = started_writes.get()
    if writes is not None:
        writes.append(task)
    try:
        done = await asyncio.shield(task)
    except asyncio.CancelledError:
        if not is_cancellation(asyncio.CancelledError()):
            raise  # not a cancellation of the caller: the write itself was cancelled
        redelivered = anyio.current_effective_deadline() == -math.inf
        with anyio.CancelScope(shield=True):
            while not task.done():
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    continue
        if not task.cancelled() and task.exception() is None and then is not None:
            then(task.result())
        if redelivered:
            return task.result()
        raise  # (the write's exception, if any, retrieved above: the caller gets this)
    if then is not None:
        then(done)
    return done


@contextlib.contextmanager
def time_limit(scope: anyio.CancelScope, seconds: float, what: str) -> Iterator[None]:
    """Cancel what runs under it after ``seconds`` (by ``scope``), then raise
    TimeoutError, even when that code swallowed the cancellation and returned, or
    blocked past the time without an await (its late result is not used): anyio's
    fail_after raises only if the cancellation reached it."""
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()
    deadline = scope.deadline = anyio.current_time() + seconds
    try:
        with scope:
            yield
    except asyncio.CancelledError:
        # The scope's own cancellation escapes it when the code swallowed a cancel of
        # its own task before (anyio then leaves the task's count alone): still this
        # limit's, unless a scope around it was cancelled too.
        if not scope.cancel_called or anyio.current_effective_deadline() == -math.inf:
            raise
        while task.cancelling() > before:
            task.uncancel()
    # (Sync code that blocked past the deadline was never cancelled: late all the same.)
    if scope.cancel_called or anyio.current_time() > deadline:
        raise TimeoutError(f"{what} ran past its time limit of {seconds:g} s")


def cancelling() -> int:
    """The current task's count of cancellations pending (see settle_self_cancel)."""
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


async def settle_self_cancel(before: int) -> None:
    """User code that cancelled its own task (``asyncio.current_task().cancel()``) and
    returned before the cancellation reached it left it pending: take it here, so that
    it does not land in saga's next await (the attempt's write). ``before``: the task's
    ``cancelling()`` when the user's code was called."""
    task = asyncio.current_task()
    assert task is not None
    if task.cancelling() <= before:
        return
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)  # the pending cancellation is delivered here, if still due
    while task.cancelling() > before:
        task.uncancel()


@contextlib.asynccontextmanager
async def own_cancel_settled() -> AsyncIterator[None]:
    """Around user code saga calls: a cancellation of its own task that it left pending
    (``asyncio.current_task().cancel()``, then a return or a raise at once) is taken when
    it ends, so that it does not land in saga's next await; saga's own is left alone."""
    before = cancelling()
    try:
        yield
    except BaseException as exc:
        if not is_cancellation_by_saga(exc) and cancelling() > before:
            await settle_self_cancel(before)
        raise
    if cancelling() > before:
        await settle_self_cancel(before)


class Threads:
    """Sync user functions called in threads of their own, at most one at a time per key:
    a blocking call holds up no other work of the event loop. A call cancelled (its time
    limit, a shutdown) is abandoned, not stopped (no thread can be): its thread is a
    daemon, which never holds up the process's exit, and it keeps its key busy until it
    returns, so a later call with the key raises TimeoutError at once and a function
    that never returns costs one thread, not one per try. Threads of their own, not
    anyio's pool: that pool's are not daemons, and the app's sync code shares its 40."""

    def __init__(self) -> None:
        self._busy: dict[object, object] = {}  # key -> the call holding it

    async def call(self, key: object, what: str, fn: Callable[..., T], *args: Any) -> T:
        if key in self._busy:
            raise TimeoutError(f"{what}: its call before is still running")
        call = self._busy[key] = object()
        loop = asyncio.get_running_loop()
        # (value, None) or (None, what it raised): raised below, in the caller's own frame,
        # as a call on the loop would (a future would mangle GeneratorExit, say).
        done: asyncio.Future[tuple[T | None, BaseException | None]] = loop.create_future()
        context = contextvars.copy_context()

        def free() -> None:
            if self._busy.get(key) is call:
                del self._busy[key]

        def settle(value: T | None, exc: BaseException | None) -> None:
            free()
            if not done.done():  # (else abandoned: nobody waits for it)
                done.set_result((value, exc))

        def run() -> None:
            value: T | None = None
            failure: BaseException | None = None
            try:
                value = context.run(fn, *args)
            except BaseException as exc:  # handed to the caller
                failure = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed since
                loop.call_soon_threadsafe(settle, value, failure)

        threading.Thread(target=run, name=f"saga {what}", daemon=True).start()
        value, failure = await done
        if failure is not None:
            raise failure
        return value  # type: ignore[return-value]
