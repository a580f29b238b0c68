"""When a scheduled saga fires: cron expressions and fixed intervals, in a time zone.

Pure arithmetic, no I/O and no clock: every method takes the instant to reason from.
Instants go in as aware datetimes and come out as aware UTC datetimes.

Cron times are wall-clock times in the schedule's zone. Daylight-saving rules:

- A wall time that does not exist (the spring-forward gap, 02:30 on the day clocks jump
  from 02:00 to 03:00) fires once, at the first instant after the gap (when the wall
  clock shows 03:00). Several matching minutes in one gap still fire once.
- A wall time that occurs twice (fall back) fires once, at its first occurrence
  (``fold=0``). The second pass of the repeated hour is skipped entirely: in New York
  ``*/15 * * * *`` fires at 01:00, 01:15, 01:30 and 01:45 EDT, then at 02:00 EST.

So fire times are strictly increasing in UTC and no wall-clock minute fires twice.

Intervals are UTC arithmetic: ``anchor + k * interval``. A 1-day interval is 86,400 s
even across a DST change; "every day at 09:00 local" is ``cron('0 9 * * *', ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from saga._checks import show
from saga._errors import DefinitionError

_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *"}
_MACROS |= {"@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}
_MACROS["@annually"] = _MACROS["@yearly"]
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
#: (name, low, high, names numbered from low) of the five fields, in order.
_Field = tuple[str, int, int, tuple[str, ...]]
_FIELDS: tuple[_Field, ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)
_LAYOUT = "5 fields: minute hour day-of-month month day-of-week"
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February: leap years
_ALLOWED = re.compile(r"[0-9A-Za-z*/, \t@-]*")
_TOKEN = re.compile(r"[0-9]+|[A-Za-z]+")
_ZONE = re.compile(r"(?!right/|posix/)[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")  # not tzdata builds
_LOCAL = frozenset({"localtime", "posixrules"})  # files of tzdata, not IANA zones
#: A cron search looks this far ahead: Feb 29 can be 8 years away (2096 -> 2104).
_HORIZON_DAYS = 9 * 366
#: latest_at_or_before looks back this far for cron schedules.
_LOOKBACK = timedelta(days=366)
_MAX_INTERVAL = timedelta(days=366)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Spec:
    """A parsed cron expression: the matching values of each field."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 is Sunday (a 7 was folded into 0)
    either_day: bool  # both day fields restricted: a day matches if EITHER does (Vixie)

    def day_matches(self, day: date) -> bool:
        """Whether ``day`` is a firing day (its month is checked by the caller)."""
        by_month_day = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self.either_day:
            return by_month_day or by_weekday
        return by_month_day and by_weekday


def _fail(expression: str, problem: str) -> DefinitionError:
    """An error naming the expression, then what is wrong with it."""
    return DefinitionError(f"cron expression {expression!r}: {problem}")


def _value(token: str, spec: _Field, expr: str) -> int:
    """A number or a name (any case) within the field's range."""
    name, low, high, names = spec
    if not _TOKEN.fullmatch(token):
        raise _fail(expr, f"{name} value {token!r} is not a number or a name")
    if token.isdigit():
        number = int(token)
        if not low <= number <= high:
            raise _fail(expr, f"{name} {number} is out of range {low}-{high}")
        return number
    upper = token.upper()
    if upper not in names:
        known = f"use {names[0]}-{names[-1]} ({', '.join(names)})" if names else "use numbers"
        raise _fail(expr, f"unknown {name} name {token!r}: {known}")
    return names.index(upper) + (1 if name == "month" else 0)


def _step(text: str, name: str, expr: str) -> int:
    """A positive whole number. One larger than its range matches the range's first
    value only, as in cron (``0 */24 * * *``: at midnight)."""
    if not text.isdigit() or int(text) == 0:
        raise _fail(expr, f"{name} step {text!r} must be a positive whole number")
    return int(text)


def _part(part: str, spec: _Field, expr: str) -> range:
    """The values of one list item: ``*``, ``a``, ``a-b``, each with an optional ``/step``."""
    name, low, high, _ = spec
    if not part:
        raise _fail(expr, f"empty item in the {name} field (check the commas)")
    base, slash, step_text = part.partition("/")
    if base == "*":
        first, last = low, high
    else:
        start, dash, stop = base.partition("-")
        if dash and not (start and stop):
            raise _fail(expr, f"{name} range {base!r} needs a start and an end, like 1-5")
        first = _value(start, spec, expr)
        last = _value(stop, spec, expr) if dash else (high if slash else first)
        if high == 7 and first > last == 0:  # FRI-SUN or 5-0: Sunday closes a range as 7
            last = 7
        if first > last:
            raise _fail(expr, f"{name} range {base} is reversed: write the smaller value first")
    step = _step(step_text, name, expr) if slash else 1
    return range(first, last + 1, step)


def _split(expression: Any) -> tuple[str, list[str]]:
    """The normalized expression and its five field texts, or a DefinitionError."""
    if not isinstance(expression, str):
        raise DefinitionError(f"a cron expression must be a str, got {show(expression)}")
    if len(expression) > 1000:
        raise DefinitionError("a cron expression must be at most 1000 characters")
    if not _ALLOWED.fullmatch(expression):
        bad = next(c for c in expression if not _ALLOWED.fullmatch(c))
        allowed = "digits, names, '*', ',', '-', '/', and spaces between fields"
        raise _fail(expression, f"character {bad!r} is not allowed: use {allowed}")
    parts = expression.split()
    if len(parts) == 1 and parts[0].startswith("@"):
        macro = parts[0].lower()
        if macro not in _MACROS:
            raise _fail(expression, f"unknown macro: use one of {', '.join(_MACROS)}")
        return macro, _MACROS[macro].split()
    if not parts:
        raise DefinitionError(f"a cron expression is empty: give {_LAYOUT}, or a macro")
    if len(parts) == 6:
        why = "but only minute resolution is supported: drop the seconds field"
        raise _fail(expression, f"6 fields, {why} and give {_LAYOUT}")
    if "@" in expression:
        raise _fail(expression, "a macro such as '@daily' must stand alone, without fields")
    if len(parts) != 5:
        raise _fail(expression, f"{len(parts)} fields, expected {_LAYOUT}")
    return " ".join(parts), parts


def _parse(expression: Any) -> tuple[str, _Spec]:
    """The normalized expression and its values; refused if no day could ever match."""
    normal, texts = _split(expression)
    sets = [
        set().union(*(_part(part, spec, normal) for part in text.split(",")))
        for text, spec in zip(texts, _FIELDS, strict=True)
    ]
    minutes, hours, days, months, weekdays = sets
    either_day = texts[2] != "*" and texts[4] != "*"
    weekdays = {day % 7 for day in weekdays}
    ordered = tuple(sorted(minutes)), tuple(sorted(hours))
    spec = _Spec(*ordered, frozenset(days), frozenset(months), frozenset(weekdays), either_day)
    if texts[4] == "*" and not any(_MONTH_DAYS[m - 1] >= min(days) for m in months):
        short = "February has at most 29 days; April, June, September and November 30"
        raise _fail(normal, f"can never fire: no month it names has a day {min(days)} ({short})")
    return normal, spec


def _zone(timezone: Any) -> ZoneInfo:
    """The IANA zone named; never a path (``../etc``), never a directory (``America``)."""
    if not isinstance(timezone, str) or not timezone:
        raise DefinitionError(f"timezone must be a non-empty IANA name, got {show(timezone)}")
    try:
        if len(timezone) > 255 or not _ZONE.fullmatch(timezone) or timezone in _LOCAL:
            raise ValueError(timezone)  # (a machine's own zone differs between machines)
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise DefinitionError(
            f"unknown time zone {timezone!r}: use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None


def _aware(name: str, moment: Any, *, bounded: bool = True) -> datetime:
    """``moment`` in UTC; a ValueError for anything but an aware datetime.

    Searches reach up to 9 years ahead and a year back, so a moment to search from must
    lie within the years 2-9980 (``end`` arguments may be anything up to datetime.max).
    """
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ValueError(
            f"{name} must be an aware datetime (with a tzinfo, e.g. datetime.now(UTC)), "
            f"got {show(moment)}"
        )
    if bounded and not 2 <= moment.year <= 9980:
        raise ValueError(f"{name} must be within the years 2-9980, got {moment.isoformat()}")
    return moment.astimezone(UTC)


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant a wall time fires at: its first occurrence, or the end of a gap."""
    first = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: the first occurrence
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # A gap: the instant the clock jumps past ``wall`` lies between the two readings.
    low = int(wall.replace(tzinfo=zone, fold=1).timestamp())
    high = int(first.timestamp())
    low, high = min(low, high), max(low, high)
    while low < high:  # the first second whose wall clock is past ``wall``
        middle = (low + high) // 2
        shown = datetime.fromtimestamp(middle, zone).replace(tzinfo=None)
        low, high = (low, middle) if shown > wall else (middle + 1, high)
    return datetime.fromtimestamp(low, UTC)


def _minutes_of(spec: _Spec, day: date, bound: datetime | None, ahead: bool) -> Iterator[datetime]:
    """The firing wall minutes of ``day`` in order, from ``bound``'s minute on (inclusive)."""
    for hour in spec.hours if ahead else reversed(spec.hours):
        if bound is not None and (hour < bound.hour if ahead else hour > bound.hour):
            continue
        edge = bound.minute if bound is not None and hour == bound.hour else None
        for minute in spec.minutes if ahead else reversed(spec.minutes):
            if edge is not None and (minute < edge if ahead else minute > edge):
                continue
            yield datetime.combine(day, time(hour, minute))


def _walls(spec: _Spec, start: datetime, ahead: bool, days: int) -> Iterator[datetime]:
    """Firing wall times from ``start`` on (inclusive), forward or backward, within ``days``.

    Whole months that cannot fire are skipped in one step, so a yearly expression costs
    a dozen iterations, not half a million minutes.
    """
    one = timedelta(days=1 if ahead else -1)
    day, stop = start.date(), start.date() + one * days
    bound: datetime | None = start
    while day <= stop if ahead else day >= stop:
        if day.month not in spec.months:
            first = day.replace(day=1)
            day = (first + timedelta(days=32)).replace(day=1) if ahead else first - timedelta(1)
            bound = None
            continue
        if spec.day_matches(day):
            yield from _minutes_of(spec, day, bound, ahead)
        day, bound = day + one, None


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """When a scheduled saga fires: a cron expression or a fixed interval, in a time zone.

    Build one with :meth:`cron` or :meth:`every`; both check everything at once and
    raise :class:`saga.DefinitionError` naming what is wrong. Schedules are immutable,
    hashable and equal when their definitions are (``@daily`` and ``0 0 * * *`` differ).
    """

    expression: str | None = None
    interval: timedelta | None = None
    timezone: str = "UTC"
    anchor: datetime | None = None
    _spec: _Spec | None = field(default=None, init=False, repr=False, compare=False)
    _zone: ZoneInfo = field(default=ZoneInfo("UTC"), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Checks the definition and normalizes it, whichever way it was built."""
        object.__setattr__(self, "_zone", _zone(self.timezone))
        if (self.expression is None) == (self.interval is None):
            raise DefinitionError("a schedule needs either a cron expression or an interval")
        if self.expression is not None:
            if self.anchor is not None:
                raise DefinitionError("anchor applies to interval schedules, not to cron")
            normal, spec = _parse(self.expression)
            object.__setattr__(self, "expression", normal)
            object.__setattr__(self, "_spec", spec)
            return
        _check_interval(self.interval)
        anchor = self.anchor
        if anchor is None:
            anchor = datetime(1970 if self.timezone == "UTC" else 2000, 1, 1, tzinfo=self._zone)
        elif not isinstance(anchor, datetime) or anchor.utcoffset() is None:
            raise DefinitionError(f"anchor must be an aware datetime, got {show(anchor)}")
        elif anchor.microsecond:
            raise DefinitionError(f"anchor must be a whole second, got {anchor.isoformat()}")
        elif not 2 <= anchor.year <= 9980:  # (its UTC form and its slots stay in range)
            raise DefinitionError(f"anchor must be within the years 2-9980, got {anchor}")
        object.__setattr__(self, "anchor", anchor.astimezone(UTC))

    @classmethod
    def cron(cls, expression: str, *, timezone: str = "UTC") -> Schedule:
        """A cron schedule: 5 fields (or an ``@`` macro), wall-clock times in ``timezone``.

        Fields ``minute hour day-of-month month day-of-week`` take ``*``, lists, ranges,
        steps (``*/15``, ``10-40/10``, ``5/15`` = ``5-59/15``), names (``JAN``-``DEC``,
        ``SUN``-``SAT``, any case) and 0 or 7 for Sunday (``FRI-SUN`` is Friday to
        Sunday). When both day fields are
        restricted (neither is exactly ``*``) a day matches if either does (Vixie cron).
        An expression that can never fire (``0 0 30 2 *``) is refused.
        """
        return cls(expression=expression, timezone=timezone)

    @classmethod
    def every(
        cls, interval: timedelta, *, timezone: str = "UTC", anchor: datetime | None = None
    ) -> Schedule:
        """Fires at ``anchor + k * interval`` for every integer k, computed in UTC.

        ``interval`` is whole seconds, from 1 s to 366 days. Without an anchor the slots
        are aligned to the UNIX epoch (UTC) or to midnight 2000-01-01 in ``timezone``, so
        they do not depend on when a process started.
        """
        return cls(interval=interval, timezone=timezone, anchor=anchor)

    def next_after(self, moment: datetime) -> datetime:
        """The first fire time strictly after ``moment``, in UTC."""
        utc = _aware("moment", moment)
        if self._spec is None:
            return self._slot(utc, 1)
        local = utc.astimezone(self._zone)
        for wall in _walls(self._spec, local.replace(tzinfo=None), True, _HORIZON_DAYS):
            fire = _instant(wall, self._zone)
            if fire > utc:
                return fire
        raise ValueError(f"{self.describe()} has no fire time after {moment.isoformat()}")

    def fires_between(self, start: datetime, end: datetime, *, limit: int) -> list[datetime]:
        """The earliest ``limit`` fire times in ``(start, end]``, in increasing order."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {show(limit)}")
        moment, last = _aware("start", start), _aware("end", end, bounded=False)
        fires: list[datetime] = []
        while len(fires) < limit:
            moment = self.next_after(moment)
            if moment > last:
                break
            fires.append(moment)
        return fires

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last fire time ``<= moment`` in UTC; for cron, None if not within 366 days."""
        utc = _aware("moment", moment)
        if self._spec is None:
            return self._slot(utc, 0)
        local = utc.astimezone(self._zone)
        # In the second pass of a repeated hour, the whole first pass has already fired:
        # start from the wall time one fold later (the shift is zero outside a fold).
        start = local.replace(tzinfo=None) + (utc - local.replace(fold=0).astimezone(UTC))
        for wall in _walls(self._spec, start, False, _LOOKBACK.days + 2):
            fire = _instant(wall, self._zone)
            if fire <= utc:
                return fire if fire >= utc - _LOOKBACK else None
        return None

    def describe(self) -> str:
        """One line for people: ``cron '0 9 * * MON-FRI' in Europe/Paris``, ``every 15 min``."""
        if self._spec is not None:
            return f"cron {self.expression!r} in {self.timezone}"
        assert self.interval is not None
        assert self.anchor is not None
        text = f"every {_duration(self.interval)}"
        if self.anchor != _EPOCH:
            text += f" from {self.anchor.isoformat()}"
        return text

    def _slot(self, utc: datetime, ahead: int) -> datetime:
        """The slot at or before ``utc`` (ahead=0), or the one after it (ahead=1)."""
        assert self.interval is not None
        assert self.anchor is not None
        steps = (utc - self.anchor) // self.interval + ahead
        return self.anchor + steps * self.interval


def _check_interval(interval: Any) -> None:
    """Whole seconds from 1 s to 366 days, or a DefinitionError saying which is wrong."""
    if not isinstance(interval, timedelta):
        raise DefinitionError(f"interval must be a datetime.timedelta, got {show(interval)}")
    if interval.microseconds:
        raise DefinitionError(f"interval must be whole seconds, got {interval}")
    if not timedelta(seconds=1) <= interval <= _MAX_INTERVAL:
        raise DefinitionError(f"interval must be from 1 second to 366 days, got {interval}")


def _duration(interval: timedelta) -> str:
    """``1 day 2 h 30 min``: the nonzero units of a whole-second interval."""
    rest = int(interval.total_seconds())
    parts = []
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            plural = "s" if unit == "day" and count > 1 else ""
            parts.append(f"{count} {unit}{plural}")
    return " ".join(parts)
