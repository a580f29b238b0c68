"""The command line: what to measure, how often, at what size."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from benchmarks._base import HERE

SECTIONS = (
    "ceiling",
    "queue",
    "saga",
    "versus",
    "compensation",
    "graphs",
    "priority",
    "waits",
    "latency",
    "scale",
    "retention",
    "memory",
    "tracing",
    "profile",
)
# Smoke size: the throughput workloads, waits, and the two sections that use saga's
# internals (benchmarks/_internals.py; waits does too), so that CI notices when the core
# moves under them.
SMOKE_SECTIONS = ("queue", "saga", "versus", "waits", "scale", "retention", "profile")
DEFAULT_OUTPUT = HERE / "RESULTS.md"
PYSPY_CANDIDATES = ("/tmp/pyspy-venv/bin/py-spy", "/tmp/pyspy/bin/py-spy")


@dataclasses.dataclass(frozen=True)
class Options:
    runs: int = 3000  # runs per throughput measurement
    repeats: int = 3
    sections: tuple[str, ...] = SECTIONS
    concurrency: tuple[int, ...] = (1, 16, 64)  # of the queue and saga rows
    processes: tuple[int, ...] = (1, 2)  # worker processes of the saga rows
    drain_concurrency: tuple[int, ...] = (64,)  # concurrency levels of the drain rows
    pgbench_seconds: int = 5
    latency_rate: float = 20.0
    latency_seconds: float = 20.0
    scale_runs: int = 10_000_000  # 1,000,000 a day over past days' partitions
    scale_events: int | None = None  # events per loaded run; None: as a real run has
    retention_runs: int = 1_000_000  # runs of the day pruned whole
    retention_rowwise_runs: int = 1_000_000  # runs pruned row by row (at most retention_runs)
    memory_runs: int = 10_000
    statements: bool = False  # diagnostic: pg_stat_statements per measurement
    pool_size: int | None = None  # experiment: the saga workers' own pool of this size
    smoke: bool = False  # smoke size: no pgbench, figures not meant to be read
    py_spy: str | None = None
    raw: str | None = None  # append every measurement here as a JSON line

    def changed(self) -> str:
        """The options that differ from the defaults, for the report's header."""
        base = DEFAULTS if not self.smoke else SMOKE
        diff = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in ("py_spy", "raw") and getattr(self, f.name) != getattr(base, f.name)
        ]
        return ", ".join(diff) or "none"

    def experiments(self) -> str:
        """The diagnostic options that change what is measured, or ""."""
        parts = [f"--pool-size {self.pool_size}" if self.pool_size else ""]
        parts.append("--statements (pg_stat_statements loaded)" if self.statements else "")
        return " ".join(p for p in parts if p)


DEFAULTS = Options()
SMOKE = Options(
    runs=300,
    repeats=1,
    sections=SMOKE_SECTIONS,
    concurrency=(16,),
    processes=(1,),
    latency_seconds=1.0,
    scale_runs=2000,
    retention_runs=2000,
    retention_rowwise_runs=1000,
    memory_runs=200,
    smoke=True,
)


def find_py_spy(explicit: str | None) -> str | None:
    for candidate in (
        explicit,
        os.environ.get("SAGA_BENCH_PYSPY"),
        shutil.which("py-spy"),
        *PYSPY_CANDIDATES,
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="saga against the commit ceiling of the same Postgres, same sitting "
        "(see benchmarks/README.md).",
    )
    p.add_argument("--dsn", help="postgresql:// URI (default: a throwaway durable cluster)")
    p.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    p.add_argument("--runs", type=int, help="runs per throughput measurement (3,000)")
    p.add_argument("--repeats", type=int, help="repeats of every measurement (3)")
    p.add_argument("--concurrency", type=_ints, help="queue/saga concurrency levels (1,16,64)")
    p.add_argument("--processes", type=_ints, help="worker processes of the saga rows (1,2)")
    p.add_argument(
        "--drain-concurrency", type=_ints, help="concurrency levels of the saga drain rows (64)"
    )
    p.add_argument("--pgbench-seconds", type=int)
    p.add_argument("--latency-rate", type=float)
    p.add_argument("--latency-seconds", type=float)
    p.add_argument("--scale-runs", type=int)
    p.add_argument("--scale-events", type=int, help="events per loaded run (default: as real)")
    p.add_argument("--retention-runs", type=int, help="runs of the day pruned whole (1,000,000)")
    p.add_argument(
        "--retention-rowwise-runs",
        type=int,
        help="runs of the day pruned row by row, the previous way (1,000,000; at most "
        "--retention-runs; less keeps it short, the report extrapolates)",
    )
    p.add_argument("--memory-runs", type=int)
    p.add_argument(
        "--statements",
        action="store_const",
        const=True,
        help="diagnostic: load pg_stat_statements and list the statements each throughput "
        "measurement costs (adds overhead; do not quote its throughput)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        help="experiment: hand the saga worker orchestrators an application-owned pool of "
        "this size, without a reset per release (default: their own, max(4, min(C + 2, 20)))",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"smoke size ({SMOKE.runs} runs, 1 repeat, sections {','.join(SMOKE_SECTIONS)}): "
        "checks that everything runs; never the ceiling (pgbench); writes nothing",
    )
    p.add_argument(
        "--py-spy",
        help="py-spy executable for the profile section (default: $SAGA_BENCH_PYSPY, PATH, "
        f"then {', '.join(PYSPY_CANDIDATES)})",
    )
    p.add_argument(
        "--raw",
        help="append every throughput-like measurement to this file, one JSON object a line "
        "(label and every counter: for figures the report does not print)",
    )
    p.add_argument(
        "--output",
        type=Path,
        help=f"write the report here (default: {DEFAULT_OUTPUT.relative_to(HERE.parent)} when "
        "every section runs, else nowhere)",
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[Options, str | None, Path | None]:
    """Options, the --dsn (or None), and where to write the report (or None)."""
    parser = _parser()
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Options)
        if f.name not in ("sections", "smoke", "py_spy") and getattr(args, f.name) is not None
    }
    sections = base.sections
    if args.only:
        sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.smoke:
        sections = tuple(s for s in sections if s != "ceiling")
    opts = dataclasses.replace(base, **given, sections=sections, py_spy=find_py_spy(args.py_spy))
    problem = _check(opts)
    if problem:
        parser.error(problem)
    output = args.output
    if output is None and set(sections) == set(SECTIONS) and not opts.smoke:
        output = DEFAULT_OUTPUT
    return opts, args.dsn, output


def _check(opts: Options) -> str:
    if opts.runs < 1 or opts.repeats < 1:
        return "--runs and --repeats must be >= 1"
    if not opts.concurrency or not opts.processes or not opts.drain_concurrency:
        return "--concurrency, --processes and --drain-concurrency need at least one value"
    if min(opts.concurrency + opts.drain_concurrency) < 1 or min(opts.processes) < 1:
        return "concurrency levels and process counts must be >= 1"
    if min(opts.scale_runs, opts.retention_runs, opts.retention_rowwise_runs) < 1:
        return "--scale-runs, --retention-runs and --retention-rowwise-runs must be >= 1"
    if opts.pool_size is not None and opts.pool_size < 2:
        return "--pool-size must be >= 2"
    return ""
