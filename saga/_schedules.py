"""Sagas started on a schedule: the declaration, its missed-slot policy, and the operator
functions (list, pause, resume).

A :class:`Scheduled` names a saga, a :class:`~saga.Schedule` (cron or interval, in a time
zone) and the input of each run. Orchestrators given it (``schedules=[...]``) start one
run per slot: see ``saga/_scheduler.py``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

from pydantic import BaseModel

from saga import _checks
from saga._checks import show, validate_name
from saga._client import store_of
from saga._cron import Schedule
from saga._definition import Saga
from saga._errors import ConfigurationError, DefinitionError
from saga._store_sched import ScheduleInfo

if TYPE_CHECKING:
    from saga._client import Client

InT = TypeVar("InT", bound=BaseModel)

#: What happens to slots missed while no orchestrator ran: ``skip`` them, run only the
#: ``latest`` one, or run ``all`` of them (at most ``catch_up``, the most recent).
Missed = Literal["skip", "latest", "all"]
_MISSED = ("skip", "latest", "all")
#: The most slots looked at when catching up (older ones count as skipped).
MAX_CATCH_UP = 1000
#: How far back missed slots are looked for.
LOOKBACK = timedelta(days=31)


@dataclass(frozen=True, eq=False)
class Scheduled(Generic[InT]):
    """Start ``saga`` at every slot of ``schedule`` with ``input`` (a model, or a function
    of the slot's time returning one). ``name`` identifies the schedule in the database
    (pausing, listing) and in each run's idempotency key ``schedule:<name>:<slot>``.

    A slot handled within ``grace`` (at least ``HANDLING``: the scheduler's own delay) of
    its time is on time and always runs. Slots later
    than that (no orchestrator was up) follow ``missed``: ``"skip"`` runs none of them,
    ``"latest"`` the most recent one, ``"all"`` each of them, oldest first, at most the
    ``catch_up`` most recent ones.
    """

    name: str
    saga: Saga[InT]
    schedule: Schedule
    # A model, or a function (sync or async) of the slot's time returning the input (or
    # a mapping validated as it).
    input: (
        InT
        | Callable[[datetime], InT | Mapping[str, Any]]
        | Callable[[datetime], Awaitable[InT | Mapping[str, Any]]]
    )
    missed: Missed = "skip"
    catch_up: int = 10
    grace: timedelta = timedelta(minutes=1)

    def __post_init__(self) -> None:
        validate_name(self.name, "schedule")
        where = f"schedule {self.name!r}"
        if not isinstance(self.saga, Saga):
            raise DefinitionError(f"{where}: saga must be a saga.Saga, got {show(self.saga)}")
        if not isinstance(self.schedule, Schedule):
            raise DefinitionError(
                f"{where}: schedule must be a saga.Schedule (Schedule.cron(...) or "
                f"Schedule.every(...)), got {_checks.show(self.schedule)}"
            )
        if isinstance(self.input, type):  # a model class is callable, never with a slot
            raise DefinitionError(
                f"{where}: input is the class {self.input.__name__}: give an instance "
                f"({self.input.__name__}(...)) or a function of the slot's time returning one"
            )
        if not (callable(self.input) or isinstance(self.input, self.saga.input_type)):
            raise DefinitionError(
                f"{where}: input must be a {self.saga.input_type.__name__} or a function "
                f"of the slot's time returning one, got {_checks.show(self.input)}"
            )
        if not isinstance(self.input, BaseModel):  # called with the slot's time only
            _checks.takes(self.input, 1, f"{where}: input", expected="(slot)")
        if self.missed not in _MISSED:
            raise DefinitionError(
                f"{where}: missed must be one of {', '.join(_MISSED)}, got {show(self.missed)}"
            )
        _checks.integer(
            f"{where}: catch_up", self.catch_up, DefinitionError, minimum=1, maximum=MAX_CATCH_UP
        )
        if not isinstance(self.grace, timedelta) or not (
            timedelta(0) <= self.grace <= timedelta(days=1)
        ):
            raise DefinitionError(
                f"{where}: grace must be a timedelta from 0 to 1 day, got {show(self.grace)}"
            )

    def input_for(self, slot: datetime) -> Any:
        """The input of the run of ``slot``."""
        if isinstance(self.input, BaseModel):
            return self.input
        return self.input(slot)

    @property
    def on_time(self) -> timedelta:
        """How late a slot may be handled and still run: ``grace``, but never less than
        the scheduler's own delay (a slot is handled a little after its time)."""
        return max(self.grace, HANDLING)

    def slots(self, since: datetime, now: datetime) -> tuple[list[datetime], int]:
        """The slots after ``since`` up to ``now`` that start a run, oldest first, and
        how many late ones the missed policy skipped (counted over the last
        ``LOOKBACK`` at most).

        However long nothing ran, the slots within ``grace`` of ``now`` are found from
        the grace window itself, and the late ones are counted (by arithmetic for an
        interval), never listed, but for the few the policy runs, found backwards from
        ``now`` however long ago ``since`` is (a cron schedule's within 366 days)."""
        start = max(since, now - LOOKBACK)
        cut = now - self.on_time  # a slot at or after ``cut`` is on time
        on_time = self.schedule.fires_between(max(start, cut - _TICK), now, limit=_ON_TIME)
        if self.missed == "all":
            keep = self.catch_up
        else:
            keep = 1 if self.missed == "latest" and not on_time else 0
        count, _ = _late(self.schedule, start, cut - _TICK, 0)
        newest = _newest(self.schedule, since, cut - _TICK, keep)
        return newest + on_time, count - sum(1 for slot in newest if slot > start)


#: A slot handled this soon after its time is on time, whatever its ``grace`` (0
#: included): an orchestrator that is up handles it a little late, never much later.
HANDLING = timedelta(seconds=2)
#: datetime's resolution: ``(t - _TICK, ...]`` is ``[t, ...]``.
_TICK = timedelta(microseconds=1)
#: More than the slots in a grace of at most 1 day (an interval is at least 1 s).
_ON_TIME = 200_000


def _newest(schedule: Schedule, since: datetime, end: datetime, keep: int) -> list[datetime]:
    """The newest ``keep`` slots in ``(since, end]``, oldest first, found backwards from
    ``end``: as many steps as slots kept, however long ago ``since`` is."""
    found: list[datetime] = []
    moment = end
    while len(found) < keep:
        slot = schedule.latest_at_or_before(moment)
        if slot is None or slot <= since:
            break
        found.append(slot)
        moment = slot - _TICK
    return found[::-1]


def _late(
    schedule: Schedule, start: datetime, end: datetime, keep: int
) -> tuple[int, list[datetime]]:
    """How many slots are in ``(start, end]``, and the newest ``keep`` of them, oldest
    first. An interval's are counted by arithmetic; a cron schedule's (at most one a
    minute, in the ``LOOKBACK`` window: about 45,000) are walked."""
    if end <= start:
        return 0, []
    if schedule.interval is None:
        every = schedule.fires_between(start, end, limit=_ON_TIME)
        return len(every), every[max(0, len(every) - keep) :] if keep else []
    assert schedule.anchor is not None
    first = (start - schedule.anchor) // schedule.interval + 1  # the first slot > start
    last = (end - schedule.anchor) // schedule.interval  # the last slot <= end
    count = max(0, last - first + 1)
    newest = range(max(first, last - keep + 1), last + 1)
    return count, [schedule.anchor + i * schedule.interval for i in newest]


def as_stored(s: Scheduled[Any], spec: str, missed: str, catch_up: int) -> Scheduled[Any]:
    """``s`` with the schedule and missed policy its row holds: those of the orchestrator
    that registered it last (a deploy's newest definition), so that every orchestrator
    holding the schedule handles its slots alike, old ones in a rolling deploy too.
    ``s`` itself when they are the same, or when the row's spec is not understood."""
    if spec == s.schedule.describe() and (missed, catch_up) == (s.missed, s.catch_up):
        return s
    schedule = described(spec)
    if schedule is None or missed not in _MISSED:
        return s
    return replace(s, schedule=schedule, missed=cast(Missed, missed), catch_up=catch_up)


_CRON_SPEC = re.compile(r"cron ('[^']*'|\"[^\"]*\") in (\S+)")
_EVERY_SPEC = re.compile(r"every ((?:\d+ (?:days?|h|min|s) ?)+?)(?: from (\S+))?")
_UNITS = {"day": 86400, "days": 86400, "h": 3600, "min": 60, "s": 1}


def described(spec: str) -> Schedule | None:
    """The schedule whose :meth:`Schedule.describe` is ``spec`` (None: not one)."""
    try:
        cron = _CRON_SPEC.fullmatch(spec)
        if cron is not None:
            return Schedule.cron(ast.literal_eval(cron[1]), timezone=cron[2])
        every = _EVERY_SPEC.fullmatch(spec)
        if every is not None:
            words = every[1].split()
            pairs = zip(words[::2], words[1::2], strict=True)
            seconds = sum(int(n) * _UNITS[unit] for n, unit in pairs)
            anchor = None if every[2] is None else datetime.fromisoformat(every[2])
            return Schedule.every(timedelta(seconds=seconds), anchor=anchor)
    except (DefinitionError, ValueError, SyntaxError):
        pass
    return None


def key_of(name: str, slot: datetime) -> str:
    """The idempotency key of a slot's run: at most one run per schedule and slot."""
    return f"schedule:{name}:{slot.strftime('%Y-%m-%dT%H:%M:%SZ')}"


async def list_schedules(client: Client) -> list[ScheduleInfo]:
    """Every schedule the orchestrators registered, by name: what it starts, when it
    fires next and fired last (with that run), paused or not, late slots skipped, and
    how late it is now (``late`` > a few seconds: no orchestrator handled its slot)."""
    return await store_of(client).list_schedules()


async def pause_schedule(client: Client, name: str) -> None:
    """Pause a schedule: no slot starts a run until it is resumed (it stays paused
    across restarts and deploys). ``ConfigurationError`` for an unknown name."""
    await _pause(client, name, True)


async def resume_schedule(client: Client, name: str) -> None:
    """Resume a paused schedule: its slots from now on start runs; those that passed
    while it was paused (or were late when it was paused) do not, and it is next due at
    its next slot. ``ConfigurationError`` for an unknown name."""
    await _pause(client, name, False)


async def remove_schedule(client: Client, name: str) -> None:
    """Forget a schedule no orchestrator declares any more (gone from the code): it
    leaves :func:`list_schedules`, and the ``saga.schedules.late`` gauge reports it 0
    (not late); the runs it started stay. One that a running orchestrator still
    declares is registered again by it (as new: next due at its next slot, not paused).
    ``ConfigurationError`` for an unknown name."""
    _checks.text("schedule name", name, ConfigurationError, max_length=128)
    if not await store_of(client).remove_schedule(name):
        raise ConfigurationError(f"no schedule named {name!r}")


async def _pause(client: Client, name: str, paused: bool) -> None:
    _checks.text("schedule name", name, ConfigurationError, max_length=128)
    store = store_of(client)
    following = None
    if not paused:
        found = await store.schedule_spec(name)
        if found is None:
            raise ConfigurationError(f"no schedule named {name!r}")
        schedule = described(found[0])
        following = None if schedule is None else schedule.next_after(found[1])
    if not await store.pause_schedule(name, paused, following):
        raise ConfigurationError(f"no schedule named {name!r}")
