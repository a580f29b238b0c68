"""The operator commands of ``saga`` that read runs, and ``signal`` and ``prune``: ``runs``,
``show``, ``stats``, ``signal``, ``prune`` (the actions on runs are in ``_cli_acts``).

Each is a thin layer over the Python API (:mod:`saga._operator`, :class:`~saga.RunHandle`)
on a client that :mod:`saga._cli` opened; it prints a table for people or,
with ``--json``, JSON for scripts, and returns the exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast
from uuid import UUID

from saga._cli_args import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from saga._cli_render import (
    _attempt_json,
    _clean,
    _Ctx,
    _duration,
    _error,
    _event_json,
    _info_json,
    _table,
    _time,
)
from saga._client import Client, store_of
from saga._errors import InvalidInputError, SerializationError
from saga._input import validate_as
from saga._model import EventKind, RunInfo, RunStatus
from saga._operator import (
    MAX_PAGE_SIZE,
    PRUNABLE_BY_DEFAULT,
    count_runs_by_saga,
    list_runs,
    prune,
)
from saga._timeline import StepAttempt, timeline
from saga._waits import Wait

_AT_A_WAIT = frozenset({RunStatus.SLEEPING, RunStatus.WAITING, RunStatus.STOPPED})


async def _runs(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    statuses = None if args.status is None else [s for group in args.status for s in group]
    page = await list_runs(
        orch,
        saga=args.saga,
        status=statuses,
        older_than=args.older_than,
        newer_than=args.newer_than,
        before=args.before,
        limit=args.limit,
        key=args.key,
    )
    if ctx.as_json:
        ctx.emit({"runs": [_info_json(r) for r in page.runs], "next_before": page.next_before})
        return EXIT_OK
    if not page.runs:
        ctx.note("no runs match")
        return EXIT_OK
    runs_table(ctx, page.runs)
    if page.next_before is not None:
        ctx.note(f"more: add --before {page.next_before}")
    return EXIT_OK


def runs_table(ctx: _Ctx, runs: list[RunInfo]) -> None:
    """Runs as a table, one line each (``saga runs``, ``saga attention``)."""
    rows = [
        [
            str(r.id),
            r.saga if r.version == 1 else f"{r.saga} v{r.version}",
            _status(r),
            r.step or "-",
            str(r.attempt) if r.step else "-",
            _time(r.created_at),
            _duration(r.finished_at - r.created_at) if r.finished_at else "-",
            _error(r.compensation_error or r.error),
        ]
        for r in runs
    ]
    headers = ["RUN", "SAGA", "STATUS", "STEP", "ATTEMPT", "CREATED (UTC)", "TOOK", "ERROR"]
    _table(ctx, headers, rows)


def _status(info: RunInfo) -> str:
    """The status column: with the sleep or wait a parked or stopped run is at."""
    text = str(info.status)
    if info.wait is not None and info.status in _AT_A_WAIT:
        text += f" ({info.wait})"
    text += " (resolved)" if info.resolved else ""
    return text + (" (cancel requested)" if info.cancel_requested else "")


async def _show(ctx: _Ctx, orch: Client) -> int:
    handle = orch.get_run(await named_run(ctx, orch))
    info = await handle.info()
    history = await handle.history()
    attempts = timeline(history)
    if ctx.as_json:
        ctx.emit(
            {
                "run": _info_json(info),
                "attempts": [_attempt_json(a) for a in attempts],
                "events": [_event_json(e) for e in history],
            }
        )
        return EXIT_OK
    took = f" (took {_duration(info.finished_at - info.created_at)})" if info.finished_at else ""
    graph = any(a.after is not None for a in attempts)  # show what each step waited on
    signalled = {e.step for e in history if e.kind == EventKind.SIGNAL_RECEIVED}
    marks = (" (cancel requested)", info.cancel_requested), (" (resolved)", info.resolved)
    fields = [
        ("run", str(info.id)),
        ("saga", f"{info.saga} v{info.version}"),
        ("key", info.key or "-"),
        ("status", str(info.status) + "".join(m for m, on in marks if on)),
        *(_running(attempts, info) if graph else _current(info)),
        *_parked(info, signalled),
        ("created", _time(info.created_at) + " UTC"),
        ("finished", _time(info.finished_at) + " UTC" + took if info.finished_at else "-"),
        ("error", _error(info.error, full=True)),
        ("compensation error", _error(info.compensation_error, full=True)),
    ]
    for name, value in fields:
        ctx.say(f"{name + ':':<20}{_clean(value)}")
    ctx.say()
    now = datetime.now(UTC)
    rows = [
        [
            a.step,
            "compensation" if a.compensation else "step",
            *([_after(a.after)] if graph else []),
            str(a.attempt),
            a.worker or "-",
            _time(a.started_at, precise=True) if a.started_at else "-",
            _duration(timedelta(seconds=a.duration)) if a.duration is not None else "-",
            _outcome(a, now),
            _error(a.error),
        ]
        for a in attempts
    ]
    if rows:
        headers = ["STEP", "PHASE", *(["AFTER"] if graph else []), "ATTEMPT", "WORKER"]
        _table(ctx, [*headers, "STARTED", "TOOK", "OUTCOME", "ERROR"], rows)
    else:
        ctx.say("no attempts yet")
    if ctx.args.events:
        ctx.say()
        for event in history:  # (a wait of days: each line says its day)
            ctx.say(_clean(f"{event.at.astimezone(UTC):%Y-%m-%d} {event.describe()}"))
    return EXIT_OK


def _outcome(a: StepAttempt, now: datetime) -> str:
    if a.waits_for_token(now):
        assert a.rate_limited_until is not None
        until = _time(a.rate_limited_until, precise=True)
        return f"rate limited ({a.rate_limit}, starts {until} UTC)"
    return a.outcome + (f" (retry in {a.retry_in:.2f}s)" if a.retry_in is not None else "")


def _current(info: RunInfo) -> list[tuple[str, str]]:
    """A linear run's current step and the worker holding it."""
    step = f"{info.step} (attempt {info.attempt})" if info.step else "-"
    return [("step", step), ("worker", info.worker or "-")]


def _running(attempts: list[StepAttempt], info: RunInfo) -> list[tuple[str, str]]:
    """A graph run's steps running now (several at once), and the workers holding them."""
    now = [a for a in attempts if a.outcome == "running"] if not info.status.is_terminal else []
    steps = ", ".join(f"{a.step} (attempt {a.attempt})" for a in now) or "-"
    workers = ", ".join(dict.fromkeys(a.worker or "-" for a in now)) or "-"
    return [("steps running", steps), ("worker", workers)]


def _parked(info: RunInfo, signalled: set[str | None]) -> list[tuple[str, str]]:
    """Where a run is parked (a sleep, a wait, stopped, queued for its key), and until
    when; ``signalled``: the waits whose signal was received."""
    due = f"{_time(info.due_at)} UTC" if info.due_at else "-"
    wait = info.wait or "-"
    if info.waiting_for_key:
        return [("waiting for key", f"{info.concurrency_key} (queued behind its holders)")]
    if info.status is RunStatus.SLEEPING:
        return [("sleeping", f"{wait} (wakes {due})")]
    if info.status is RunStatus.WAITING and info.wait in signalled:
        return [("waiting for", f"{wait} (signal received: wakes {due})")]
    if info.status is RunStatus.WAITING:
        until = f"times out {due}" if info.due_at else "no timeout"
        return [("waiting for", f"{wait} ({until})")]
    if info.status is RunStatus.STOPPED and info.resolved and info.concurrency_key is not None:
        why = "resolved: resolving freed its concurrency key, so it can no longer go on"
        return [("stopped at", f"{wait if info.wait else info.step or '-'}: {why}")]
    if info.status is RunStatus.STOPPED and info.wait is not None:
        hint = "saga signal resumes it, saga retry waits again, saga cancel compensates"
        return [("stopped at", f"{wait}: the wait timed out ({hint})")]
    if info.status is RunStatus.STOPPED:
        hint = "saga retry runs it again, saga cancel compensates"
        return [("stopped at", f"{info.step or '-'}: the step gave up ({hint})")]
    return []


def check_run_named(ctx: _Ctx) -> None:
    """RUN or --key, not both; --saga only with --key (usage errors, exit 2)."""
    args = ctx.args
    if args.run is None and args.key is None:
        ctx.fail(EXIT_USAGE, "name the run by its id (RUN) or by --key KEY")
    if args.run is not None and args.key is not None:
        ctx.fail(EXIT_USAGE, "name the run by its id (RUN) or by --key KEY, not both")
    if args.run is not None and args.saga is not None:
        ctx.fail(EXIT_USAGE, "--saga goes with --key; a run id names one run already")


async def named_run(ctx: _Ctx, orch: Client) -> UUID:
    """The run a command names: RUN, or the one run started with --key (in --saga)."""
    args = ctx.args
    check_run_named(ctx)
    if args.run is not None:
        return cast(UUID, args.run)
    runs = (await list_runs(orch, key=args.key, saga=args.saga, limit=MAX_PAGE_SIZE)).runs
    where = f" in saga {args.saga!r}" if args.saga is not None else ""
    if not runs:
        ctx.fail(EXIT_NOT_FOUND, f"no run with key {args.key!r}{where}")
    if len(runs) > 1:
        names = ", ".join(sorted(repr(r.saga) for r in runs))
        ctx.fail(
            EXIT_USAGE,
            f"key {args.key!r} is used by runs of {len(runs)} sagas ({names}): "
            "pick one with --saga NAME",
        )
    return runs[0].id


async def _stats(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    counts = await count_runs_by_saga(
        orch, saga=args.saga, older_than=args.older_than, newer_than=args.newer_than
    )
    total = {s: sum(by_status[s] for by_status in counts.values()) for s in RunStatus}
    if ctx.as_json:

        def row(by_status: dict[RunStatus, int]) -> dict[str, int]:
            return {**{s.value: n for s, n in by_status.items()}, "total": sum(by_status.values())}

        ctx.emit({"sagas": {name: row(c) for name, c in counts.items()}, "total": row(total)})
        return EXIT_OK
    rows = [
        [label, *(str(by_status[s]) for s in RunStatus), str(sum(by_status.values()))]
        for label, by_status in [*counts.items(), ("(total)", total)]
    ]
    _table(ctx, ["SAGA", *(s.value.upper() for s in RunStatus), "TOTAL"], rows)
    return EXIT_OK


def read_payload(ctx: _Ctx) -> None:
    """``saga signal``'s checks before any connection: how the run is named, and the
    payload (``-``: read from stdin) is JSON. ``args.payload`` becomes the JSON text."""
    check_run_named(ctx)
    if ctx.args.payload == "-" and sys.stdin is None:  # started with stdin closed (<&-)
        ctx.fail(EXIT_USAGE, "--payload -: there is no stdin to read the JSON from")
    text = sys.stdin.read() if ctx.args.payload == "-" else ctx.args.payload
    where = "on stdin" if ctx.args.payload == "-" else "in --payload"
    try:
        json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        ctx.fail(EXIT_USAGE, f"invalid JSON {where}: {exc}")
    except RecursionError:
        ctx.fail(EXIT_USAGE, f"invalid JSON {where}: nested too deeply")
    ctx.args.payload = text


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


async def _signal(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    info = await orch.get_run(await named_run(ctx, orch)).info()
    wait = _wait(ctx, orch, info)
    # The run's own definition first: a payload refused by another definition's model
    # would say nothing true about what the run waits for.
    found = await store_of(orch).run_definition(info.id, None)
    if found is not None and found.fingerprint not in (None, wait.saga.fingerprint):
        ctx.fail(
            EXIT_USAGE,
            f"run {info.id} is a run of saga {info.saga!r} v{info.version} as defined with "
            f"fingerprint {found.fingerprint}; {_clean(ctx.args.target)} defines it with "
            f"fingerprint {wait.saga.fingerprint} (another definition: its waits may "
            "differ): send the signal with the run's definition",
        )
    try:
        what = f"payload for signal {wait.name!r}"
        payload = validate_as(wait.model, args.payload, what, from_json=True)
        accepted = await orch.signal(info.id, wait, payload, by=ctx.by, note=args.note)
    except (InvalidInputError, SerializationError) as exc:  # invalid, too large, not storable
        ctx.fail(EXIT_USAGE, str(exc))
    if ctx.as_json:
        ctx.emit(
            {"run": _info_json(await orch.info(info.id)), "signal": wait.name, "accepted": accepted}
        )
    elif accepted:
        ctx.say(f"run {info.id}: signal {wait.name!r} recorded")
    else:
        ctx.say(
            f"run {info.id}: a signal {wait.name!r} was already recorded; nothing changed "
            "(the first signal of a name wins)"
        )
    return EXIT_OK


def _wait(ctx: _Ctx, orch: Client, info: RunInfo) -> Wait[Any]:
    """The wait of the run's saga for the signal named on the command line (or exit 2)."""
    definition = orch.definition(info.saga, info.version)
    if definition is None:
        ctx.fail(
            EXIT_USAGE,
            f"run {info.id} is a run of saga {info.saga!r} v{info.version}, which "
            f"{_clean(ctx.args.target)} does not define (its waits' models validate signals)",
        )
    wait = definition.get_wait(ctx.args.signal)
    if wait is None:
        known = ", ".join(repr(w.name) for w in definition.waits()) or "none"
        ctx.fail(
            EXIT_USAGE,
            f"saga {info.saga!r} has no wait for a signal named {ctx.args.signal!r} "
            f"(its signals: {known})",
        )
    return wait


async def _prune(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    extra = [RunStatus.FAILED] * args.include_failed + [RunStatus.STOPPED] * args.include_stopped
    result = await prune(
        orch,
        older_than=args.older_than,
        status=(*PRUNABLE_BY_DEFAULT, *extra),
        batch_size=args.batch_size,
        dry_run=args.dry_run,
        whole_days=args.whole_days,
    )
    if ctx.as_json:
        ctx.emit(
            {
                "runs": result.runs,
                "events": result.events,
                "batches": result.batches,
                "days": result.days,
                "keys": result.keys,
                "dry_run": result.dry_run,
            }
        )
    else:
        verb = "would delete" if result.dry_run else "deleted"
        batches = "" if result.dry_run else f" in {result.batches} batch(es)"
        if result.days:
            batches = f" in {result.days} whole day(s) and {result.batches} batch(es)"
        keys = f"; {verb} {result.keys} concurrency key(s) no run uses" if result.keys else ""
        ctx.say(
            f"{verb} {result.runs} runs and {result.events} events{batches} "
            f"(finished more than {_duration(args.older_than)} ago){keys}"
        )
    return EXIT_OK


#: The operator commands by name, for saga._cli's dispatch.
COMMANDS: dict[str, Callable[[_Ctx, Client], Awaitable[int]]] = {
    "runs": _runs,
    "show": _show,
    "stats": _stats,
    "signal": _signal,
    "prune": _prune,
}


def _after(after: tuple[str, ...] | None) -> str:
    """What a graph run's step waited on: its dependencies, ``start`` for none."""
    if after is None:
        return "-"
    return ",".join(after) or "start"
