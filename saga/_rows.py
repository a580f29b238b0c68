"""Rows to and from the store's statements: a change's history events as the JSON the
writing statements take, a JSON column's value, a claimed row as a ``ClaimedItem``, and
a run's row as a ``RunInfo``, a history row as a ``HistoryEvent``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from saga._errors import ErrorInfo
from saga._model import HistoryEvent, Phase, RunInfo, RunStatus
from saga._transition import ClaimedItem, Event


def events_json(worker: str, events: Sequence[Event]) -> str:
    """A change's history events as the writing statements take them (a JSON array; the
    store adds the worker, the database the time). Written out by hand: it runs for every
    step, and json.dumps of a list of dicts costs four times as much."""
    who = _quote(worker)
    return (
        "["
        + ",".join(
            f'{{"kind":"{e.kind}","step":{"null" if e.step is None else _quote(e.step)},'
            f'"attempt":{"null" if e.attempt is None else int(e.attempt)},"worker":{who},'
            f'"data":{"null" if e.data is None else json.dumps(e.data, separators=_TIGHT)},'
            f'"unless_cancelled":{"true" if e.unless_cancelled else "false"}}}'
            for e in events
        )
        + "]"
    )


_quote = json.encoder.encode_basestring_ascii  # a JSON string, as json.dumps writes it
_TIGHT = (",", ":")


def json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(dict(value), separators=(",", ":"))


def claimed_item(r: Any) -> ClaimedItem:
    """A claimed row (a linear run's, or a graph item's: it has a ``phase``)."""
    phase = r.get("phase")
    return ClaimedItem(
        run_id=r["id"],
        saga_name=r["saga_name"],
        saga_version=r["saga_version"],
        status=RunStatus(r["status"]),
        step_name=r["step_name"],
        attempt=r["attempt"],
        lease_token=r["lease_token"],
        input=r["input"],
        results=json.loads(r["results"]),
        completed_steps=tuple(r["completed_steps"]),
        cancel_requested=r["cancel_requested"],
        has_error=r["has_error"],
        trace_context=r["trace_context"],
        age=r["age"],
        expired_owner=r["prev_owner"],
        released=bool(r.get("released")),
        timed_out_wait=r.get("timed_out_wait"),
        phase=None if phase is None else Phase(phase),
        dropping=bool(r.get("dropping")),
        child=r["child"],
        keyed=bool(r.get("keyed")),
    )


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def run_info(r: asyncpg.Record) -> RunInfo:
    """A RunInfo from a row of get_run or list_runs."""
    return RunInfo(
        id=r["id"],
        saga=r["saga_name"],
        version=r["saga_version"],
        key=r["idempotency_key"],
        status=RunStatus(r["status"]),
        step=r["step_name"],
        attempt=r["attempt"],
        completed_steps=tuple(r["completed_steps"]),
        error=ErrorInfo.from_json(loads(r["error"])),
        compensation_error=ErrorInfo.from_json(loads(r["compensation_error"])),
        cancel_requested=r["cancel_requested"],
        worker=r["lease_owner"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        finished_at=r["finished_at"],
        wait=r["wait_name"],
        due_at=due_time(r["due_at"]),
        resolved=r["resolved"],
        priority=r["priority"],
        concurrency_key=r["concurrency_key"],
        waiting_for_key=r["key_state"] == "queued",
    )


def due_time(value: datetime | None) -> datetime | None:
    """A due time; 'infinity' (a wait without timeout) reads as None. asyncpg decodes
    it as a naive ``datetime.max``, even for a timestamptz."""
    return None if value is None or value.replace(tzinfo=None) == datetime.max else value


def history_event(r: asyncpg.Record) -> HistoryEvent:
    """A history event from a row of get_events (or write_events)."""
    return HistoryEvent(
        seq=r["id"],
        at=r["at"],
        kind=r["kind"],
        step=r["step"],
        attempt=r["attempt"],
        worker=r["worker"],
        data=loads(r["data"]) or {},
    )
