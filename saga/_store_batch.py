"""The arguments of the transition statements: one run's, and a batch's (group commit)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any
from uuid import UUID

from saga._store_graph import _json_or_none
from saga._transition import Transition

#: One run's arguments of the ``transition`` statement (see sql/queries.sql).
TransitionArgs = tuple[Any, ...]

# Where the batch statement's per-run arrays come from in a run's arguments: all but the
# done channel (one for the batch, its last argument).
_COLUMNS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16)


def transition_args(
    worker: str,
    run_id: UUID,
    lease_token: int,
    change: Transition,
    events: str,
    due_in: float | None,
    done_channel: str,
) -> TransitionArgs:
    return (
        run_id,
        lease_token,
        change.status,  # a str (StrEnum)
        change.step,
        change.attempt,
        change.completed_step,
        change.result_json,
        change.output_json,
        _json_or_none(change.error),
        _json_or_none(change.compensation_error),
        due_in,
        worker if change.leased else None,
        events,
        done_channel,
        worker,
        change.unless_cancelled,
        change.wait,
    )


def batch_args(runs: Sequence[TransitionArgs]) -> list[Any]:
    """The ``transition_batch`` statement's arguments: one array per column, the runs in
    id order (concurrent batches then lock their rows in one order), and the channel."""
    ordered = sorted(runs, key=lambda a: a[0])
    return [[a[i] for a in ordered] for i in _COLUMNS] + [ordered[0][13]]


def write_key(args: TransitionArgs) -> Hashable:
    """What tells a batch's rows apart: the run and the lease token its write holds."""
    return (args[0], args[1])
