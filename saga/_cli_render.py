"""Rendering for the ``saga`` command: tables for people, JSON for scripts."""

from __future__ import annotations

import argparse
import getpass
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TextIO
from uuid import UUID

from saga._cli_values import EXIT_ERROR, _Exit
from saga._errors import ErrorInfo
from saga._model import HistoryEvent, RunInfo
from saga._timeline import StepAttempt


class Discarded(io.StringIO):
    """A standard stream the process was started without (``2>&-``, or stdout for a
    server command): what goes to it is dropped, and the exit code still tells."""

    def write(self, text: str) -> int:
        return len(text)


class ClosedOutput(Discarded):
    """stdout closed before the command started (``saga runs >&-``): the first write
    stops the output as a closed pipe does (exit 141, nothing on stderr)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError("stdout is closed")


@dataclass
class _Ctx:
    args: argparse.Namespace
    out: TextIO
    err: TextIO
    as_json: bool
    #: The command is its process (``saga``, ``python -m saga``), not a call of main()
    #: in a process that goes on: it may handle signals, and leave at once.
    process: bool = False
    #: A worker's SIGTERM or SIGINT received before its own handlers were in place.
    signalled: list[int] = field(default_factory=list)

    def emit(self, data: Any) -> None:
        json.dump(data, self.out, indent=2, default=_json_default)
        self.out.write("\n")

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")

    def note(self, line: str) -> None:
        self.err.write(line + "\n")

    def fail(self, code: int, message: str) -> NoReturn:
        """Say what went wrong on stderr, on one line (control characters escaped: a
        message may quote what a sender chose), and leave the command with ``code``."""
        error = "error: " if code == EXIT_ERROR else ""
        self.note(f"saga {self.args.command}: {error}{_clean(message)}")
        raise _Exit(code)

    @property
    def by(self) -> str:
        """Who acts: ``--by``, or the user running the command."""
        by: str | None = self.args.by
        return default_operator() if by is None else by


def default_operator() -> str:
    """Who acts when ``--by`` is not given: the user running the command."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment or the password file
        return "cli"


def _clean(text: str) -> str:
    """Escape control characters: names and messages must not drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(text: str, width: int = 60) -> str:
    text = _clean(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(ctx: _Ctx, headers: list[str], rows: list[list[str]]) -> None:
    cells = [headers, *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        ctx.say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _time(at: datetime, *, precise: bool = False) -> str:
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if precise else at.strftime("%Y-%m-%d %H:%M:%S")


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m{secs}s" if secs else f"{minutes}m"


def _error(error: ErrorInfo | None, *, full: bool = False) -> str:
    if error is None:
        return "-"
    text = (
        str(error) if full else (f"{error.type}: {error.message}" if error.message else error.type)
    )
    return _clean(text)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _error_json(error: ErrorInfo | None) -> dict[str, Any] | None:
    return (
        None
        if error is None
        else {"type": error.type, "message": error.message, "step": error.step}
    )


def _info_json(info: RunInfo) -> dict[str, Any]:
    return {
        "id": str(info.id),
        "saga": info.saga,
        "version": info.version,
        "key": info.key,
        "status": info.status.value,
        "step": info.step,
        "attempt": info.attempt,
        "completed_steps": list(info.completed_steps),
        "error": _error_json(info.error),
        "compensation_error": _error_json(info.compensation_error),
        "cancel_requested": info.cancel_requested,
        "worker": info.worker,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "wait": info.wait,
        "due_at": info.due_at.isoformat() if info.due_at else None,
        "resolved": info.resolved,
        "priority": info.priority,
        "concurrency_key": info.concurrency_key,
        "waiting_for_key": info.waiting_for_key,
    }


def _attempt_json(a: StepAttempt) -> dict[str, Any]:
    return {
        "step": a.step,
        "compensation": a.compensation,
        "attempt": a.attempt,
        "worker": a.worker,
        "started_at": a.started_at.isoformat() if a.started_at else None,
        "ended_at": a.ended_at.isoformat() if a.ended_at else None,
        "duration": a.duration,
        "outcome": a.outcome,
        "error": _error_json(a.error),
        "retry_in": a.retry_in,
        "after": None if a.after is None else list(a.after),
        "rate_limit": a.rate_limit,
        "rate_limited_until": limited.isoformat() if (limited := a.rate_limited_until) else None,
    }


def _event_json(e: HistoryEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "at": e.at.isoformat(),
        "kind": e.kind,
        "step": e.step,
        "attempt": e.attempt,
        "worker": e.worker,
        "data": e.data,
    }
