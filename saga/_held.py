"""A lease this worker holds, and the cancel scope of the attempt under it. Other modules
read a :class:`Lease`; :mod:`saga._lease` (claims, heartbeats, release) changes it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio

from saga._model import Phase
from saga._store_graph import ItemKey

_scope_type: list[Callable[..., anyio.CancelScope]] = []


def cancel_scope() -> anyio.CancelScope:
    """A fresh cancel scope, as ``anyio.CancelScope()`` makes it, without looking up the
    running event loop's backend for each one (a sniffio call: most of a scope's cost,
    made for every attempt and lease). saga runs on asyncio only (asyncpg), so the
    backend's scope class, learnt from the first scope, is the one of every later one."""
    if _scope_type:
        return _scope_type[0]()
    scope = anyio.CancelScope()
    _scope_type.append(type(scope))
    return scope


@dataclass(slots=True, eq=False)
class Lease:
    """A lease this worker holds; the token changes when the run moves to its next item.

    Read-only outside this module: :class:`Leases` and the methods below change it.
    """

    run_id: UUID
    token: int
    seconds: float  # lease length of the item held now; heartbeats renew by this much
    cancel_requested: bool = False  # seen by a heartbeat while the step ran
    scope: anyio.CancelScope = field(default_factory=cancel_scope)
    lost: bool = False
    item: tuple[str, Phase] | None = None  # a graph run's item (step, phase)
    # saga.testing's expire_lease: heartbeats leave it, as a stalled worker's would.
    stalled: bool = False
    # When the attempt, past its timeout, counts as ignoring cancellation (saga._call).
    unresponsive_at: float = math.inf
    # The run its task drives (saga._active.ActiveRun), for the saga, step and attempt
    # of the log lines about the lease.
    active: Any = None
    # The attempt waits for its rate limit's token: its step has not started, and a
    # give-back at shutdown does not count it (saga._call.take).
    unstarted: bool = False
    # The item's outcome is being written (saga._write): that write, fenced, tells
    # whether the lease still held; a heartbeat that no longer finds it has raced it.
    writing: bool = False

    @property
    def key(self) -> UUID | ItemKey:
        """What this lease holds: a linear run, or one item of a graph run."""
        item = self.item
        return self.run_id if item is None else (self.run_id, item[0], item[1])

    @property
    def item_key(self) -> ItemKey:
        """The graph item this lease holds."""
        assert self.item is not None
        return (self.run_id, self.item[0], self.item[1])

    def moved_on(self, token: int, seconds: float) -> None:
        """The run's next item was leased to us by the transition just written."""
        self.token = token
        self.seconds = seconds
        self.stalled = False
        self.writing = False

    def attempt_scope(self, seconds: float) -> anyio.CancelScope:
        """A fresh cancel scope for one attempt: a heartbeat cancels it if the lease goes."""
        self.seconds = seconds
        self.scope = cancel_scope()
        return self.scope

    def time_limited(self, deadline: float | None) -> None:
        """The user's code under this lease has a time limit (None: no longer): past
        ``deadline`` plus the lease's length it counts as ignoring its cancellation, and
        the heartbeats give it up (saga._call.user_time_limit)."""
        self.unresponsive_at = math.inf if deadline is None else deadline + self.seconds

    def before_start(self, waiting: bool) -> None:
        """Whether the attempt under this lease still waits to start (its token)."""
        self.unstarted = waiting

    def mark_lost(self) -> None:
        """This worker no longer holds the lease (refused write, crash, cancelled step)."""
        self.lost = True

    def log_fields(self) -> dict[str, Any]:
        """The run, saga, step and attempt of the item it holds now, for log lines."""
        run = self.active
        if run is None:
            return {"run_id": str(self.run_id)}
        return {
            "run_id": str(self.run_id),
            "saga": run.saga.name,
            "step": run.wait or run.step,  # a waiting run's item is its wait's on_timeout
            "attempt": run.attempt,
        }
