"""Command-line arguments of ``saga``: exit codes, value parsers, the argparse tree."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from saga import __version__
from saga._bulk import MAX_BULK
from saga._cli_sched import add_schedule_parsers
from saga._cli_values import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID_STATE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    _count,
    _Exit,
    _int_up_to,
    _Parser,
    _positive_int,
    _positive_seconds,
    _run_id,
    _statuses,
    parse_duration,
)
from saga._model import RunStatus
from saga._operator import MAX_PAGE_SIZE

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_STATE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "_Exit",
    "build_parser",
    "parse_duration",
]


def _add_run_name(parser: argparse.ArgumentParser) -> None:
    """RUN, or --key KEY [--saga NAME]: the two ways to name one run."""
    parser.add_argument("run", type=_run_id, nargs="?", metavar="RUN", help="run id (or --key)")
    parser.add_argument(
        "--key",
        help="instead of RUN: the idempotency key (business id) the run was started with; "
        "write --key=-K for a key that starts with '-'",
    )
    parser.add_argument("--saga", help="with --key: the saga of the run, when several use the key")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    """Which runs: what ``saga runs`` lists and a bulk action (``--all``) acts on."""
    parser.add_argument("--saga", help="only runs of this saga")
    parser.add_argument(
        "--status",
        type=_statuses,
        action="append",
        help=f"{', '.join(s.value for s in RunStatus)}, active or finished; repeat or "
        "comma-separate for several",
    )
    parser.add_argument("--older-than", type=parse_duration, help="created at least this long ago")
    parser.add_argument("--newer-than", type=parse_duration, help="created at most this long ago")
    parser.add_argument(
        "--key",
        help="only runs started with this idempotency key (exact match; one per saga at most)",
    )


def _add_operator(parser: argparse.ArgumentParser, *, note_required: bool = False) -> None:
    """Who acts and why: recorded in the run's history with the action."""
    parser.add_argument("--by", metavar="NAME", help="who acts (default: the user name)")
    parser.add_argument(
        "--note", required=note_required, metavar="TEXT", help="why, for the run's history"
    )


def _add_actions(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    """cancel, retry (one run or --all), resolve, skip-compensation, attention."""
    retry = add(
        "retry",
        "resume failed or stopped runs",
        "Resume a failed run at the compensation that gave up, with fresh attempts; a run "
        "stopped at a step that gave up runs it again; a run stopped at a timed-out wait "
        "waits again for its signal, with a fresh timeout. With --all: every run the "
        "filters match (first a count, then --expect COUNT or --yes acts).",
    )
    cancel = add(
        "cancel",
        "cancel runs (their completed steps are compensated)",
        "Cancel an active or stopped run: the step running now finishes its attempt, then "
        "every completed step is compensated, newest first (at once for a sleeping, "
        "waiting or stopped run). With --all: every run the filters match (first a "
        "count, then --expect COUNT or --yes acts).",
    )
    for parser in (retry, cancel):
        parser.add_argument("run", type=_run_id, nargs="?", metavar="RUN", help="run id")
        parser.add_argument("--all", action="store_true", help="every run the filters match")
        _add_filters(parser)
        parser.add_argument(
            "--limit",
            type=_int_up_to(MAX_BULK),
            default=100,
            help=f"with --all: at most this many (up to {MAX_BULK})",
        )
        parser.add_argument(
            "--expect", type=_count, metavar="COUNT", help="with --all: act if COUNT runs match"
        )
        parser.add_argument("--yes", action="store_true", help="with --all: act without a count")
        _add_operator(parser)
    resolve = add(
        "resolve",
        "mark a failed or stopped run resolved (it no longer needs attention)",
        "Mark a failed or stopped run resolved: an operator dealt with it outside saga. "
        "Its state and history stay; a later retry or cancel makes it unresolved again.",
    )
    resolve.add_argument("run", type=_run_id, metavar="RUN", help="run id")
    _add_operator(resolve, note_required=True)
    skip = add(
        "skip-compensation",
        "skip the compensation that gave up; the rollback goes on",
        "A failed run stopped at a compensation that gave up: record it as skipped (an "
        "operator undid it by hand, or it needs no undoing) and go on with the remaining "
        "compensations. --target names the saga definitions (what is left depends on them).",
    )
    skip.add_argument("run", type=_run_id, metavar="RUN", help="run id")
    skip.add_argument(
        "--target", required=True, metavar="MODULE:OBJECT", help="the run's saga.Saga(s)"
    )
    _add_operator(skip, note_required=True)
    attention = add(
        "attention",
        "list the runs waiting for an operator, oldest first",
        "Failed runs and runs stopped for an operator, except those marked resolved.",
    )
    attention.add_argument(
        "--limit",
        type=_int_up_to(MAX_PAGE_SIZE),
        default=50,
        help=f"page size, at most {MAX_PAGE_SIZE}",
    )
    attention.add_argument("--after", type=_run_id, metavar="RUN", help="next page")


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
    parser.add_argument("--version", action="version", version=f"saga {__version__}")
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
    seconds = "seconds, or a duration such as 30s or 2m"
    worker.add_argument(
        "--lease-seconds", type=_positive_seconds, default=30.0, help=f"{seconds} (default: 30)"
    )
    worker.add_argument(
        "--poll-interval", type=_positive_seconds, default=1.0, help=f"{seconds} (default: 1)"
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=_positive_seconds,
        default=10.0,
        help=f"{seconds} (default: 10)",
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
    _add_filters(runs)
    runs.add_argument(
        "--limit",
        type=_int_up_to(MAX_PAGE_SIZE),
        default=50,
        help=f"page size, at most {MAX_PAGE_SIZE}",
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
        "its worker, duration, outcome and error. Name the run by its id, or by the "
        "idempotency key it was started with (--key, and --saga when several sagas have "
        "a run with that key).",
    )
    _add_run_name(show)
    show.add_argument("--events", action="store_true", help="also print the raw history")

    signal = add(
        "signal",
        "send a signal with its JSON payload to a run (an approval, a webhook's answer)",
        "Send the signal SIGNAL to a run, named by its id or by the idempotency key it was "
        "started with (--key, and --saga when several sagas have a run with that key). The "
        "payload is validated against the wait's pydantic model before anything is "
        "written, so --target names the saga definitions, as for `saga worker`. A signal "
        "sent before the run reaches its wait is kept for it. The first signal of a name "
        "wins: a repeat exits 0 and changes nothing. A signal to a run that ended, or "
        "whose wait timed out, exits 4 and the refusal is recorded in its history.",
    )
    signal.add_argument("signal", metavar="SIGNAL", help="the name of the wait (wait_for's name)")
    _add_run_name(signal)
    signal.add_argument(
        "--payload",
        required=True,
        metavar="JSON",
        help="the payload, a JSON object for the wait's model; - reads it from stdin",
    )
    signal.add_argument(
        "--target",
        required=True,
        metavar="MODULE:OBJECT",
        help="the run's saga.Saga, or a list/tuple of sagas holding it, e.g. myapp.sagas:refund",
    )
    _add_operator(signal)

    stats = add(
        "stats",
        "count runs per saga and status",
        "Count runs per saga and status, with a total row. Reads every matching run, "
        "finished ones included, so its time grows with the table (prune keeps it small).",
    )
    stats.add_argument("--saga", help="only runs of this saga")
    stats.add_argument("--older-than", type=parse_duration, help="created at least this long ago")
    stats.add_argument("--newer-than", type=parse_duration, help="created at most this long ago")

    _add_actions(add)
    add_schedule_parsers(add)

    prune_ = add(
        "prune",
        "delete old finished runs and their history",
        "Delete runs that finished more than --older-than ago, with their events. Whole "
        "days of runs are dropped at once (their partitions); the rest go in batches (one "
        "short transaction each), unless --whole-days. Failed and stopped runs wait for an "
        "operator and are kept unless --include-failed and --include-stopped.",
    )
    prune_.add_argument(
        "--older-than", type=parse_duration, required=True, help="finished at least this long ago"
    )
    prune_.add_argument("--include-failed", action="store_true", help="prune failed runs too")
    prune_.add_argument("--include-stopped", action="store_true", help="prune stopped runs too")
    prune_.add_argument(
        "--batch-size", type=_positive_int, default=1000, help="runs per transaction"
    )
    prune_.add_argument(
        "--whole-days",
        action="store_true",
        help="only drop whole days (no row-by-row deletes: nothing left for autovacuum)",
    )
    prune_.add_argument("--dry-run", action="store_true", help="only count what would go")

    add(
        "dashboard",
        "serve the web dashboard on its own (pip install 'saga[web]')",
        "Serve the web dashboard: `saga dashboard --help` lists its options. Without "
        "--token-env it listens on loopback only and prints a URL with a one-time token.",
    )
    demo = add(
        "demo",
        "run two order sagas (one completes, one is compensated) and print timelines",
        "Runs on SAGA_DSN when set, else on an embedded PostgreSQL.",
    )
    demo.add_argument("--pgdata", type=Path, help="embedded PostgreSQL data folder")
    return parser
