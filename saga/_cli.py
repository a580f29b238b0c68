"""The ``saga`` command line: migrations, workers and operator commands.

Every operator command is a thin layer over the Python API (``saga.list_runs``,
``saga.prune``, ``RunHandle.cancel`` ...), run through a client orchestrator
(``concurrency=0``) that executes nothing. Tables are for people; ``--json`` is for
scripts. Exit codes are stable:

====  =====================================================================
0     success
1     error: the database is unreachable, a query failed, the schema is not migrated
2     usage: a bad option, duration, run id, schema name or worker target
3     not found: no run with that id
4     invalid state: the run's state forbids the action (cancel an ended run,
      retry a run that has not failed)
130   interrupted (Ctrl-C) before the command finished
====  =====================================================================
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO
from uuid import UUID

import anyio
import structlog

from saga._definition import Saga
from saga._errors import (
    ConfigurationError,
    ErrorInfo,
    InvalidRunStateError,
    RunNotFoundError,
    SagaError,
)
from saga._operator import (
    MAX_PAGE_SIZE,
    PRUNABLE_BY_DEFAULT,
    StepAttempt,
    list_runs,
    migrate,
    prune,
    schema_version,
    timeline,
)
from saga._orchestrator import Orchestrator
from saga._run import HistoryEvent, RunInfo, RunStatus
from saga._store import latest_migration

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID_STATE = 4
EXIT_INTERRUPTED = 130

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saga`` command (every command has ``--help``)."""
    common = _Parser(add_help=False)
    # SUPPRESS on both levels: `saga --dsn X runs` and `saga runs --dsn X` both work.
    common.add_argument(
        "--dsn",
        default=argparse.SUPPRESS,
        help="PostgreSQL DSN (default: $SAGA_DSN)",
    )
    common.add_argument(
        "--schema",
        default=argparse.SUPPRESS,
        help="schema holding saga's tables (default: $SAGA_SCHEMA or 'saga')",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON for scripts instead of tables",
    )
    parser = _Parser(
        prog="saga",
        description="Durable sagas on PostgreSQL: migrations, workers and operator commands.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 run not found, 4 invalid run state",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=description, parents=[common], epilog=parser.epilog
        )

    add("migrate", "apply pending schema migrations", "Apply pending schema migrations.")

    worker = add(
        "worker",
        "run a worker for the given sagas until SIGTERM/SIGINT",
        "Execute the runs of the given sagas until SIGTERM or SIGINT, then shut down "
        "gracefully: running steps get --shutdown-timeout seconds to finish, the rest "
        "are handed back to other workers. Exits 0 after a clean shutdown.",
    )
    worker.add_argument(
        "target",
        metavar="MODULE:OBJECT",
        help="a saga.Saga, or a list/tuple of them, e.g. myapp.sagas:checkout",
    )
    worker.add_argument("--concurrency", type=_positive_int, default=32, help="default: 32")
    worker.add_argument("--lease-seconds", type=_positive_float, default=30.0, help="default: 30")
    worker.add_argument("--poll-interval", type=_positive_float, default=1.0, help="default: 1")
    worker.add_argument(
        "--shutdown-timeout", type=_positive_float, default=10.0, help="default: 10"
    )
    worker.add_argument("--worker-id", help="default: host:pid:random")
    worker.add_argument(
        "--no-migrate", action="store_true", help="do not migrate the schema on start"
    )
    worker.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="default: info (logs go to stderr unless the module configures structlog)",
    )

    runs = add(
        "runs",
        "list runs, newest first",
        "List runs, newest first. Durations: 90s, 10m, 2h, 3d, 1w, 1h30m.",
    )
    runs.add_argument("--saga", help="only runs of this saga")
    runs.add_argument(
        "--status",
        type=_statuses,
        action="append",
        help="pending, running, compensating, completed, compensated, failed, cancelled, "
        "active or finished; repeat or comma-separate for several",
    )
    runs.add_argument("--older-than", type=parse_duration, help="created at least this long ago")
    runs.add_argument("--newer-than", type=parse_duration, help="created at most this long ago")
    runs.add_argument(
        "--limit", type=_positive_int, default=50, help=f"page size, at most {MAX_PAGE_SIZE}"
    )
    runs.add_argument(
        "--before",
        type=_run_id,
        metavar="RUN",
        help="next page: runs older than this one (the last id of the previous page)",
    )

    show = add(
        "show",
        "show a run and its timeline",
        "Show a run's state and its timeline: every step and compensation attempt with "
        "its worker, duration, outcome and error.",
    )
    show.add_argument("run", type=_run_id, metavar="RUN", help="run id")
    show.add_argument("--events", action="store_true", help="also print the raw history")

    retry = add(
        "retry",
        "resume a failed run",
        "Resume a failed run at the compensation that gave up, with fresh attempts.",
    )
    retry.add_argument("run", type=_run_id, metavar="RUN", help="run id")

    cancel = add(
        "cancel",
        "cancel a run (its completed steps are compensated)",
        "Cancel an active run: the step running now finishes its attempt, then every "
        "completed step is compensated, newest first.",
    )
    cancel.add_argument("run", type=_run_id, metavar="RUN", help="run id")

    prune_ = add(
        "prune",
        "delete old finished runs and their history",
        "Delete runs that finished more than --older-than ago, with their events, in "
        "batches (one short transaction each). Failed runs wait for an operator and are "
        "kept unless --include-failed.",
    )
    prune_.add_argument(
        "--older-than", type=parse_duration, required=True, help="finished at least this long ago"
    )
    prune_.add_argument("--include-failed", action="store_true", help="prune failed runs too")
    prune_.add_argument(
        "--batch-size", type=_positive_int, default=1000, help="runs per transaction"
    )
    prune_.add_argument("--dry-run", action="store_true", help="only count what would go")

    demo = add(
        "demo",
        "run two order sagas (one completes, one is compensated) and print timelines",
        "Runs on SAGA_DSN when set, else on an embedded PostgreSQL.",
    )
    demo.add_argument("--pgdata", type=Path, help="embedded PostgreSQL data folder")
    return parser


@dataclass
class _Ctx:
    args: argparse.Namespace
    out: TextIO
    err: TextIO
    as_json: bool

    def emit(self, data: Any) -> None:
        json.dump(data, self.out, indent=2, default=_json_default)
        self.out.write("\n")

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")

    def note(self, line: str) -> None:
        self.err.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saga`` command with ``argv`` (default: ``sys.argv[1:]``); return the
    exit code."""
    try:
        args = build_parser().parse_args(argv)
    except _Exit as exc:
        return exc.code
    if args.command == "demo":
        from saga._demo import main as demo_main

        return demo_main(args.pgdata)
    ctx = _Ctx(args, sys.stdout, sys.stderr, getattr(args, "json", False))
    try:
        return _run(ctx)
    except _Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        ctx.note("saga: interrupted")
        return EXIT_INTERRUPTED


def _fail(ctx: _Ctx, code: int, message: str) -> NoReturn:
    ctx.note(f"saga {ctx.args.command}: {'error: ' if code == EXIT_ERROR else ''}{message}")
    raise _Exit(code)


def _run(ctx: _Ctx) -> int:
    args = ctx.args
    dsn = getattr(args, "dsn", None) or os.environ.get("SAGA_DSN")
    if not dsn:
        _fail(ctx, EXIT_USAGE, "no database: pass --dsn or set SAGA_DSN")
    schema = getattr(args, "schema", None) or os.environ.get("SAGA_SCHEMA") or "saga"
    sagas = _load_target(ctx, args.target) if args.command == "worker" else []
    # The command is the application, so it may configure logging: library logs go to
    # stderr, never into tables or JSON on stdout. A worker keeps a configuration its
    # module made; the previous configuration is restored for in-process callers.
    previous = structlog.get_config() if structlog.is_configured() else None
    if args.command != "worker" or previous is None:
        level = args.log_level if args.command == "worker" else "warning"
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(ctx.err),
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping()[level.upper()]
            ),
        )
    try:
        return anyio.run(_dispatch, ctx, dsn, schema, sagas)
    except RunNotFoundError as exc:
        _fail(ctx, EXIT_NOT_FOUND, str(exc))
    except InvalidRunStateError as exc:
        _fail(ctx, EXIT_INVALID_STATE, str(exc))
    except ConfigurationError as exc:
        _fail(ctx, EXIT_USAGE, str(exc))
    except SagaError as exc:
        _fail(ctx, EXIT_ERROR, str(exc))
    finally:
        if previous is None:
            structlog.reset_defaults()
        else:
            structlog.configure(**previous)


def _load_target(ctx: _Ctx, target: str) -> list[Saga[Any]]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        _fail(ctx, EXIT_USAGE, f"invalid target {target!r}: expected MODULE:OBJECT")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder's modules
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            _fail(ctx, EXIT_USAGE, f"cannot import {module_name!r}: {exc}")
        _fail(ctx, EXIT_ERROR, f"importing {module_name!r} failed: {exc!r}")
    except Exception as exc:
        _fail(ctx, EXIT_ERROR, f"importing {module_name!r} failed: {exc!r}")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            _fail(ctx, EXIT_USAGE, f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Saga):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(s, Saga) for s in obj):
        return list(obj)
    _fail(
        ctx,
        EXIT_USAGE,
        f"{target} is {type(obj).__name__}, not a saga.Saga or a non-empty list/tuple of them",
    )


async def _dispatch(ctx: _Ctx, dsn: str, schema: str, sagas: list[Saga[Any]]) -> int:
    args = ctx.args
    if args.command == "migrate":
        return await _migrate(ctx, dsn, schema)
    if args.command == "worker":
        return await _worker(ctx, dsn, schema, sagas)
    async with Orchestrator(dsn, sagas=[], schema=schema, concurrency=0, migrate=False) as orch:
        applied, latest = await schema_version(orch)
        if applied == 0:
            _fail(ctx, EXIT_ERROR, f"schema {schema!r} is not migrated; run `saga migrate`")
        if applied < latest:
            ctx.note(f"saga: schema {schema!r} is at migration {applied} of {latest}")
        command = {
            "runs": _runs,
            "show": _show,
            "retry": _retry,
            "cancel": _cancel,
            "prune": _prune,
        }[args.command]
        return await command(ctx, orch)


async def _migrate(ctx: _Ctx, dsn: str, schema: str) -> int:
    applied = await migrate(dsn, schema=schema)
    if ctx.as_json:
        ctx.emit({"schema": schema, "applied": applied, "version": latest_migration()})
    elif applied:
        ctx.say(f"schema {schema!r}: applied migrations {', '.join(map(str, applied))}")
    else:
        ctx.say(f"schema {schema!r} is up to date (migration {latest_migration()})")
    return EXIT_OK


async def _worker(ctx: _Ctx, dsn: str, schema: str, sagas: list[Saga[Any]]) -> int:
    args = ctx.args
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with Orchestrator(
            dsn,
            sagas=sagas,
            schema=schema,
            concurrency=args.concurrency,
            lease_seconds=args.lease_seconds,
            poll_interval=args.poll_interval,
            shutdown_timeout=args.shutdown_timeout,
            worker_id=args.worker_id,
            migrate=not args.no_migrate,
        ) as orch:
            names = ", ".join(f"{s.name} v{s.version}" for s in sagas)
            ctx.note(
                f"saga worker {orch.worker_id} ready: {names} (concurrency {orch.concurrency})"
            )
            failure: list[BaseException] = []
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    try:
                        await orch.wait_stopped()
                    except Exception as exc:
                        failure.append(exc)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                async for signum in signals:
                    ctx.note(f"saga worker: {signal.Signals(signum).name} received, shutting down")
                    break
                tg.cancel_scope.cancel()
    if failure:
        ctx.note(f"saga worker: stopped by an internal error: {type(failure[0]).__name__}")
        return EXIT_ERROR
    ctx.note("saga worker: stopped")
    return EXIT_OK


async def _runs(ctx: _Ctx, orch: Orchestrator) -> int:
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
    )
    if ctx.as_json:
        ctx.emit({"runs": [_info_json(r) for r in page.runs], "next_before": page.next_before})
        return EXIT_OK
    if not page.runs:
        ctx.note("no runs match")
        return EXIT_OK
    rows = [
        [
            str(r.id),
            r.saga if r.version == 1 else f"{r.saga} v{r.version}",
            str(r.status) + (" (cancel requested)" if r.cancel_requested else ""),
            r.step or "-",
            str(r.attempt) if r.step else "-",
            _time(r.created_at),
            _duration(r.finished_at - r.created_at) if r.finished_at else "-",
            _error(r.compensation_error or r.error),
        ]
        for r in page.runs
    ]
    headers = ["RUN", "SAGA", "STATUS", "STEP", "ATTEMPT", "CREATED (UTC)", "TOOK", "ERROR"]
    _table(ctx, headers, rows)
    if page.next_before is not None:
        ctx.note(f"more: add --before {page.next_before}")
    return EXIT_OK


async def _show(ctx: _Ctx, orch: Orchestrator) -> int:
    handle = orch.get_run(ctx.args.run)
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
    fields = [
        ("run", str(info.id)),
        ("saga", f"{info.saga} v{info.version}"),
        ("key", info.key or "-"),
        ("status", str(info.status) + (" (cancel requested)" if info.cancel_requested else "")),
        ("step", f"{info.step} (attempt {info.attempt})" if info.step else "-"),
        ("worker", info.worker or "-"),
        ("created", _time(info.created_at) + " UTC"),
        ("finished", _time(info.finished_at) + " UTC" + took if info.finished_at else "-"),
        ("error", _error(info.error, full=True)),
        ("compensation error", _error(info.compensation_error, full=True)),
    ]
    for name, value in fields:
        ctx.say(f"{name + ':':<20}{_clean(value)}")
    ctx.say()
    rows = [
        [
            a.step,
            "compensation" if a.compensation else "step",
            str(a.attempt),
            a.worker or "-",
            _time(a.started_at, precise=True) if a.started_at else "-",
            _duration(timedelta(seconds=a.duration)) if a.duration is not None else "-",
            a.outcome + (f" (retry in {a.retry_in:.2f}s)" if a.retry_in is not None else ""),
            _error(a.error),
        ]
        for a in attempts
    ]
    if rows:
        headers = ["STEP", "PHASE", "ATTEMPT", "WORKER", "STARTED", "TOOK", "OUTCOME", "ERROR"]
        _table(ctx, headers, rows)
    else:
        ctx.say("no attempts yet")
    if ctx.args.events:
        ctx.say()
        for event in history:
            ctx.say(_clean(event.describe()))
    return EXIT_OK


async def _retry(ctx: _Ctx, orch: Orchestrator) -> int:
    handle = orch.get_run(ctx.args.run)
    before = await handle.info()  # where it stopped: a worker may move it on at once
    await handle.retry()
    if ctx.as_json:
        ctx.emit({"run": _info_json(await handle.info()), "action": "retry"})
    else:
        where = "compensation" if before.compensation_error is not None else "step"
        ctx.say(f"run {before.id}: retrying, resuming at {where} {_clean(before.step or '-')!r}")
    return EXIT_OK


async def _cancel(ctx: _Ctx, orch: Orchestrator) -> int:
    handle = orch.get_run(ctx.args.run)
    await handle.cancel()
    info = await handle.info()
    if ctx.as_json:
        ctx.emit({"run": _info_json(info), "action": "cancel"})
    else:
        ctx.say(f"run {info.id}: cancel requested; completed steps will be compensated")
    return EXIT_OK


async def _prune(ctx: _Ctx, orch: Orchestrator) -> int:
    args = ctx.args
    statuses = (*PRUNABLE_BY_DEFAULT, RunStatus.FAILED) if args.include_failed else None
    result = await prune(
        orch,
        older_than=args.older_than,
        status=statuses or PRUNABLE_BY_DEFAULT,
        batch_size=args.batch_size,
        dry_run=args.dry_run,
    )
    if ctx.as_json:
        ctx.emit(
            {
                "runs": result.runs,
                "events": result.events,
                "batches": result.batches,
                "dry_run": result.dry_run,
            }
        )
    else:
        verb = "would delete" if result.dry_run else "deleted"
        batches = "" if result.dry_run else f" in {result.batches} batch(es)"
        ctx.say(
            f"{verb} {result.runs} runs and {result.events} events{batches} "
            f"(finished more than {_duration(args.older_than)} ago)"
        )
    return EXIT_OK


# -- rendering ----------------------------------------------------------------------------


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
