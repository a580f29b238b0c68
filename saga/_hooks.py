"""Fault-injection points of the runtime, with a no-op default.

The runtime always calls these (no ``if hooks is not None`` on the per-step path); in
production they are the no-ops below. ``saga.testing.Faults`` overrides them to crash a
worker after a step's side effect, expire a lease under a running step, fail a
compensation or break the connection while a checkpoint commits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from uuid import UUID

from saga._definition import Context

T = TypeVar("T")


class SimulatedCrash(BaseException):
    """Raised by saga.testing hooks: the worker 'dies' here, writing nothing more.

    A BaseException so that user code's ``except Exception`` cannot swallow it.
    """


class FaultTarget(Protocol):
    """What a fault may act on: the database's lease of a run, and the claim loop."""

    async def expire_lease(self, run_id: UUID) -> bool: ...

    def wake(self) -> None: ...


class Hooks:
    """The injection points, each a no-op here."""

    async def before_call(self, ctx: Context[Any], target: FaultTarget) -> None:
        """Before the step or compensation function; may raise to fail the attempt."""

    async def before_checkpoint(self, ctx: Context[Any]) -> None:
        """After the function returned, before its outcome is written."""

    async def write(self, ctx: Context[Any], write: Callable[[], Awaitable[T]]) -> T:
        """Around the write of the attempt's outcome."""
        return await write()


NO_HOOKS = Hooks()
