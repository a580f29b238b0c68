"""Sagas of tests/test_lost_attempts.py that run in real worker processes
(``saga worker tests._crashing_wait_saga:SAGAS``).

``doomed``: a step, then a wait for ``decision`` with a 0.2 s timeout whose
``on_timeout`` function kills its worker process (as user code that runs out of memory,
or calls ``os._exit``, would), then a last step.
"""

from __future__ import annotations

import os
from datetime import timedelta

from pydantic import BaseModel

import saga


class Item(BaseModel):
    n: int = 0


class Decision(BaseModel):
    approved: bool


doomed = saga.Saga("doomed", input=Item)


@doomed.step()
async def hold(ctx: saga.Context[Item]) -> str:
    return "held"


@hold.compensate
async def release(ctx: saga.Context[Item], held: str) -> None:
    return None


async def _dies(ctx: saga.Context[Item]) -> Decision:
    os._exit(3)  # the worker process dies while computing the timeout's value


decision = doomed.wait_for("decision", Decision, timeout=timedelta(seconds=0.2), on_timeout=_dies)


@doomed.step()
async def finish(ctx: saga.Context[Item]) -> bool:
    return ctx.result(decision).approved


SAGAS = [doomed]
