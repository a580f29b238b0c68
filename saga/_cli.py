"""The ``saga`` command line: migrations, workers and operator commands.

Every operator command is a thin layer over the Python API (``saga.list_runs``,
``saga.count_runs``, ``saga.prune``, ``RunHandle.cancel``, ``Client.signal`` ...), run
through a :class:`~saga.Client`, which executes nothing (``saga signal`` registers the
sagas of its ``--target`` with it: their waits' models validate payloads). Tables are for
people; ``--json`` is for scripts. Exit codes are stable:

====  =====================================================================
0     success
1     error: the database is unreachable, a query failed, the schema is not migrated
2     usage: a bad option, DSN, duration, run id, schema name or target, a key that runs
      of several sagas use, given without --saga, or a signal that cannot be sent (bad
      JSON, a payload its wait's model refuses, a name the run's saga has no wait for,
      a --target without the run's saga); nothing was written
3     not found: no run with that id (or key)
4     invalid state: the run's state forbids the action (cancel an ended run, retry a
      run that is neither failed nor stopped, signal a run that ended or whose wait
      timed out: that refusal is recorded in the run's history)
130   interrupted (Ctrl-C) before the command finished
141   stdout was closed early (``saga runs | head -1``): the output stops quietly, with
      nothing on stderr, as for a command that SIGPIPE ended (128 + 13)
====  =====================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO, cast

import anyio
import structlog

from saga import _children, _registry
from saga._cli_acts import ACTIONS
from saga._cli_args import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID_STATE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    _Exit,
    build_parser,
    parse_duration,
)
from saga._cli_ops import COMMANDS, read_payload
from saga._cli_process import (
    WRITES_ONE,
    LogStream,
    standard_streams,
    stdout_closed,
    to_its_end,
)
from saga._cli_render import ClosedOutput, Discarded, _clean, _Ctx
from saga._cli_sched import SCHEDULE_COMMANDS
from saga._client import Client
from saga._db import latest_migration, validate_dsn, validate_schema
from saga._definition import Saga
from saga._dsn import command_dsn
from saga._errors import (
    ConfigurationError,
    DefinitionError,
    InvalidRunStateError,
    RunNotFoundError,
    SagaError,
)
from saga._operator import migrate
from saga._orchestrator import Orchestrator

__all__ = ["EXIT_USAGE", "build_parser", "main", "parse_duration"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saga`` command with ``argv`` (default: ``sys.argv[1:]``); return the
    exit code."""
    with standard_streams():
        try:
            code = _main(argv, process=argv is None)
            sys.stdout.flush()  # a closed pipe must show up here, not in the exit's flush
        except BrokenPipeError:
            return stdout_closed()
        return code


def _main(argv: Sequence[str] | None, process: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dashboard = _dashboard_args(argv)
    if dashboard is not None:
        return _dashboard(*dashboard)
    try:
        args = build_parser().parse_args(argv)
    except _Exit as exc:
        return exc.code
    if args.command == "demo":
        from saga._demo import main as demo_main

        return demo_main(
            args.pgdata,
            dsn=getattr(args, "dsn", None),
            schema=getattr(args, "schema", None),
            as_json=getattr(args, "json", False),
        )
    # Messages and log lines alike are dropped once stderr's reader went away.
    err = cast("TextIO", LogStream(sys.stderr))
    ctx = _Ctx(args, sys.stdout, err, getattr(args, "json", False), process)
    try:
        return _run(ctx)
    except _Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        ctx.note("saga: interrupted")
        return EXIT_INTERRUPTED


def _dashboard_args(argv: list[str]) -> tuple[list[str], str | None, str | None] | None:
    """``saga [--dsn X] [--schema Y] dashboard ...``: the dashboard's own options, and the
    common ones given before the command; None for every other command."""
    common: dict[str, str | None] = {"--dsn": None, "--schema": None}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in common and eq:
            common[name] = value
        elif name in common and i + 1 < len(argv):
            common[name] = argv[i + 1]
            i += 1
        elif argv[i] != "--json":
            break
        i += 1
    if i >= len(argv) or argv[i] != "dashboard":
        return None
    return argv[i + 1 :], common["--dsn"], common["--schema"]


def _dashboard(argv: list[str], dsn: str | None, schema: str | None) -> int:
    """``saga dashboard``: the web dashboard on its own (the ``web`` extra)."""
    try:
        from saga.web._command import main as dashboard_main
    except ImportError as exc:
        print(f"saga dashboard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # A server runs on without anyone reading its address line.
    out = Discarded() if isinstance(sys.stdout, ClosedOutput) else None
    return dashboard_main(argv, dsn=dsn, schema=schema, out=out)


def _run(ctx: _Ctx) -> int:
    args = ctx.args
    try:
        dsn = command_dsn(getattr(args, "dsn", None))
    except ConfigurationError as exc:
        ctx.fail(EXIT_USAGE, str(exc))
    if not dsn:
        ctx.fail(EXIT_USAGE, "no database: pass --dsn or set SAGA_DSN")
    given = getattr(args, "schema", None)  # --schema "" is a bad name, not the default
    schema = given if given is not None else os.environ.get("SAGA_SCHEMA") or "saga"
    if args.command == "signal":
        read_payload(ctx)  # usage errors before the target's import and any connection
    sagas = _target_sagas(ctx)
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
        ctx.fail(EXIT_NOT_FOUND, str(exc))
    except InvalidRunStateError as exc:
        ctx.fail(EXIT_INVALID_STATE, str(exc))
    except ConfigurationError as exc:
        ctx.fail(EXIT_USAGE, str(exc))
    except SagaError as exc:
        ctx.fail(EXIT_ERROR, str(exc))
    finally:
        if previous is None:
            structlog.reset_defaults()
        else:
            structlog.configure(**previous)


def _target_sagas(ctx: _Ctx) -> list[Saga[Any]]:
    """The sagas of the command's MODULE:OBJECT target (none for commands without)."""
    args = ctx.args
    if args.command == "worker" and ctx.process:
        # A deploy may stop a worker still importing its application: noted, and the
        # worker leaves once it could start (exit 0), rather than dying by the signal.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda n, _frame: ctx.signalled.append(n))
    if args.command in ("worker", "signal", "skip-compensation"):
        return _load_target(ctx, args.target)
    return []


def _load_target(ctx: _Ctx, target: str) -> list[Saga[Any]]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or module_name.startswith("."):
        ctx.fail(
            EXIT_USAGE,
            f"invalid target {target!r}: expected MODULE:OBJECT, the module's full dotted path",
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder's modules
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            ctx.fail(EXIT_USAGE, f"cannot import {module_name!r}: {exc}")
        ctx.fail(EXIT_ERROR, f"importing {module_name!r} failed: {exc!r}")
    except Exception as exc:
        ctx.fail(EXIT_ERROR, f"importing {module_name!r} failed: {exc!r}")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            ctx.fail(EXIT_USAGE, f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Saga):
        return _registrable(ctx, target, [obj])
    if isinstance(obj, list | tuple) and obj and all(isinstance(s, Saga) for s in obj):
        return _registrable(ctx, target, list(obj))
    ctx.fail(
        EXIT_USAGE,
        f"{target} is {type(obj).__name__}, not a saga.Saga or a non-empty list/tuple of them",
    )


def _registrable(ctx: _Ctx, target: str, sagas: list[Saga[Any]]) -> list[Saga[Any]]:
    """The target's sagas, if a client can register them (a bad target is a usage
    error, found before any connection): each a whole definition, one per name and
    version, every child saga there too, no saga its own descendant."""
    try:
        for saga in sagas:
            saga._freeze()  # (what a client's open does: steps, pivot, keys checked)
        registered = _registry.definitions(sagas)
        _children.check_registered(registered)
        _children.check_acyclic(registered)
    except DefinitionError as exc:
        ctx.fail(EXIT_USAGE, f"invalid target {target}: {exc}")
    return sagas


async def _dispatch(ctx: _Ctx, dsn: str, schema: str, sagas: list[Saga[Any]]) -> int:
    args = ctx.args
    # A ConfigurationError here, before any connection, is a bad argument (exit 2).
    validate_dsn(dsn)
    validate_schema(schema)
    if args.command == "migrate":
        return await _migrate(ctx, dsn, schema)
    if args.command == "worker":
        return await _worker(ctx, dsn, schema, sagas)
    orch = Client(dsn, sagas=sagas, schema=schema, migrate=False)
    async with contextlib.AsyncExitStack() as stack:
        await _open(ctx, stack, orch)
        command = {**COMMANDS, **ACTIONS, **SCHEDULE_COMMANDS}[args.command]
        if args.command in WRITES_ONE and not getattr(args, "all", False):
            return await to_its_end(ctx, command(ctx, orch))
        return await command(ctx, orch)
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the block returns


async def _open(ctx: _Ctx, stack: contextlib.AsyncExitStack, client: Client) -> None:
    """Open ``client`` (built, so its arguments were fine): a ConfigurationError now is
    what the database holds (a schema not migrated), an error (exit 1), not usage."""
    try:
        await stack.enter_async_context(client)
    except ConfigurationError as exc:
        ctx.fail(EXIT_ERROR, str(exc))


async def _open_unless_signalled(
    ctx: _Ctx, stack: contextlib.AsyncExitStack, orch: Orchestrator, signals: AsyncIterator[int]
) -> int | None:
    """Open the worker; a SIGTERM or SIGINT while it opens (it may wait for another
    deploy's migration lock) stops the opening: that signal's number, else None."""
    got: list[int] = []

    async def first_signal() -> None:
        async for signum in signals:
            got.append(signum)
            opening.cancel()
            return

    with anyio.CancelScope() as opening:
        watcher = asyncio.get_running_loop().create_task(first_signal())
        try:
            await _open(ctx, stack, orch)
        finally:
            watcher.cancel()
    return got[0] if got else None


async def _migrate(ctx: _Ctx, dsn: str, schema: str) -> int:
    try:
        applied = await migrate(dsn, schema=schema)
    except ConfigurationError as exc:  # the arguments were checked: found on open
        ctx.fail(EXIT_ERROR, str(exc))
    if ctx.as_json:
        ctx.emit({"schema": schema, "applied": applied, "version": latest_migration()})
    elif applied:
        ctx.say(f"schema {schema!r}: applied migrations {', '.join(map(str, applied))}")
    else:
        ctx.say(f"schema {schema!r} is up to date (migration {latest_migration()})")
    return EXIT_OK


async def _worker(ctx: _Ctx, dsn: str, schema: str, sagas: list[Saga[Any]]) -> int:
    args = ctx.args
    orch = Orchestrator(  # a bad setting: ConfigurationError, exit 2
        dsn,
        sagas=sagas,
        schema=schema,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        poll_interval=args.poll_interval,
        shutdown_timeout=args.shutdown_timeout,
        worker_id=args.worker_id,
        migrate=not args.no_migrate,
    )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if ctx.signalled:  # (while the target imported)
            name = signal.Signals(ctx.signalled[0]).name
            ctx.note(f"saga worker: {name} received while starting")
            return EXIT_OK
        async with contextlib.AsyncExitStack() as stack:
            signum = await _open_unless_signalled(ctx, stack, orch, signals)
            if signum is not None:
                ctx.note(f"saga worker: {signal.Signals(signum).name} received while starting")
                return EXIT_OK
            names = ", ".join(f"{s.name} v{s.version}" for s in sagas)
            ctx.note(
                f"saga worker {_clean(orch.worker_id)} ready: {names} "
                f"(concurrency {orch.concurrency})"
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
    if orch.abandoned and ctx.process:
        # A step ignoring its cancellation still runs: the event loop's end would wait
        # for it (for ever, if it never ends). Its lease was given back: leave now.
        ctx.note("saga worker: left a step that ignored its cancellation running")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK
