"""saga's logger: the application's structlog configuration, or quiet by default.

The library never configures structlog. An application that configured it gets saga's
events through its own processors and levels (``structlog.get_logger("saga")``). One that
did not (a plain uvicorn app, a script) would get structlog's default, which prints every
level: eight debug lines per run. Until structlog is configured, saga's events therefore
go through a logger of its own that prints warnings and errors only, to stderr.

:class:`Outage` turns a stream of database errors into one line per state change:
lost, then back (with how long it took), instead of a line per failed call.
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import structlog

_QUIET_PROCESSORS: list[Any] = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.dev.ConsoleRenderer(colors=False),
]


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at call time (tests capture it)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


@cache
def _quiet() -> Any:
    """saga's own logger while the application has not configured structlog (one: it
    writes to ``sys.stderr`` as it is at call time, and building it costs)."""
    return structlog.wrap_logger(
        _StderrLogger(),
        processors=_QUIET_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


def _current(**context: Any) -> Any:
    log = structlog.get_logger("saga") if structlog.is_configured() else _quiet()
    return log.bind(**context) if context else log


class _Logger:
    """Resolves, at each call, whether the application configured structlog."""

    def bind(self, **context: Any) -> Any:
        return _current(**context)

    def debug(self, event: str, **kw: Any) -> None:
        _current().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        _current().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        _current().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        _current().error(event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        _current().exception(event, **kw)


logger = _Logger()


class Outage:
    """Whether the database answers, as one process sees it; logs only the changes.

    Every loop reports its calls' outcomes here (``lost`` on a database error, ``back``
    on a success): the first error logs ``database_unavailable``, later ones are debug
    lines, and the first success after them logs ``database_available``.
    """

    def __init__(self, worker: str) -> None:
        self._worker = worker
        self._since: float | None = None
        self._back_at = -math.inf

    @property
    def down(self) -> bool:
        return self._since is not None

    def lost(self, what: str, exc: BaseException) -> None:
        cause = type(exc.__cause__ or exc).__name__
        if (
            self._since is None
            and cause in _STALE
            and anyio.current_time() - self._back_at < _STALE_SECONDS
        ):
            # A pooled connection the database dropped while it was away: its first use
            # since fails once (the pool replaces it). Not a new outage.
            logger.debug("database_connection_stale", during=what, error_type=cause)
            return
        if self._since is None:
            self._since = anyio.current_time()
            logger.warning(
                "database_unavailable", worker=self._worker, during=what, error_type=cause
            )
        else:
            logger.debug("database_still_unavailable", during=what, error_type=cause)

    def back(self) -> None:
        if self._since is not None:
            now = anyio.current_time()
            if now - self._since < _SETTLE_SECONDS:
                return  # a call in flight as the database went away: not back yet
            self._back_at = now
            down_for = now - self._since
            self._since = None
            logger.warning("database_available", worker=self._worker, after=round(down_for, 3))


#: The errors of a pooled connection the database dropped (a restart): after it is back,
#: each such connection fails once on its first use, for a while after the outage.
_STALE = frozenset({"ConnectionDoesNotExistError", "InterfaceError", "ConnectionResetError"})
_STALE_SECONDS = 30.0
#: How long after the first error a success counts as the database being back (calls in
#: flight as it goes down still succeed for a moment: one outage, not three lines).
_SETTLE_SECONDS = 0.5


#: The events of a run that waits for an operator: logged as errors.
_NEEDS_OPERATOR = ("run_failed", "run_stopped")


#: A failure as the line of a run that waits for an operator names it: its step,
#: attempt and error record (each None when not known).
Cause = tuple[str | None, int | None, Mapping[str, Any] | None]


def needs_cause(events: Iterable[Any], error: Mapping[str, Any] | None) -> bool:
    """Whether the events of one write end the run waiting for an operator without
    naming the failure that stopped it (nor does the write's ``error``): it came in an
    earlier write (a graph run whose other branches ended after it)."""
    if error is not None:
        return False
    found = False
    for event in events:
        if event.data and "error" in event.data:
            return False
        found = found or str(event.kind) in _NEEDS_OPERATOR
    return found


def log_events(log: Any, events: Iterable[Any], cause: Cause | None = None) -> None:
    """Log the history events one write of a worker appended (each as
    :func:`log_event`). The line of a run that now needs an operator names the step,
    attempt and error type of the failure that stopped it (an event's of this write,
    else ``cause``), when its event does not."""
    step_of, attempt_of, error = cause or (None, None, None)
    for event in events:
        kind, step, attempt, data = str(event.kind), event.step, event.attempt, event.data
        if data and "error" in data:
            step_of, attempt_of, error = step, attempt, data["error"]
        elif kind in _NEEDS_OPERATOR and error is not None:
            step, attempt = step or step_of, attempt or attempt_of
            data = {**(data or {}), "error": error}
        log_event(log, kind, step, attempt, data)


def log_event(
    log: Any, kind: str, step: str | None, attempt: int | None, data: Mapping[str, Any] | None
) -> None:
    """Log one history event a worker wrote: failures as warnings, a run that needs an
    operator (failed, stopped) as an error, run-level events as info, the rest as
    debug."""
    fields: dict[str, Any] = {}
    if step:
        fields["step"] = step
    if attempt:
        fields["attempt"] = attempt
    data = data or {}
    if "error" in data:
        # Only the type: messages may carry payload data and secrets.
        fields["error_type"] = data["error"]["type"]
    if "retry_in" in data:
        fields["retry_in"] = round(data["retry_in"], 3)
    if kind in ("step_failed", "compensation_failed"):
        log.warning(kind, **fields)
    elif kind in _NEEDS_OPERATOR:
        log.error(kind, **fields)
    elif kind.startswith("run_"):
        log.info(kind, **fields)
    else:
        log.debug(kind, **fields)


def frames(exc: BaseException, limit: int = 8) -> str:
    """Where ``exc`` was raised, as ``file:line function`` of its innermost frames: what a
    log line may say of an error without its message (a message may quote a payload)."""
    try:
        getter: Any = BaseException.__dict__["__traceback__"]  # (exc's own may be overridden)
        tb = getter.__get__(exc)
        summary = traceback.extract_tb(tb)[-limit:]
        return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in summary[::-1])
    except Exception:
        return "<no traceback>"
