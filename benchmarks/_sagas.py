"""The sagas the benchmarks run: steps of ``async def s(ctx) -> int: return 1`` (three,
two around a wait, or five in a fan-out with a join), built by one function in every
process (the client and the worker processes build the same definition, so its
fingerprint matches)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from pydantic import BaseModel

import saga

Kind = Literal["noop", "compensate", "gate", "noop2", "wait", "fanout"]
KINDS: tuple[Kind, ...] = ("noop", "compensate", "gate", "noop2", "wait", "fanout")
# Work items per run: steps, plus compensations on the compensation path (the queue's
# chains have 3 jobs; a wait is no work item).
ITEMS: dict[str, int] = {
    "noop": 3,
    "compensate": 5,
    "gate": 3,
    "noop2": 2,
    "wait": 2,
    "fanout": 5,
    "queue": 3,
}

SIGNAL = "decision"  # the wait of ``bench_wait``, and the signal that ends it
WAIT_TIMEOUT = 3600.0  # seconds: never reached in a measurement


class Input(BaseModel):
    i: int


class Decision(BaseModel):
    """The payload of the ``decision`` signal."""

    approved: bool


def build(kind: Kind, gate: Callable[[], Awaitable[None]] | None = None) -> saga.Saga[Input]:
    """``bench_<kind>``: steps s1, s2, s3 (``noop2`` and ``wait``: s1, s2).

    - ``noop``: every step returns 1; ``noop2`` likewise, two steps.
    - ``wait``: s1, then ``wait_for("decision", Decision, timeout=1 h)``, then s2.
    - ``compensate``: s3 raises ``saga.PermanentError``; s1 and s2 have (no-op)
      compensations, so a run ends ``compensated`` after 5 work items.
    - ``gate``: s1 first awaits ``gate()`` (the memory benchmark holds runs in flight).
    - ``fanout``: s1, then s2, s3 and s4 in parallel (``after=[s1]``), then s5 after
      all three: a graph saga of 5 steps.
    """
    definition = saga.Saga(f"bench_{kind}", input=Input)

    async def first(ctx: saga.Context[Input]) -> int:
        if gate is not None:
            await gate()
        return 1

    async def then(ctx: saga.Context[Input]) -> int:
        return 1

    async def fail(ctx: saga.Context[Input]) -> int:
        raise saga.PermanentError("benchmark: the third step fails for good")

    async def undo(ctx: saga.Context[Input], result: int) -> None:
        return None

    s1 = definition.step(name="s1")(first)
    if kind == "fanout":
        branches = [definition.step(name=f"s{i}", after=[s1])(then) for i in (2, 3, 4)]
        definition.step(name="s5", after=branches)(then)
        return definition
    if kind == "wait":
        definition.wait_for(SIGNAL, Decision, timeout=WAIT_TIMEOUT)
    s2 = definition.step(name="s2")(then)
    if kind in ("noop2", "wait"):
        return definition
    definition.step(name="s3")(fail if kind == "compensate" else then)
    if kind == "compensate":
        s1.compensate(undo)
        s2.compensate(undo)
    return definition
