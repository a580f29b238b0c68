"""What claiming a run's item does, and where an operator's retry resumes a run.

Pure decisions, like the plan's: the claim statement receives :func:`claim_table` and
applies it row by row; it decides nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saga._model import PARKED, EventKind, RunStatus

_RUNNING = RunStatus.RUNNING
_WAITING = RunStatus.WAITING
_COMPENSATING = RunStatus.COMPENSATING
_STEP_STARTED = EventKind.STEP_STARTED


@dataclass(frozen=True, slots=True)
class Claimed:
    """What claiming an item does: the status it takes, the wake-up event it records
    first (a sleep ended, a wait's signal came), and the start event (None: the item is
    not a step starting: a cancelled run rolls back, a timed-out wait applies its
    ``on_timeout``)."""

    status: RunStatus
    woke: EventKind | None
    start: EventKind | None


def on_claim(status: RunStatus, cancel_requested: bool, signalled: bool) -> Claimed:
    """What claiming an item in ``status`` does; ``signalled``: a waiting run's signal
    had arrived when the claim closed its wait."""
    if status is _COMPENSATING:
        return Claimed(status, None, EventKind.COMPENSATION_STARTED)
    if cancel_requested:  # a forward item of a run being cancelled will not start
        return Claimed(_RUNNING, None, None)
    if status is _WAITING and not signalled:
        return Claimed(_WAITING, None, None)  # timed out
    woke = EventKind.WOKE if status in PARKED else None
    return Claimed(_RUNNING, woke, _STEP_STARTED)


def claim_table() -> list[tuple[RunStatus, bool, bool, Claimed]]:
    """:func:`on_claim` for every claimable (status, cancel requested, signalled), as
    the claim statement receives it (signalled only for ``waiting``: no other status has
    a wait to close)."""
    return [
        (status, cancel, signalled, on_claim(status, cancel, signalled))
        for status in RunStatus.active()
        for cancel in (False, True)
        for signalled in ((False, True) if status is _WAITING else (False,))
    ]


def claim_table_args() -> tuple[list[str], list[bool], list[bool], list[str], list[Any], list[Any]]:
    """:func:`claim_table` as the claim statement's six column arrays."""
    table = claim_table()
    return (
        [str(before) for before, _, _, _ in table],
        [cancel for _, cancel, _, _ in table],
        [signalled for _, _, signalled, _ in table],
        [str(c.status) for _, _, _, c in table],
        [None if c.woke is None else str(c.woke) for _, _, _, c in table],
        [None if c.start is None else str(c.start) for _, _, _, c in table],
    )


#: A failed run that an operator retries resumes here: the compensation that gave up,
#: with fresh attempts.
RETRIED_STATUS = _COMPENSATING
RETRIABLE_STATUS = RunStatus.FAILED
#: A run stopped at a timed-out wait that an operator retries waits again (a fresh
#: timeout) in this status.
REWAITED_STATUS = _WAITING
REWAITABLE_STATUS = RunStatus.STOPPED
