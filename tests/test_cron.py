"""Schedules: cron expressions and intervals, their refusals, DST rules and properties.

Pure arithmetic, no database. The properties compare ``Schedule`` with an independent
brute-force matcher that walks UTC minute by minute and reads the zone's wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga._cron import Schedule
from saga._errors import DefinitionError

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
MINUTE = timedelta(minutes=1)


def utc(year: int, month: int, day: int, *hms: int) -> datetime:
    """An aware UTC datetime: utc(2025, 1, 1, 10, 15) is 2025-01-01T10:15Z."""
    return datetime(year, month, day, tzinfo=UTC) + timedelta(
        **dict(zip(("hours", "minutes", "seconds", "microseconds"), hms, strict=False))
    )


def fires(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    return schedule.fires_between(start, start + timedelta(days=3660), limit=count)


# Known examples


def test_every_quarter_hour() -> None:
    """*/15 fires at :00, :15, :30 and :45, strictly after the given instant."""
    schedule = Schedule.cron("*/15 * * * *")
    assert fires(schedule, utc(2025, 1, 1, 10, 0), 4) == [
        utc(2025, 1, 1, 10, 15),
        utc(2025, 1, 1, 10, 30),
        utc(2025, 1, 1, 10, 45),
        utc(2025, 1, 1, 11, 0),
    ]
    assert schedule.next_after(utc(2025, 1, 1, 10, 14, 59, 999999)) == utc(2025, 1, 1, 10, 15)


def test_weekdays_in_paris_skip_the_weekend() -> None:
    """0 9 * * MON-FRI in Paris fires at 09:00 local on Friday, then Monday (08:00 UTC)."""
    schedule = Schedule.cron("0 9 * * MON-FRI", timezone="Europe/Paris")
    friday_noon = datetime(2025, 1, 10, 12, 0, tzinfo=PARIS)
    assert fires(schedule, friday_noon, 2) == [utc(2025, 1, 13, 8), utc(2025, 1, 14, 8)]
    assert schedule.latest_at_or_before(friday_noon) == utc(2025, 1, 10, 8)
    assert schedule.describe() == "cron '0 9 * * MON-FRI' in Europe/Paris"


def test_first_of_month_and_yearly() -> None:
    """0 0 1 * * fires on the 1st of each month; @yearly and @annually on January 1st."""
    monthly = Schedule.cron("0 0 1 * *")
    assert fires(monthly, utc(2025, 1, 31), 3) == [
        utc(2025, 2, 1),
        utc(2025, 3, 1),
        utc(2025, 4, 1),
    ]
    for macro in ("@yearly", "@annually", "0 0 1 JAN *"):
        assert fires(Schedule.cron(macro), utc(2025, 1, 1), 2) == [utc(2026, 1, 1), utc(2027, 1, 1)]


@pytest.mark.parametrize(
    ("macro", "expression"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@MIDNIGHT", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
    ],
)
def test_macros_mean_their_expressions(macro: str, expression: str) -> None:
    """Each macro (any case) fires exactly when its 5-field expansion does."""
    start = utc(2024, 12, 30, 5, 17)
    assert fires(Schedule.cron(macro), start, 5) == fires(Schedule.cron(expression), start, 5)


def test_february_29_fires_in_leap_years_only() -> None:
    """0 0 29 2 * fires in leap years, skipping 2100 (not a leap year), and quickly."""
    schedule = Schedule.cron("0 0 29 2 *")
    assert fires(schedule, utc(2023, 1, 1), 3) == [
        utc(2024, 2, 29),
        utc(2028, 2, 29),
        utc(2032, 2, 29),
    ]
    assert schedule.next_after(utc(2096, 3, 1)) == utc(2104, 2, 29)
    assert schedule.latest_at_or_before(utc(2025, 3, 2)) is None  # more than 366 days back
    assert schedule.latest_at_or_before(utc(2025, 3, 1)) == utc(2024, 2, 29)
    assert schedule.latest_at_or_before(utc(2024, 12, 31)) == utc(2024, 2, 29)
    began = time.perf_counter()
    for _ in range(200):
        schedule.next_after(utc(2096, 3, 1))
    assert time.perf_counter() - began < 1.0  # months are skipped, not minutes walked


def test_either_day_field_matches_when_both_are_restricted() -> None:
    """0 0 13 * FRI fires on every 13th and on every Friday (Vixie cron's OR rule)."""
    days = [f.date().isoformat() for f in fires(Schedule.cron("0 0 13 * FRI"), utc(2025, 6, 1), 6)]
    assert days == [
        "2025-06-06",
        "2025-06-13",
        "2025-06-20",
        "2025-06-27",
        "2025-07-04",
        "2025-07-11",
    ]
    # Friday the 13th fires once, and a bare '*' day field keeps the AND rule.
    assert fires(Schedule.cron("0 0 13 * FRI"), utc(2026, 2, 12), 2)[0] == utc(2026, 2, 13)
    assert fires(Schedule.cron("0 0 * * FRI"), utc(2025, 6, 1), 1) == [utc(2025, 6, 6)]
    assert fires(Schedule.cron("0 0 13 * *"), utc(2025, 6, 1), 1) == [utc(2025, 6, 13)]


def test_names_numbers_and_sunday_as_seven() -> None:
    """Names in any case equal their numbers; 0, 7 and SUN are Sunday, which closes FRI-SUN."""
    start = utc(2025, 1, 1)
    same = ["0 12 * jan-Mar mon,WED", "0 12 * 1-3 1,3"]
    assert fires(Schedule.cron(same[0]), start, 20) == fires(Schedule.cron(same[1]), start, 20)
    sundays = [fires(Schedule.cron(f"0 0 * * {d}"), start, 3) for d in ("0", "7", "sun")]
    assert sundays[0] == sundays[1] == sundays[2]
    assert all(f.isoweekday() == 7 for f in sundays[0])
    weekend = fires(Schedule.cron("0 0 * * FRI-SUN"), start, 6)
    assert fires(Schedule.cron("0 0 * * 5-7"), start, 6) == weekend
    assert sorted({f.isoweekday() for f in weekend}) == [5, 6, 7]
    assert fires(Schedule.cron("0 0 * * 5-0"), start, 6) == weekend
    assert fires(Schedule.cron("0 0 * * SUN-SUN"), start, 3) == sundays[0]


def test_ranges_with_steps_and_start_with_step() -> None:
    """10-40/10 is 10,20,30,40; 5/20 is 5-59/20; whitespace between fields is normalized."""
    hour = [f.minute for f in fires(Schedule.cron("10-40/10 * * * *"), utc(2025, 1, 1), 4)]
    assert hour == [10, 20, 30, 40]
    assert [f.minute for f in fires(Schedule.cron("5/20 * * * *"), utc(2025, 1, 1), 3)] == [
        5,
        25,
        45,
    ]
    assert Schedule.cron("  0\t9 *  * * ") == Schedule.cron("0 9 * * *")
    assert Schedule.cron(" 0  9 * * *").expression == "0 9 * * *"


# DST


@pytest.mark.parametrize(
    ("zone", "gap_day", "after_gap"),
    [
        ("Europe/Paris", (2025, 3, 30), utc(2025, 3, 30, 1)),
        ("America/New_York", (2025, 3, 9), utc(2025, 3, 9, 7)),
    ],
)
def test_a_wall_time_in_the_spring_gap_fires_once_when_the_gap_ends(
    zone: str, gap_day: tuple[int, int, int], after_gap: datetime
) -> None:
    """30 2 * * * fires at 03:00 local on the day 02:00-03:00 does not exist, once."""
    schedule = Schedule.cron("30 2 * * *", timezone=zone)
    day_before = datetime(*gap_day, tzinfo=ZoneInfo(zone)) - timedelta(hours=12)
    first, second, third = fires(schedule, day_before, 3)
    assert first == after_gap
    assert first.astimezone(ZoneInfo(zone)).strftime("%H:%M") == "03:00"
    assert second - first == timedelta(hours=23, minutes=30)
    assert third - second == timedelta(days=1)
    every_minute = Schedule.cron("* 2 * * *", timezone=zone)
    assert fires(every_minute, after_gap - MINUTE, 2)[0] == after_gap  # 60 minutes, one fire
    assert fires(every_minute, after_gap - MINUTE, 2)[1] - after_gap > timedelta(hours=20)


@pytest.mark.parametrize(
    ("zone", "expression", "first_pass"),
    [
        ("Europe/Paris", "30 2 * * *", utc(2025, 10, 26, 0, 30)),  # 02:30 CEST
        ("America/New_York", "30 1 * * *", utc(2025, 11, 2, 5, 30)),  # 01:30 EDT
    ],
)
def test_a_repeated_wall_time_fires_once_at_its_first_occurrence(
    zone: str, expression: str, first_pass: datetime
) -> None:
    """A wall time that occurs twice on fall-back day fires once, at its first pass."""
    tz = ZoneInfo(zone)
    schedule = Schedule.cron(expression, timezone=zone)
    first, second = fires(schedule, first_pass - timedelta(hours=12), 2)
    assert first == first_pass
    assert second - first == timedelta(hours=25)  # the next day, one hour of offset later
    assert first.astimezone(tz).fold == 0
    inside_second_pass = first + timedelta(hours=1, minutes=10)
    assert schedule.next_after(first) == second
    assert schedule.next_after(inside_second_pass) == second
    assert schedule.latest_at_or_before(inside_second_pass) == first


def test_the_second_pass_of_a_repeated_hour_is_skipped() -> None:
    """*/15 in Paris on fall-back day: 02:00-02:45 of the first pass, then 03:00 CET."""
    schedule = Schedule.cron("*/15 * * * *", timezone="Europe/Paris")
    got = schedule.fires_between(utc(2025, 10, 25, 23, 50), utc(2025, 10, 26, 2, 20), limit=50)
    local = [f.astimezone(PARIS).strftime("%H:%M%z") for f in got]
    assert local == [
        "02:00+0200",
        "02:15+0200",
        "02:30+0200",
        "02:45+0200",
        "03:00+0100",
        "03:15+0100",
    ]
    # From inside the second pass, the last fire is 02:45 of the first pass.
    assert schedule.latest_at_or_before(utc(2025, 10, 26, 1, 50)) == utc(2025, 10, 26, 0, 45)
    assert schedule.latest_at_or_before(utc(2025, 10, 26, 1, 10)) == utc(2025, 10, 26, 0, 45)
    assert schedule.next_after(utc(2025, 10, 26, 1, 50)) == utc(2025, 10, 26, 2, 0)


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York"])
@pytest.mark.parametrize(("start", "steps"), [(utc(2025, 3, 1), {1}), (utc(2025, 10, 15), {1, 2})])
def test_hourly_across_transitions_is_strictly_increasing(
    zone: str, start: datetime, steps: set[int]
) -> None:
    """0 * * * * across a DST change: strictly increasing UTC instants, no wall hour twice.

    Spring: 02:00 does not exist and fires at the gap's end, which is also 03:00, so the
    fires stay one hour apart. Fall: the repeated hour's second pass is skipped (2 hours).
    """
    got = fires(Schedule.cron("0 * * * *", timezone=zone), start, 24 * 40)
    assert {(b - a) // timedelta(hours=1) for a, b in pairwise(got)} == steps
    walls = [f.astimezone(ZoneInfo(zone)).replace(tzinfo=None) for f in got]
    assert len(walls) == len(set(walls))


# Intervals


def test_intervals_are_aligned_to_a_fixed_anchor() -> None:
    """every(15 min) fires on the quarter hours of UTC whenever it is asked."""
    schedule = Schedule.every(timedelta(minutes=15))
    assert schedule.next_after(utc(2025, 1, 1, 10, 7, 3)) == utc(2025, 1, 1, 10, 15)
    assert schedule.next_after(utc(2025, 1, 1, 10, 15)) == utc(2025, 1, 1, 10, 30)
    assert schedule.latest_at_or_before(utc(2025, 1, 1, 10, 15)) == utc(2025, 1, 1, 10, 15)
    assert schedule.describe() == "every 15 min"
    assert schedule.interval == timedelta(minutes=15)
    assert schedule.expression is None
    assert schedule.timezone == "UTC"


def test_interval_anchor_in_a_zone_and_explicit() -> None:
    """Without an anchor a zone aligns slots to its local midnight; a day stays 86,400 s."""
    daily = Schedule.every(timedelta(days=1), timezone="Europe/Paris")
    assert daily.next_after(utc(2025, 7, 1, 12)) == utc(2025, 7, 1, 23)  # 01:00 CEST
    assert daily.next_after(utc(2025, 3, 29, 12)) - utc(2025, 3, 28, 23) == timedelta(days=1)
    assert daily.describe() == "every 1 day from 1999-12-31T23:00:00+00:00"
    anchor = datetime(2025, 1, 1, 0, 0, 7, tzinfo=NEW_YORK)
    custom = Schedule.every(timedelta(hours=1, minutes=30), anchor=anchor)
    assert custom.next_after(anchor) == anchor + timedelta(minutes=90)
    assert custom.next_after(anchor - timedelta(seconds=1)) == anchor
    assert custom.describe() == "every 1 h 30 min from 2025-01-01T05:00:07+00:00"
    assert Schedule.every(timedelta(days=2, seconds=1)).describe() == "every 2 days 1 s"


def test_schedules_are_frozen_and_hashable() -> None:
    """Equal definitions are equal and hash alike; fields cannot be reassigned."""
    assert len({Schedule.cron("0 9 * * *"), Schedule.cron("0  9 * * *")}) == 1
    assert Schedule.cron("0 9 * * *") != Schedule.cron("0 9 * * *", timezone="Europe/Paris")
    assert hash(Schedule.every(timedelta(hours=1))) == hash(Schedule.every(timedelta(hours=1)))
    with pytest.raises(AttributeError):
        Schedule.cron("0 9 * * *").timezone = "Europe/Paris"  # type: ignore[misc]


# Refusals

CRON_REFUSALS = [
    ("* * * *", "4 fields, expected 5 fields"),
    ("* * * * * * *", "7 fields, expected 5"),
    ("0 * * * * *", "only minute resolution is supported"),
    ("", "empty"),
    ("   ", "empty"),
    ("61 * * * *", "minute 61 is out of range 0-59"),
    ("0 24 * * *", "hour 24 is out of range 0-23"),
    ("0 0 0 * *", "day-of-month 0 is out of range 1-31"),
    ("0 0 32 * *", "day-of-month 32 is out of range 1-31"),
    ("0 0 * 13 *", "month 13 is out of range 1-12"),
    ("0 0 * * 8", "day-of-week 8 is out of range 0-7"),
    ("5-1 * * * *", "minute range 5-1 is reversed"),
    ("0 0 * * SAT-MON", "day-of-week range SAT-MON is reversed"),
    ("*/0 * * * *", "minute step '0' must be a positive whole number"),
    ("*/-5 * * * *", "minute step '-5' must be a positive whole number"),
    ("0 */x * * *", "hour step 'x' must be a positive whole number"),
    ("-5 * * * *", "minute range '-5' needs a start and an end"),
    ("1- * * * *", "minute range '1-' needs a start and an end"),
    ("1,,2 * * * *", "empty item in the minute field"),
    ("1, * * * *", "empty item in the minute field"),
    ("0 0 * FOO *", "unknown month name 'FOO'"),
    ("0 0 * * FRU", "unknown day-of-week name 'FRU'"),
    ("0 0 * MON *", "unknown month name 'MON'"),
    ("MON * * * *", "unknown minute name 'MON'"),
    ("1a * * * *", "minute value '1a' is not a number or a name"),
    ("1-2-3 * * * *", "minute value '2-3' is not a number or a name"),
    ("1/2/3 * * * *", "minute step '2/3' must be a positive whole number"),
    ("0 0 30 2 *", "can never fire: no month it names has a day 30"),
    ("0 0 31 4,6,9,11 *", "can never fire"),
    ("@reboot", "unknown macro"),
    ("@daily 0", "a macro such as '@daily' must stand alone"),
    ("0 0 * * @daily", "must stand alone"),
    ("0\n0 * * *", "character '\\n' is not allowed"),
    ("0 0 * * *;", "character ';' is not allowed"),
    ("0\u00a00 * * *", "is not allowed"),
    ("0 0 ? * *", "character '?' is not allowed"),
    ("1" * 1001, "at most 1000 characters"),
]


@pytest.mark.parametrize(("expression", "message"), CRON_REFUSALS)
def test_broken_cron_expressions_are_refused_by_name(expression: str, message: str) -> None:
    """Each broken expression raises DefinitionError saying what is wrong."""
    with pytest.raises(DefinitionError) as caught:
        Schedule.cron(expression)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Schedule.cron(5), "must be a str, got 5"),  # type: ignore[arg-type]
        (lambda: Schedule.cron("* * * * *", timezone="Nowhere/Land"), "'Nowhere/Land'"),
        (lambda: Schedule.cron("* * * * *", timezone="../etc/passwd"), "'../etc/passwd'"),
        (lambda: Schedule.cron("* * * * *", timezone="/etc/localtime"), "unknown time zone"),
        # The machine's own zone (a file of tzdata, not an IANA zone): machines disagree.
        (lambda: Schedule.cron("* * * * *", timezone="localtime"), "unknown time zone"),
        (lambda: Schedule.every(timedelta(hours=1), timezone="posixrules"), "unknown time zone"),
        (lambda: Schedule.cron("* * * * *", timezone="America"), "unknown time zone 'America'"),
        (lambda: Schedule.cron("* * * * *", timezone=""), "non-empty IANA name"),
        (lambda: Schedule.cron("* * * * *", timezone=None), "got None"),  # type: ignore[arg-type]
        (lambda: Schedule.every(60), "must be a datetime.timedelta, got 60"),  # type: ignore[arg-type]
        (lambda: Schedule.every(timedelta(0)), "from 1 second to 366 days"),
        (lambda: Schedule.every(timedelta(seconds=-5)), "from 1 second to 366 days"),
        (lambda: Schedule.every(timedelta(days=367)), "from 1 second to 366 days"),
        (lambda: Schedule.every(timedelta(seconds=1.5)), "whole seconds"),
        (lambda: Schedule.every(timedelta(hours=1), timezone="Mars/Base"), "'Mars/Base'"),
        (lambda: Schedule.every(timedelta(hours=1), anchor=datetime(2025, 1, 1)), "aware"),
        (
            lambda: Schedule.every(timedelta(hours=1), anchor=utc(2025, 1, 1, 0, 0, 0, 5)),
            "whole second",
        ),
        (lambda: Schedule(), "either a cron expression or an interval"),
        (
            lambda: Schedule(expression="* * * * *", interval=timedelta(hours=1)),
            "either a cron expression or an interval",
        ),
        (
            lambda: Schedule(expression="* * * * *", anchor=utc(2025, 1, 1)),
            "anchor applies to interval",
        ),
    ],
)
def test_broken_schedules_are_refused_by_name(build: Callable[[], Any], message: str) -> None:
    """Non-str expressions, unknown zones and impossible intervals raise DefinitionError."""
    with pytest.raises(DefinitionError) as caught:
        build()
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "schedule", [Schedule.cron("0 9 * * *"), Schedule.every(timedelta(hours=1))]
)
def test_naive_or_odd_runtime_arguments_are_value_errors(schedule: Schedule) -> None:
    """Naive datetimes and a limit below 1 raise ValueError naming the argument."""
    naive = datetime(2025, 1, 1)
    with pytest.raises(ValueError, match="moment must be an aware datetime"):
        schedule.next_after(naive)
    with pytest.raises(ValueError, match="moment must be an aware datetime"):
        schedule.latest_at_or_before("2025-01-01")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="end must be an aware datetime"):
        schedule.fires_between(utc(2025, 1, 1), naive, limit=3)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        schedule.fires_between(utc(2025, 1, 1), utc(2025, 1, 2), limit=0)
    assert schedule.fires_between(utc(2025, 1, 2), utc(2025, 1, 1), limit=3) == []
    with pytest.raises(ValueError, match="within the years 2-9980"):
        schedule.next_after(datetime.max.replace(tzinfo=UTC))
    with pytest.raises(ValueError, match="within the years 2-9980"):
        schedule.latest_at_or_before(datetime.min.replace(tzinfo=UTC))
    far = datetime.max.replace(tzinfo=UTC)
    assert len(schedule.fires_between(utc(2025, 1, 1), far, limit=2)) == 2


def test_limit_bounds_the_work_of_fires_between() -> None:
    """An every-minute schedule over ten years returns the earliest `limit` fires at once."""
    got = Schedule.cron("* * * * *").fires_between(utc(2025, 1, 1), utc(2035, 1, 1), limit=3)
    assert got == [utc(2025, 1, 1, 0, 1), utc(2025, 1, 1, 0, 2), utc(2025, 1, 1, 0, 3)]


# Properties against an independent brute force

ZONES = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "America/St_Johns"]
BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


@st.composite
def field_parts(draw: st.DrawFn, low: int, high: int) -> str:
    """One list item of a field: a value, a range, either with a step, or '*' with one."""
    first = draw(st.integers(low, high))
    last = draw(st.integers(first, high))
    kind = draw(st.sampled_from(["value", "value-step", "range", "star-step", "range-step"]))
    if kind == "value":
        return str(first)
    if kind == "value-step":  # 5/20 means 5-59/20
        return f"{first}/{draw(st.integers(1, max(high - first, 1)))}"
    if kind == "range":
        return f"{first}-{last}"
    if kind == "star-step":
        return f"*/{draw(st.integers(1, high - low))}"
    return f"{first}-{last}/{draw(st.integers(1, max(last - first, 1)))}"


@st.composite
def fields(draw: st.DrawFn, index: int) -> str:
    """One field; months and weekdays are sometimes written as names, in any case."""
    low, high = BOUNDS[index]
    # Dense minutes and hours keep fires within the brute-force window most of the time.
    star = 0.5 if index >= 2 else 0.2
    if draw(st.floats(0, 1)) < star:
        return "*"
    text = ",".join(draw(st.lists(field_parts(low, high), min_size=1, max_size=3)))
    if index < 3 or draw(st.booleans()):
        return text
    names = MONTHS if index == 3 else WEEKDAYS
    case = draw(st.sampled_from([str.upper, str.lower, str.title]))
    items = [item.partition("/") for item in text.split(",")]
    named = (
        "-".join(v if v in ("*", "7") else case(names[int(v) - low]) for v in base.split("-"))
        + s
        + step
        for base, s, step in items
    )
    return ",".join(named)


@st.composite
def expressions(draw: st.DrawFn) -> str:
    expression = " ".join(draw(fields(i)) for i in range(5))
    try:
        Schedule.cron(expression)
    except DefinitionError:
        return "*/7 3-20 * * *"  # the day fields named a day no month has (31 in April)
    return expression


def number(value: str, low: int, high: int) -> int:
    """A field value as a number: names count from the field's low bound."""
    if value.isdigit():
        return int(value)
    return (MONTHS if high == 12 else WEEKDAYS).index(value.lower()) + low


def expand(text: str, low: int, high: int) -> set[int]:
    """The values of one field, written independently of saga._cron."""
    values: set[int] = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first, last = (number(x, low, high) for x in base.split("-"))
            last = 7 if high == 7 and last == 0 and first > 0 else last  # FRI-SUN
        else:
            first = number(base, low, high)
            last = high if step else first
        values.update(range(first, last + 1, int(step or 1)))
    return values


def matcher(expression: str) -> Callable[[datetime], bool]:
    """Whether a naive wall-clock minute matches ``expression`` (numeric fields only)."""
    texts = expression.split()
    minutes, hours, days, months, weekdays = (
        expand(t, *b) for t, b in zip(texts, BOUNDS, strict=True)
    )
    weekdays = {d % 7 for d in weekdays}
    either = texts[2] != "*" and texts[4] != "*"

    def matches(wall: datetime) -> bool:
        by_day, by_weekday = wall.day in days, wall.isoweekday() % 7 in weekdays
        day_ok = (by_day or by_weekday) if either else (by_day and by_weekday)
        return wall.minute in minutes and wall.hour in hours and wall.month in months and day_ok

    return matches


def brute_next(expression: str, zone: ZoneInfo, moment: datetime, minutes: int) -> datetime | None:
    """The first fire after ``moment`` within ``minutes``, walking UTC minute by minute.

    An instant fires if its wall clock matches on the first pass (fold 0), or if the wall
    clock just jumped over a matching minute (a spring gap fires when it ends).
    """
    matches = matcher(expression)
    at = moment.astimezone(UTC).replace(second=0, microsecond=0)
    before = at.astimezone(zone).replace(tzinfo=None)
    for _ in range(minutes):
        at += MINUTE
        local = at.astimezone(zone)
        wall = local.replace(tzinfo=None)
        skipped = (before + MINUTE * k for k in range(1, (wall - before) // MINUTE))
        if (local.fold == 0 and matches(wall)) or any(matches(w) for w in skipped):
            return at
        before = wall
    return None


@cache
def transitions(zone: str) -> list[datetime]:
    """The instants in 2024-2026 where the zone's UTC offset changes (to the hour)."""
    tz, found = ZoneInfo(zone), []
    at = utc(2024, 1, 1)
    while at < utc(2027, 1, 1):
        if (at + timedelta(hours=1)).astimezone(tz).utcoffset() != at.astimezone(tz).utcoffset():
            found.append(at)
        at += timedelta(hours=1)
    return found or [utc(2025, 6, 1)]


@st.composite
def moments(draw: st.DrawFn, zone: str) -> datetime:
    """An aware instant, often within hours or days of a DST transition of ``zone``."""
    near = draw(st.sampled_from([0, 3 * 3600, 2 * 86400]))  # 0: anywhere in 2024-2026
    if near:
        base = draw(st.sampled_from(transitions(zone)))
        offset = draw(st.integers(-near, near // 3))  # mostly before it: fires cross it
    else:
        base, offset = utc(2024, 1, 1), draw(st.integers(0, 3 * 365 * 86400))
    seconds = draw(st.sampled_from([0, 0, 1, 59])) + draw(st.integers(0, 999999)) / 1e6
    moment = base + timedelta(seconds=offset - offset % 60 + seconds)
    return moment.astimezone(ZoneInfo(draw(st.sampled_from(["UTC", zone]))))


cases = st.sampled_from(ZONES).flatmap(lambda z: st.tuples(st.just(z), expressions(), moments(z)))


@settings(max_examples=120, deadline=None)
@given(cases)
def test_next_after_agrees_with_brute_force(case: tuple[str, str, datetime]) -> None:
    """next_after is after the moment and is the brute-force fire whenever one is in 2 days."""
    zone, expression, moment = case
    schedule = Schedule.cron(expression, timezone=zone)
    fire = schedule.next_after(moment)
    assert fire > moment
    assert fire.tzinfo is UTC
    window = 2 * 24 * 60
    expected = brute_next(expression, ZoneInfo(zone), moment, window)
    if expected is None:
        assert fire > moment.astimezone(UTC) + (window - 1) * MINUTE  # UTC, not wall, minutes
    else:
        assert fire == expected


@settings(max_examples=120, deadline=None)
@given(cases)
def test_next_after_fires_between_and_latest_agree(case: tuple[str, str, datetime]) -> None:
    """next_after is stable one minute back; fires_between iterates it; latest inverts it."""
    zone, expression, moment = case
    schedule = Schedule.cron(expression, timezone=zone)
    fire = schedule.next_after(moment)
    assert schedule.next_after(fire - MINUTE) == fire
    chain, at = [], moment
    for _ in range(5):
        at = schedule.next_after(at)
        chain.append(at)
    assert schedule.fires_between(moment, chain[-1], limit=5) == chain
    assert schedule.fires_between(moment, chain[-1], limit=3) == chain[:3]
    assert schedule.fires_between(moment, chain[-1] - MINUTE, limit=9) == chain[:-1]
    for earlier, later in pairwise(chain):
        just_before = later - timedelta(microseconds=1)
        recent = earlier >= just_before - timedelta(days=366)  # cron looks back 366 days
        assert schedule.latest_at_or_before(just_before) == (earlier if recent else None)
        assert schedule.latest_at_or_before(later) == later
    latest = schedule.latest_at_or_before(moment)
    if latest is not None:
        assert latest <= moment
        assert schedule.next_after(latest) == fire


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 366 * 86400),
    st.sampled_from(ZONES),
    st.one_of(st.none(), st.integers(-(10**9), 10**9)),
    st.integers(0, 4 * 10**9),
)
def test_interval_fires_are_anchored_and_evenly_spaced(
    seconds: int, zone: str, anchor_at: int | None, moment_at: int
) -> None:
    """Interval fires are anchor + k * interval, consecutive ones exactly one interval apart."""
    interval = timedelta(seconds=seconds)
    anchor = None if anchor_at is None else datetime.fromtimestamp(anchor_at, UTC)
    schedule = Schedule.every(interval, timezone=zone, anchor=anchor)
    assert schedule.anchor is not None
    moment = datetime.fromtimestamp(moment_at, UTC) + timedelta(microseconds=moment_at % 7)
    got = schedule.fires_between(moment, moment + 4 * interval, limit=3)
    assert len(got) == 3
    assert got[0] > moment >= got[0] - interval
    assert all(b - a == interval for a, b in pairwise(got))
    assert all((f - schedule.anchor) % interval == timedelta(0) for f in got)
    assert schedule.latest_at_or_before(moment) == got[0] - interval
    assert schedule.latest_at_or_before(got[1]) == got[1]


@pytest.mark.parametrize(
    "expression", ["0 0 30 2 */1", "0 0 31 4 */2", "0 0 30 2 */1,3", "0 0 29 2 */7", "0 0 13 5 0"]
)
def test_a_restricted_day_of_month_with_a_stepped_weekday_fires_by_either(expression: str) -> None:
    """README: "when both day fields are restricted, neither exactly `*`, either matches:
    `*/2` is a restriction". Each of these fires in the first week of its month: none
    is accepted and then fails at its first use for want of a fire time (as the AND of
    a rare day and a weekday would, years apart or never)."""
    start = utc(2026, 1, 1)
    first, *_ = fires(Schedule.cron(expression), start, 3)
    assert first - start <= timedelta(days=366)
    assert first.day <= 7
