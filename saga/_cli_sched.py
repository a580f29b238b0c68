"""The schedule commands of ``saga``: ``schedules`` (list), ``pause-schedule``,
``resume-schedule`` and ``remove-schedule``: thin layers over :func:`saga.list_schedules`,
:func:`saga.pause_schedule`, :func:`saga.resume_schedule` and
:func:`saga.remove_schedule`."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import timedelta

from saga._cli_render import _clean, _Ctx, _duration, _table, _time
from saga._cli_values import EXIT_OK
from saga._client import Client
from saga._queues import queues
from saga._schedules import list_schedules, pause_schedule, remove_schedule, resume_schedule
from saga._store_sched import ScheduleInfo


def add_schedule_parsers(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    add(
        "queues",
        "show what waits: due work per saga and priority, keyed runs, rate limits",
        "Show the work due and not taken per saga and priority (with how long the oldest "
        "has waited), the runs queued behind their concurrency key, and every rate "
        "limit's bucket (tokens left, and what an attempt taking one now would wait).",
    )
    add(
        "schedules",
        "list the schedules, with their last and next fire times",
        "List every schedule the orchestrators registered: the saga it starts, when, "
        "paused or not, the last slot that started a run and the next one, late slots "
        "skipped, and how late it is now (a schedule late by more than a few seconds has "
        "no orchestrator handling it).",
    )
    for verb, what in (("pause", "no slot starts a run until resumed"),
                       ("resume", "its slots from now on start runs again")):  # fmt: skip
        parser = add(f"{verb}-schedule", f"{verb} a schedule ({what})", f"{verb.title()} a "
                     f"schedule: {what}. It stays so across restarts and deploys.")  # fmt: skip
        parser.add_argument("name", metavar="NAME", help="the schedule's name")
    parser = add(
        "remove-schedule",
        "forget a schedule no orchestrator declares any more",
        "Forget a schedule gone from the code: it leaves `saga schedules`, and the "
        "saga.schedules.late gauge reports it 0 (the runs it started stay). One a running "
        "orchestrator still declares is registered again by it, as new.",
    )
    parser.add_argument("name", metavar="NAME", help="the schedule's name")


def _info_json(i: ScheduleInfo) -> dict[str, object]:
    return {
        "name": i.name,
        "saga": i.saga,
        "version": i.version,
        "spec": i.spec,
        "missed": i.missed,
        "catch_up": i.catch_up,
        "paused": i.paused,
        "next_fire": i.next_fire.isoformat(),
        "last_fire": i.last_fire.isoformat() if i.last_fire else None,
        "last_run": str(i.last_run) if i.last_run else None,
        "skipped": i.skipped,
        "late": i.late,
    }


async def _schedules(ctx: _Ctx, orch: Client) -> int:
    infos = await list_schedules(orch)
    if ctx.as_json:
        ctx.emit({"schedules": [_info_json(i) for i in infos]})
        return EXIT_OK
    if not infos:
        ctx.note("no schedules (an orchestrator registers them: Orchestrator(schedules=...))")
        return EXIT_OK
    rows = [
        [
            i.name,
            i.saga if i.version == 1 else f"{i.saga} v{i.version}",
            _clean(i.spec),
            "paused" if i.paused else "active",
            _time(i.last_fire) if i.last_fire else "-",
            _time(i.next_fire),
            _late(i),
            str(i.skipped),
        ]
        for i in infos
    ]
    headers = [
        "NAME", "SAGA", "SCHEDULE", "STATE", "LAST FIRE (UTC)", "NEXT FIRE (UTC)", "LATE",
        "SKIPPED",
    ]  # fmt: skip
    _table(ctx, headers, rows)
    return EXIT_OK


def _late(i: ScheduleInfo) -> str:
    return "-" if i.late < 1 else _duration(timedelta(seconds=i.late))


async def _pause(ctx: _Ctx, orch: Client) -> int:
    await pause_schedule(orch, ctx.args.name)
    return _paused(ctx, True)


async def _resume(ctx: _Ctx, orch: Client) -> int:
    await resume_schedule(orch, ctx.args.name)
    return _paused(ctx, False)


async def _remove(ctx: _Ctx, orch: Client) -> int:
    await remove_schedule(orch, ctx.args.name)
    if ctx.as_json:
        ctx.emit({"schedule": ctx.args.name, "removed": True})
    else:
        ctx.say(f"schedule {_clean(ctx.args.name)!r}: removed")
    return EXIT_OK


def _paused(ctx: _Ctx, paused: bool) -> int:
    if ctx.as_json:
        ctx.emit({"schedule": ctx.args.name, "paused": paused})
    else:
        ctx.say(f"schedule {_clean(ctx.args.name)!r}: {'paused' if paused else 'resumed'}")
    return EXIT_OK


async def _queues(ctx: _Ctx, orch: Client) -> int:
    q = await queues(orch)
    if ctx.as_json:
        ctx.emit(
            {
                "due": [asdict(d) for d in q.due],
                "waiting_for_key": [asdict(k) for k in q.waiting_for_key],
                "rate_limits": [{**asdict(r), "delay": r.delay} for r in q.rate_limits],
            }
        )
        return EXIT_OK
    if not (q.due or q.waiting_for_key or q.rate_limits):
        ctx.note("nothing waits: no run due and not taken, none queued behind a key")
        return EXIT_OK
    if q.due:
        rows = [[d.saga, str(d.priority), str(d.runs), _seconds(d.oldest_wait)] for d in q.due]
        _table(ctx, ["SAGA", "PRIORITY", "DUE", "OLDEST WAIT"], rows)
    if q.waiting_for_key:
        rows = [[k.saga, str(k.runs), str(k.keys)] for k in q.waiting_for_key]
        _table(ctx, ["SAGA", "WAITING FOR A KEY", "KEYS"], rows)
    if q.rate_limits:
        rows = [
            [r.name, f"{r.per_second:g}/s", str(r.burst), f"{r.tokens:.1f}", _seconds(r.delay)]
            for r in q.rate_limits
        ]
        _table(ctx, ["RATE LIMIT", "RATE", "BURST", "TOKENS", "DELAY NOW"], rows)
    return EXIT_OK


def _seconds(value: float) -> str:
    return "-" if value <= 0 else _duration(timedelta(seconds=value))


SCHEDULE_COMMANDS: dict[str, Callable[[_Ctx, Client], Awaitable[int]]] = {
    "queues": _queues,
    "schedules": _schedules,
    "pause-schedule": _pause,
    "resume-schedule": _resume,
    "remove-schedule": _remove,
}
