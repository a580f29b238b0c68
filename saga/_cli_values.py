"""The values of ``saga``'s arguments: exit codes, and the parsers of durations, run ids,
counts and statuses (argparse ``type=`` functions, raising ``ArgumentTypeError``)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn
from uuid import UUID

from saga._checks import MAX_AGE_SECONDS
from saga._model import RunStatus

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID_STATE = 4
EXIT_INTERRUPTED = 130
# 128 + SIGPIPE: what a shell reports for `ls | head -1` when ls dies of SIGPIPE.
EXIT_BROKEN_PIPE = 141

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_STATUS_GROUPS = {
    "active": [s.value for s in RunStatus if not s.is_terminal],
    "finished": [s.value for s in RunStatus if s.is_terminal],
}


class _Exit(Exception):
    """Leave main() with this code (argparse's exit, usage errors)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that returns its exit code to main() instead of exiting."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``3d``, ``1w`` or combinations such as ``1h30m``."""
    value = text.strip().lower()
    pos, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        seconds += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if not value or pos != len(value):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit s, m, h, d or w "
            "(e.g. 90s, 10m, 2h, 3d, 1h30m)"
        )
    if not seconds <= MAX_AGE_SECONDS:  # (inf too)
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: at most 1,000 years")
    return timedelta(seconds=seconds)


def _run_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid run id {text!r}: not a UUID") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _int_up_to(maximum: int) -> Callable[[str], int]:
    """An option's integer from 1 to ``maximum``: refused by argparse, naming the option,
    before any connection (the Python API's own check would name its argument)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be a positive integer, at most {maximum}, got {text!r}"
            )
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    """Seconds: a positive number (``30``, ``0.5``) or a duration (``30s``, ``2m``)."""
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        seconds = parse_duration(text).total_seconds()
    except argparse.ArgumentTypeError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds or a duration (30, 0.5, 30s, 2m), got {text!r}"
        )
    return seconds


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _statuses(text: str) -> list[str]:
    out: list[str] = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if part in _STATUS_GROUPS:
            out.extend(_STATUS_GROUPS[part])
        elif part in {s.value for s in RunStatus}:
            out.append(part)
        else:
            known = ", ".join([*(s.value for s in RunStatus), *_STATUS_GROUPS])
            raise argparse.ArgumentTypeError(f"unknown status {part!r}; use one of: {known}")
    if not out:
        raise argparse.ArgumentTypeError("empty status")
    return out
