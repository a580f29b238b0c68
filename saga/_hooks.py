"""Fault-injection points of the runtime, with a no-op default.

The runtime always calls these (no ``if hooks is not None`` on the per-step path); in
production they are the no-ops below. ``saga.testing.Faults`` overrides them to crash a
worker after a step's side effect, expire a lease under a running step, fail a
compensation or break the connection while a checkpoint commits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, TypeVar
from uuid import UUID

from saga._context import Context

T = TypeVar("T")


class SimulatedCrash(BaseException):
    """Raised by saga.testing hooks: the worker 'dies' here, writing nothing more.

    A BaseException so that user code's ``except Exception`` cannot swallow it.
    """


class FaultTarget(Protocol):
    """What a fault may act on: the database's lease of a run, and the claim loop."""

    async def expire_lease(self, run_id: UUID, step: str) -> tuple[str | None, int] | None: ...

    async def taken_over(self, run_id: UUID, expired: tuple[str | None, int]) -> bool: ...

    def wake(self) -> None: ...


class _Done:
    """An awaitable that is already done: the no-op hooks cost no coroutine per step."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_DONE = _Done()


class Hooks:
    """The injection points, each a no-op here. Overrides may be ``async def``."""

    def before_call(self, ctx: Context[Any], target: FaultTarget) -> Awaitable[None]:
        """Before the step or compensation function; may raise to fail the attempt."""
        return _DONE

    def before_checkpoint(self, ctx: Context[Any]) -> Awaitable[None]:
        """After the function returned, before its outcome is written."""
        return _DONE

    def write(self, ctx: Context[Any], write: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """Around the write of the attempt's outcome (here: the write itself)."""
        return write()


NO_HOOKS = Hooks()
