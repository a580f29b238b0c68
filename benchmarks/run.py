"""The benchmark suite: saga against the commit ceiling of the same Postgres, same sitting.

    .venv/bin/python benchmarks/run.py [--dsn DSN] [--only SECTIONS] [--repeats 3] ...
    .venv/bin/python -m benchmarks.run --smoke --dsn DSN      # seconds; what CI runs

Without ``--dsn`` it provisions a throwaway cluster with DURABLE settings on a unix
socket, and always stops and deletes it. It prints a markdown report and writes it to
``benchmarks/RESULTS.md`` (when every section ran) or ``--output``; exit 1 when a
measurement fails its checks. See benchmarks/README.md for the method and the options.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from this checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import anyio

from benchmarks import _report
from benchmarks._base import BenchmarkError, configure_logging, install_exit_handlers, say
from benchmarks._cluster import Cluster
from benchmarks._facts import (
    git_commit,
    load_average,
    machine,
    saga_fingerprint,
    server_facts,
    versions,
)
from benchmarks._harness import Harness
from benchmarks._options import Options, parse_args
from benchmarks._suite import Results, collect


async def run_suite(opts: Options, dsn: str, cluster: Cluster | None) -> tuple[Results, str]:
    """Measure every selected section on the server at ``dsn``; the results and the
    report. Installs no signal handler and configures no logging (``main`` does)."""
    started = time.monotonic()
    load_before = load_average()
    version, settings = await server_facts(dsn)
    say(f"{version}; {settings}")
    fingerprint, commit = saga_fingerprint(), git_commit()
    async with Harness(dsn, cluster, opts) as harness:
        results = await collect(harness)
    changed = (
        "" if saga_fingerprint() == fingerprint else " (WARNING: saga/ changed during the run)"
    )
    header = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "Postgres": version + (" (throwaway cluster, unix socket)" if cluster else " (--dsn)"),
        "settings": settings,
        "versions": versions(),
        "saga commit": commit + changed,
        "suite time": f"{time.monotonic() - started:.0f} s (load average before: {load_before}, "
        f"after: {load_average()})",
        "defaults changed": opts.changed(),
        "py-spy": opts.py_spy or "not found (no profile samples)",
    }
    if opts.smoke:
        header["SMOKE RUN"] = _report.SMOKE_NOTE
    if opts.experiments():
        header["EXPERIMENT, not the default configuration"] = opts.experiments()
    return results, _report.render(results, opts, header)


def exit_code(exc: BaseException) -> int | None:
    """The code of a SystemExit (our SIGTERM/SIGHUP handler), also inside task groups."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            code = exit_code(inner)
            if code is not None:
                return code
    return None


def main(argv: list[str] | None = None) -> int:
    opts, dsn, output = parse_args(argv)
    configure_logging()
    cluster: Cluster | None = None
    try:
        if dsn is None:
            cluster = Cluster(preload="pg_stat_statements" if opts.statements else None)
            install_exit_handlers(cluster.stop)
            say(f"starting a throwaway durable cluster ({cluster.bindir})")
            cluster.start()
            dsn = cluster.dsn
        else:
            install_exit_handlers(lambda: None)  # SIGTERM still kills the worker processes
        _, text = anyio.run(run_suite, opts, dsn, cluster)
    except BenchmarkError as exc:
        say(f"FAILED: {exc}")
        return 1
    except BaseException as exc:
        code = exit_code(exc)
        if code is None:
            raise
        say(f"interrupted: exit {code}; everything started is stopped and removed")
        return code
    finally:
        if cluster is not None:
            cluster.stop()
    print(text)
    if output is not None:
        output.write_text(text)
        say(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
