"""Waits: what a wait costs in commits. 2-step no-op sagas with a signal wait between the
steps (s1, ``wait_for("decision")``, s2): a client starts N runs; once every run is parked
at the wait, it signals each, and the runs complete. Beside it, the plain 2-step saga
(s1, s2), measured the same way in the same sitting, repeat by repeat."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import uuid
from collections.abc import AsyncIterator

import anyio
import asyncpg

import saga
from benchmarks import _internals
from benchmarks._base import STARTERS, BenchmarkError, start_concurrently, verdict
from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, measure_saga
from benchmarks._sagas import SIGNAL, Decision, Input, build
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, NOISY_OTHER_CPU
from benchmarks._window import Client, Measured, Parking, StartAll

# Write commits per run beyond claims, as the design says: start, s1 (which leases s2),
# s2; with a wait: start, s1 (which enters the wait), the signal, s2.
EXPECTED = {"noop2": 3, "wait": 4}
# What a wait may add beyond claims: the signal itself (at most one commit each: signals
# sent at about the same time share one), and less
# sharing of the step completions around it than the plain run's (nearly free at
# concurrency 64): entering the wait is group-committed as any step completion (its
# signal row marked in the same statement), but the completions after the signals come
# as the signals trickle in, a few per batch.
WAIT_COMMITS = 2
SLACK = 0.1  # stray write transactions (autoanalyze, heartbeats, the workers' open/close)


@dataclasses.dataclass
class Row:
    """One measurement, and its write transactions by the events they wrote."""

    measured: Measured
    by_events: dict[str, int]

    @property
    def claims(self) -> int:
        """Write transactions that wrote claim events only."""
        return sum(
            n
            for kinds, n in self.by_events.items()
            if set(kinds.split(",")) <= _internals.CLAIM_EVENTS
        )

    @property
    def writes_per_run(self) -> float:
        return self.measured.write_xacts / self.measured.runs

    @property
    def claims_per_run(self) -> float:
        return self.claims / self.measured.runs

    @property
    def beyond_claims_per_run(self) -> float:
        return self.writes_per_run - self.claims_per_run


@dataclasses.dataclass
class Waits:
    plain: list[Row] = dataclasses.field(default_factory=list)
    waits: list[Row] = dataclasses.field(default_factory=list)


async def measure(h: Harness) -> Waits:
    c, p = HEADLINE
    w = Waits()
    for r in range(h.opts.repeats):
        w.plain.append(await _row(h, SagaRow("noop2", c, p), f"plain2_c{c}_r{r}"))
        w.waits.append(await _row(h, SagaRow("wait", c, p), f"waits_c{c}_r{r}"))
    return w


async def _row(h: Harness, row: SagaRow, label: str) -> Row:
    db, dsn = await h.saga_database(label)
    parking = Parking(_internals.WAITING) if row.kind == "wait" else None
    client = waits_client(h.opts.runs, parking.parked) if parking else None
    m = await measure_saga(h, row, label, database=(db, dsn), client=client, parking=parking)
    conn = await asyncpg.connect(dsn)  # after the window: its counters are read already
    try:
        by_events = {r["kinds"]: int(r["n"]) for r in await conn.fetch(_internals.WRITES_BY_EVENTS)}
    finally:
        await conn.close()
    await h.drop(db)
    return Row(m, by_events)


def waits_client(runs: int, parked: anyio.Event) -> Client:
    """Starts ``runs`` runs of ``bench_wait`` (STARTERS tasks), awaits ``parked`` (set by
    the window once all are waiting), then signals each (STARTERS tasks): a client-only
    orchestrator (concurrency=0) on its own pool, as the other rows' client."""
    definition = build("wait")

    @contextlib.asynccontextmanager
    async def client(dsn: str) -> AsyncIterator[StartAll]:
        async with saga.Orchestrator(dsn, sagas=[definition], concurrency=0, migrate=False) as orch:
            ids: list[uuid.UUID] = []

            async def start(i: int) -> None:
                ids.append((await orch.start(definition, Input(i=i))).id)

            async def signal(i: int) -> None:
                if not await orch.signal(ids[i], SIGNAL, Decision(approved=True)):
                    raise BenchmarkError(f"the signal to run {ids[i]} was not recorded")

            async def start_then_signal() -> None:
                await start_concurrently(runs, start)
                await parked.wait()
                await start_concurrently(runs, signal)

            yield start_then_signal

    return client


def _stat(rows: list[Row], key: str) -> Stat:
    return Stat.of([float(getattr(r, key)) for r in rows])


def _delta(w: Waits, key: str) -> Stat:
    """waits minus plain, repeat by repeat."""
    pairs = zip(w.waits, w.plain, strict=True)
    return Stat.of([getattr(a, key) - getattr(b, key) for a, b in pairs])


def target(w: Waits | None) -> list[str]:
    """The Targets row: entering a wait adds no commit, a signal at most one, waking a
    claim."""
    if w is None or not w.waits or not w.plain:
        return []
    beyond = _delta(w, "beyond_claims_per_run")
    return [
        "| entering a wait adds no commit beyond the step completion before it; a signal "
        "is at most one commit; waking is one claim (write commits/run beyond claims, waits - "
        f"plain 2-step ≤ {WAIT_COMMITS + SLACK:.1f}: the signal, and the step completions "
        "around it, shared by fewer runs than the plain run's) | "
        f"beyond claims: {beyond.fmt(2)} "
        f"({_stat(w.waits, 'beyond_claims_per_run').fmt(2)} vs "
        f"{_stat(w.plain, 'beyond_claims_per_run').fmt(2)}); all write commits/run "
        f"{_stat(w.waits, 'writes_per_run').fmt(2)} vs {_stat(w.plain, 'writes_per_run').fmt(2)}"
        f"; claims/run {_stat(w.waits, 'claims_per_run').fmt(2)} vs "
        f"{_stat(w.plain, 'claims_per_run').fmt(2)} | "
        f"{verdict(beyond.med <= WAIT_COMMITS + SLACK)} |"
    ]


HEAD = (
    "| workload | runs/s | write commits/run | of which claims | beyond claims "
    "(expected) | all commits/run | WAL fsyncs/run | worker CPU ms/run | CPU cores: "
    "workers / client / postgres | backend states (sampled) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
)


def _table_row(label: str, rows: list[Row], expected: int) -> str:
    ms = [r.measured for r in rows]
    med = statistics.median
    rps = Stat.of([m.runs_per_s for m in ms])
    commits = Stat.of([m.commits / m.runs for m in ms])
    fsyncs = Stat.of([m.wal_syncs / m.runs for m in ms])
    wcpu = Stat.of([m.worker_ms_per_run for m in ms])
    noisy = " †" if max(m.other_cpu for m in ms) > NOISY_OTHER_CPU else ""
    warn = " ⚠" if any(m.lease_expiries for m in ms) else ""
    cores = (
        f"{med(m.worker_cpu / m.wall for m in ms):.2f} / "
        f"{med(m.client_cpu / m.wall for m in ms):.2f} / "
        f"{med(m.postgres_cpu / m.wall for m in ms):.2f}"
    )
    return (
        f"| {label}{noisy}{warn} | {rps.fmt()} | {_stat(rows, 'writes_per_run').fmt(2)} | "
        f"{_stat(rows, 'claims_per_run').fmt(2)} | "
        f"{_stat(rows, 'beyond_claims_per_run').fmt(2)} ({expected}) | {commits.fmt(2)} | "
        f"{fsyncs.fmt(2)} | {wcpu.fmt(2)} | {cores} | {ms[len(ms) // 2].waits} |"
    )


def _by_events(w: Waits) -> list[str]:
    kinds = sorted(
        {k for r in [*w.plain, *w.waits] for k in r.by_events},
        key=lambda k: (k.count(","), k),
    )

    def per_run(rows: list[Row], k: str) -> str:
        return Stat.of([r.by_events.get(k, 0) / r.measured.runs for r in rows]).fmt(2)

    lines = [
        "Write transactions per run by the events they wrote (an event's `xmin` is the "
        "transaction that inserted it; a claim writes `step_started`, and `woke` when it "
        "wakes a parked run):",
        "",
        "| events written | plain 2-step | 2-step with a wait |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| `{k}` | {per_run(w.plain, k)} | {per_run(w.waits, k)} |" for k in kinds]
    return [*lines, ""]


def render(w: Waits | None, repeats: int) -> list[str]:
    if w is None or not w.waits:
        return []
    c, p = HEADLINE
    runs = w.waits[0].measured.runs
    return [
        "## Waits: what a wait costs",
        "",
        f"{runs:,} runs per measurement of a 2-step no-op saga with a wait between the steps "
        '(`s1`, `wait_for("decision", Decision, timeout=1 h)`, `s2`), '
        f"{p} worker process x {c}: the client in this process starts them ({STARTERS} "
        "starters); once every run is parked at the wait (`waiting`, no lease), it sends "
        f"each its signal (`signal()`, {STARTERS} concurrent senders on its 4 connections) "
        "and the runs complete; runs/s = N / (first signal received to last finish). "
        "Beside it the plain 2-step no-op saga (`s1`, `s2`), started while the worker runs "
        "it: runs/s = N / (first start to last finish). Commits and CPU per run cover each "
        "run's whole life, start to finish: write commits/run = transactions that were "
        "assigned a transaction id / N (cluster-wide), claims = those that wrote claim "
        "events only (from the runs' history, below); all commits/run = Δ "
        "pg_stat_database.xact_commit (minus the benchmark's own queries) / N. Median "
        f"(min-max) of {repeats} repeats, interleaved; a fresh database per measurement.",
        "",
        *HEAD,
        _table_row(f"plain 2-step, {p} process x {c}", w.plain, EXPECTED["noop2"]),
        _table_row(f"2-step with a wait, {p} process x {c}", w.waits, EXPECTED["wait"]),
        "",
        "Expected beyond claims: start 1, s1 1 (leasing s2 in the same write), s2 1 = 3; "
        "with a wait: start 1, s1 1 (entering the wait in the same write), the signal 1 "
        "(at most: signals sent at about the same time share a commit), s2 1 = 4. "
        "Claims are batched (one claim leases every due run, up to the free slots), so "
        "each run costs a share of one: at most 1 (plain) and 2 (with a wait: the first "
        "claim and the one that wakes it), i.e. at most 4 and 6 write commits "
        "per run in all. Beyond claims also counts what writes no history: the client's "
        "coalesced wake-up NOTIFYs after starts (a NOTIFY is assigned a transaction id), "
        "heartbeats, autoanalyze; the two rows share them, the difference cancels them. "
        "WAL fsyncs/run: a commit that sent a NOTIFY holds a cluster-wide lock through its "
        "WAL flush, so such commits cannot share an fsync.",
        "",
        *_by_events(w),
        *_statements(w),
    ]


def _statements(w: Waits) -> list[str]:
    """--statements: the statements each row cost (first repeat)."""
    lines: list[str] = []
    for label, rows in (("plain 2-step", w.plain), ("2-step with a wait", w.waits)):
        if rows[0].measured.statements:
            lines += [
                f"Statements per run (pg_stat_statements), {label}:",
                "",
                rows[0].measured.statements,
                "",
            ]
    return lines
