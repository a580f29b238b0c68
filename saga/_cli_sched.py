"""The schedule commands of ``saga``: ``schedules`` (list), ``pause-schedule`` and
``resume-schedule``: thin layers over :func:`saga.list_schedules`,
:func:`saga.pause_schedule` and :func:`saga.resume_schedule`."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import timedelta

from saga._cli_render import _clean, _Ctx, _duration, _table, _time
from saga._cli_values import EXIT_OK
from saga._client import Client
from saga._schedules import list_schedules, pause_schedule, resume_schedule
from saga._store_sched import ScheduleInfo


def add_schedule_parsers(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
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
    headers = ["NAME", "SAGA", "SCHEDULE", "STATE", "LAST FIRE", "NEXT FIRE", "LATE", "SKIPPED"]
    _table(ctx, headers, rows)
    return EXIT_OK


def _late(i: ScheduleInfo) -> str:
    return "-" if i.late < 1 else _duration(timedelta(seconds=i.late))


async def _pause(ctx: _Ctx, orch: Client) -> int:
    await pause_schedule(orch, ctx.args.name)
    ctx.say(f"schedule {_clean(ctx.args.name)!r}: paused")
    return EXIT_OK


async def _resume(ctx: _Ctx, orch: Client) -> int:
    await resume_schedule(orch, ctx.args.name)
    ctx.say(f"schedule {_clean(ctx.args.name)!r}: resumed")
    return EXIT_OK


SCHEDULE_COMMANDS: dict[str, Callable[[_Ctx, Client], Awaitable[int]]] = {
    "schedules": _schedules,
    "pause-schedule": _pause,
    "resume-schedule": _resume,
}
