"""The lifecycle of saga's runtime objects: open once, loops in one task group, close once,
and say so when the loops die.

One anyio task group, owned by a host task the object creates on entry, holds every loop
(so ``async with`` may enter and exit in different tasks, as pytest fixtures and aiohttp
cleanup contexts do). Entering returns only once the loops are live. A loop that ends
without being asked to, or dies of an error (a stray ``CancelledError`` included, which
anyio would otherwise swallow silently), ends the object: ``is_open`` turns false, calls
raise :class:`LifecycleError`, and ``wait_stopped()`` raises the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry import context as otel_context

from saga._aio import is_cancellation
from saga._errors import LifecycleError, exception_type
from saga._log import logger

Loop = Callable[..., Awaitable[None]]


class Lifecycle:
    """new -> opening -> open [-> failed] -> closing -> closed."""

    _kind = "object"  # the public name, for messages

    def __init__(self, name: str) -> None:
        self._name = name
        self._state = "new"
        self._failure: BaseException | None = None
        self._stopping = False
        self._stop = anyio.Event()
        self._host: asyncio.Task[None] | None = None
        self._tg: TaskGroup | None = None
        self._opened = anyio.Event()  # opening ended, open or not
        self._closed = anyio.Event()  # closing ended
        #: The close gave up waiting for its loops (a step ignoring its cancellation).
        self.abandoned = False

    # -- what subclasses provide ------------------------------------------------------------

    async def _open(self) -> None:
        """Acquire resources (pool, schema checks) before the loops start."""

    async def _start_loops(self, tg: TaskGroup) -> None:
        """Start the loops in ``tg`` (with :meth:`_supervised`)."""

    async def _drain(self) -> None:
        """After stop was asked, before the loops are cancelled."""

    async def _after_loops(self, hurry: bool = False) -> None:
        """After the loops ended (shielded): release what they held (``hurry``: the close
        gave up waiting for them, its patience is spent)."""

    async def _close(self) -> None:
        """Release resources (the pool)."""

    def _close_patience(self) -> float | None:
        """Seconds ``aclose()`` waits for the loops to end (None: as long as it takes)."""
        return None

    def _closing(self, reason: str) -> None:
        """Stop was asked or the loops died: wake whoever waits on this object."""

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True from the end of ``async with`` entry until close, unless its loops died."""
        return self._state == "open"

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _check_open(self) -> None:
        if self._state == "open":
            return
        kind = self._kind
        if self._state in ("new", "opening"):
            raise LifecycleError(f"the {kind} is not open; use `async with {kind}(...)`")
        if self._state == "failed":
            cause = exception_type(self._failure or LifecycleError())
            raise LifecycleError(
                f"the {kind} stopped: its loops died of {cause}; close it"
            ) from self._failure
        raise LifecycleError(f"the {kind} is closed")

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise LifecycleError(f"this {self._kind} is {self._state}; create a new one")
        self._state = "opening"
        try:
            await self._opening()
        finally:
            self._opened.set()
        return self

    async def _opening(self) -> None:
        try:
            await self._open()
            started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._host = asyncio.create_task(
                self._host_main(started), name=f"saga-{self._kind.lower()}:{self._name}"
            )
            await started
        except BaseException:
            self._state = "closed"
            if self._host is not None:
                self._stop.set()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([self._host])
            with anyio.CancelScope(shield=True):
                await self._close()
            raise
        self._state = "open"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the loops (see the subclass for what stopping lets finish) and release
        everything. Safe to call more than once, and at any time: while it is opening, it
        closes once open; while another close runs, it returns once that one ended."""
        if self._state == "opening":
            await self._opened.wait()
        if self._state == "closing":
            await self._closed.wait()
        if self._state in ("closed", "new"):
            self._state = "closed"
            return
        self._state = "closing"
        self._stopping = True
        self._closing(f"the {self._kind} was closed while waiting")
        self._stop.set()
        try:
            with anyio.CancelScope(shield=True):
                assert self._host is not None
                done, _ = await asyncio.wait([self._host], timeout=self._close_patience())
                if not done:
                    # A task swallows its cancellation (a step catching CancelledError):
                    # it would hold the close for ever. Give its leases back and go on.
                    self.abandoned = True
                    logger.error(f"{self._kind.lower()}_close_abandoned", worker=self._name)
                    await self._after_loops(hurry=True)
                error = None if not done or self._host.cancelled() else self._host.exception()
                if error is not None and self._failure is None:
                    logger.error(
                        f"{self._kind.lower()}_crashed",
                        worker=self._name,
                        error_type=exception_type(error),
                    )
                await self._close()
        finally:
            self._state = "closed"
            self._closed.set()
            logger.info(f"{self._kind.lower()}_stopped", worker=self._name)

    async def wait_stopped(self) -> None:
        """Wait until the loops stop: return after ``aclose()``, or raise the error that
        stopped them (a bug; the object no longer works and should be closed). A worker
        process races this against its shutdown signals."""
        if self._host is None:
            raise LifecycleError(f"the {self._kind} was never opened")
        await asyncio.wait([self._host])
        if self._failure is not None:
            raise self._failure
        if not self._stopping:
            raise LifecycleError(f"the {self._kind}'s loops stopped unexpectedly")

    async def _host_main(self, started: asyncio.Future[None]) -> None:
        # The loops run in no caller's trace: the span current where the object was opened
        # (a worker's startup, a traced lifespan) would parent every run a schedule
        # starts, for the life of the process. (This task's context is its own copy.)
        otel_context.attach(otel_context.Context())
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._start_loops(tg)
                started.set_result(None)
                await self._stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        except BaseException as exc:
            if not started.done():
                started.set_exception(
                    exc if isinstance(exc, Exception) else LifecycleError("startup cancelled")
                )
                return
            if not self._stopping:
                self._died(exc)
            raise
        else:
            if not self._stopping:  # every loop ended, and nobody asked them to
                failure = LifecycleError(f"the {self._kind}'s loops stopped unexpectedly")
                self._died(failure)
                raise failure
        finally:
            with anyio.CancelScope(shield=True):
                await self._after_loops()

    def _died(self, exc: BaseException) -> None:
        """The loops stopped without aclose(): report it everywhere it can be seen."""
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        self._failure = exc
        if self._state == "open":
            self._state = "failed"
        logger.error(
            f"{self._kind.lower()}_crashed", worker=self._name, error_type=exception_type(exc)
        )
        self._closing(f"the {self._kind} stopped: {exception_type(exc)}")

    async def _supervised(
        self, name: str, loop: Loop, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one loop; its end, unless asked for, is an error.

        Without this, a loop ended by a stray CancelledError would vanish silently (anyio
        treats it as a cancelled task) and the object would look alive while it no longer
        claims, heartbeats or listens.
        """
        try:
            await loop(task_status=task_status)
        except BaseException as exc:
            if is_cancellation(exc) or not isinstance(exc, asyncio.CancelledError):
                raise
            raise LifecycleError(f"the {name} loop was stopped by a stray CancelledError") from exc
        if not self._stopping:
            raise LifecycleError(f"the {name} loop ended unexpectedly")

    def _soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn`` in the task group (short helpers, such as a trailing NOTIFY)."""
        if self._tg is not None and not self._stopping:
            self._tg.start_soon(fn, *args)


def started(loop: Callable[[], Awaitable[None]]) -> Loop:
    """A loop that is live as soon as it is started (for ``TaskGroup.start``)."""

    async def run(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await loop()

    return run
