"""The throughput sections: the hand-written queue (the "no framework" reference) and
3-step no-op sagas at each concurrency, in 1 and 2 worker processes, plus the drain rows
(concurrency 64 unless --drain-concurrency); interleaved repeat by repeat. Also the table
row every throughput-like section shares."""

from __future__ import annotations

import dataclasses
import statistics

from benchmarks._base import STARTERS, fmt
from benchmarks._cpu import CORES
from benchmarks._harness import Harness
from benchmarks._measure import QueueRow, SagaRow, measure_queue, measure_saga
from benchmarks._stat import Stat
from benchmarks._window import Measured

HEADLINE = (64, 1)  # (concurrency, worker processes) of the compensation/scale/tracing rows
NOISY_OTHER_CPU = 0.3  # cores busy outside our processes and the cluster

TP_HEAD = (
    "| workload | runs/s | steps/s | steps/s ÷ ceiling | runs/s ÷ queue (same concurrency) "
    "| write commits/step | all commits/step | worker CPU ms/run "
    "| CPU cores: workers / client / postgres | backend states (sampled) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
)

Rows = dict[tuple[int, int], list[Measured]]  # (concurrency, processes) -> repeats


@dataclasses.dataclass
class Throughput:
    queue: dict[int, list[Measured]] = dataclasses.field(default_factory=dict)
    saga: Rows = dataclasses.field(default_factory=dict)
    drain: Rows = dataclasses.field(default_factory=dict)


async def measure(h: Harness, queue: bool, sagas: bool) -> Throughput:
    t = Throughput()
    for repeat in range(h.opts.repeats):
        for c in h.opts.concurrency if queue else ():
            m = await measure_queue(h, QueueRow(c), f"queue_c{c}_r{repeat}")
            t.queue.setdefault(c, []).append(m)
        if sagas:
            await _saga_repeat(h, t, repeat)
    return t


async def _saga_repeat(h: Harness, t: Throughput, repeat: int) -> None:
    for p in h.opts.processes:
        for c in h.opts.concurrency:
            m = await measure_saga(
                h, SagaRow(concurrency=c, processes=p), f"saga_p{p}_c{c}_r{repeat}"
            )
            t.saga.setdefault((c, p), []).append(m)
    for p in h.opts.processes:
        for c in h.opts.drain_concurrency:
            row = SagaRow(concurrency=c, processes=p, drain=True)
            t.drain.setdefault((c, p), []).append(
                await measure_saga(h, row, f"drain_p{p}_c{c}_r{repeat}")
            )


def tp_row(label: str, ms: list[Measured], ceiling: float, vs: float | None = None) -> str:
    """One row of TP_HEAD: medians (min-max) over the repeats ``ms``."""
    rps = Stat.of([m.runs_per_s for m in ms])
    steps = Stat.of([ms[0].items * m.runs_per_s for m in ms])
    cpi = Stat.of([m.commits_per_item for m in ms])
    wpi = Stat.of([m.writes_per_item for m in ms])
    wcpu = Stat.of([m.worker_ms_per_run for m in ms])
    med = statistics.median
    pg = med(m.postgres_cpu / m.wall for m in ms)
    wc = med(m.worker_cpu / m.wall for m in ms)
    cc = med(m.client_cpu / m.wall for m in ms)
    noisy = " †" if max(m.other_cpu for m in ms) > NOISY_OTHER_CPU else ""
    warn = " ⚠" if any(m.lease_expiries for m in ms) else ""
    vs_txt = rps.ratio(vs) if vs else "-"
    return (
        f"| {label}{noisy}{warn} | {rps.fmt()} | {steps.fmt()} | "
        f"{steps.ratio(ceiling)} | {vs_txt} | {wpi.fmt(2)} | {cpi.fmt(2)} | "
        f"{wcpu.fmt(2)} | {wc:.2f} / {cc:.2f} / {pg:.2f} | {ms[len(ms) // 2].waits} |"
    )


def _by_processes(rows: Rows) -> list[tuple[tuple[int, int], list[Measured]]]:
    return sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def _procs(p: int) -> str:
    return f"{p} process{'es' if p > 1 else ''}"


def render(t: Throughput, ceiling: float, runs: int, repeats: int) -> list[str]:
    if not t.queue and not t.saga:
        return []
    lines = [
        "## Throughput: 3-step no-op chains",
        "",
        f"{runs:,} runs per measurement, started by a client in the benchmark "
        f"process ({STARTERS} concurrent starters, 4 connections) while the worker "
        f"process(es) execute them; runs/s = N / (first start to last finish, server "
        f"clock). Median (min-max) of {repeats} repeats, interleaved; a fresh "
        "database per measurement. write commits/step = (write transactions - S) / 3N, "
        "S = the transactions that started the runs (starts made together share one: "
        "counted from the run_started events' xmin), write transactions = those assigned "
        "a transaction id (they write WAL and wait for its flush), cluster-wide; all "
        "commits/step = (Δ pg_stat_database.xact_commit - S - the benchmark's own "
        "queries) / 3N, which also counts read-only transactions: empty claims, and the "
        "one each listening backend runs to read a NOTIFY.",
        "",
        *TP_HEAD,
    ]
    for c, ms in sorted(t.queue.items()):
        lines.append(tp_row(f"queue (no framework), 1 process x {c}", ms, ceiling))
    qmed = {c: Stat.of([m.runs_per_s for m in ms]).med for c, ms in t.queue.items()}
    for (c, p), ms in _by_processes(t.saga):
        lines.append(tp_row(f"saga, {_procs(p)} x {c}", ms, ceiling, qmed.get(c)))
    for (c, p), ms in _by_processes(t.drain):
        lines.append(tp_row(f"saga drain, {_procs(p)} x {c}", ms, ceiling))
    lines += [
        "",
        "Concurrency = the orchestrator's `concurrency` per worker process (queue: worker "
        "tasks); both use a pool of max(4, min(C + 2, 20)) connections per process (saga's "
        "worker processes a second one of that size for their leasing statements). "
        "÷ queue compares with the queue at the same concurrency (1 process). "
        'Client = this process starting runs. "drain": the runs are all started first, '
        "then the worker process(es) open; runs/s = N / (first claim to last finish), so "
        "no start competes for the CPU or the database (commits/step still subtracts the "
        "starts' S transactions from the whole window). † = more than "
        f"{NOISY_OTHER_CPU} cores busy outside our processes and the cluster (noisy); "
        "⚠ = some run waited for a lease to expire.",
        "",
    ]
    return lines + _details(t) + _statements(t)


def _details(t: Throughput) -> list[str]:
    details = [(f"queue x {c}", ms) for c, ms in sorted(t.queue.items())]
    details += [(f"saga {p}p x {c}", ms) for (c, p), ms in _by_processes(t.saga)]
    details += [(f"saga drain {p}p x {c}", ms) for (c, p), ms in _by_processes(t.drain)]
    lines = [
        "Details (medians; write xacts = transactions that wrote, cluster-wide; other CPU "
        f"= busy cores that are none of ours, of {CORES}):",
        "",
        "| workload | write xacts/run | WAL fsyncs/run | WAL bytes/run | starts/s "
        "| s to 99 % / 100 % | other CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    med = statistics.median
    for label, ms in details:
        lines.append(
            f"| {label} | {med(m.write_xacts / m.runs for m in ms):.2f} | "
            f"{med(m.wal_syncs / m.runs for m in ms):.2f} | "
            f"{med(m.wal_bytes / m.runs for m in ms):,.0f} | "
            f"{med(m.start_rate for m in ms):,.0f} | "
            f"{med(m.p99_seconds for m in ms):.2f} / {med(m.seconds for m in ms):.2f} | "
            f"{fmt(med(m.other_cpu for m in ms), 2)} |"
        )
    return [*lines, ""]


def _statements(t: Throughput) -> list[str]:
    """--statements: per measurement, the statements it cost (first repeat)."""
    rows = [(f"queue x {c}", ms) for c, ms in sorted(t.queue.items())]
    rows += [(f"saga {p}p x {c}", ms) for (c, p), ms in _by_processes(t.saga)]
    rows += [(f"saga drain {p}p x {c}", ms) for (c, p), ms in _by_processes(t.drain)]
    lines: list[str] = []
    for label, ms in rows:
        if ms[0].statements:
            lines += [
                f"Statements per run (pg_stat_statements), {label}:",
                "",
                ms[0].statements,
                "",
            ]
    return lines
