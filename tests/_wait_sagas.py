"""Sagas that wait, at module level so that a command can name them as its target:
``saga signal ... --target tests._wait_sagas:SAGAS`` (tests/test_cli_signal.py).

- ``approval``: ``reserve`` (compensated) -> wait ``decision`` (48 h, then stopped for an
  operator) -> ``finish`` (returns who approved; a rejection fails it for good).
- ``open_ended``: the same with a wait without timeout.
- ``napping``: ``doze`` -> a one-day sleep -> ``wake_up``.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

import saga
from tests._sagas import FAST, Job


class Decision(BaseModel):
    """The payload of the ``decision`` signal."""

    approved: bool
    by: str = "manager"


def _approval(name: str, timeout: timedelta | None) -> saga.Saga[Job]:
    s = saga.Saga(name, input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    @reserve.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        return None

    decision = s.wait_for(
        "decision", Decision, timeout=timeout, on_timeout="stop" if timeout else "compensate"
    )

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        got = ctx.result(decision)
        if not got.approved:
            raise saga.PermanentError(f"rejected by {got.by}")
        return got.by

    return s


approval = _approval("approval", timedelta(hours=48))
open_ended = _approval("open_ended", None)

napping = saga.Saga("napping", input=Job)


@napping.step(retry=FAST)
async def doze(ctx: saga.Context[Job]) -> int:
    return ctx.input.n


napping.sleep(timedelta(days=1))


@napping.step(retry=FAST)
async def wake_up(ctx: saga.Context[Job]) -> int:
    return ctx.result(doze) + 1


SAGAS = [approval, open_ended, napping]


def _trip() -> saga.Saga[Job]:
    """hotel -> car (fails for good when ``n`` is 1); hotel's compensation gives up at
    once while ``n`` is 1: the run ends failed at it (``saga skip-compensation``)."""
    s = saga.Saga("trip", input=Job)

    @s.step(retry=FAST)
    async def hotel(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    @hotel.compensate(retry=saga.Retry(max_attempts=1))
    async def cancel_hotel(ctx: saga.Context[Job], n: int) -> None:
        if n == 1:
            raise saga.PermanentError("hotel desk closed")

    @s.step(retry=FAST)
    async def car(ctx: saga.Context[Job]) -> int:
        if ctx.input.n == 1:
            raise saga.PermanentError("no cars")
        return 0

    return s


trip = _trip()
