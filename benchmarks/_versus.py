"""Versus (issue 15): saga beside two hand-written queues, in one run on the same cluster.

Every row drains pre-started 3-step chains (or, "embedded", starts them in the process
that executes them), repeat by repeat interleaved: the unbatched queue at 1, 16 and 64
tasks (its best is the reference), the batched queue (16 jobs per claim) at 4 and 16
tasks, saga drain at 1 process x 64, 1 x 128, 1 x 1 and 4 x 64, and saga embedded (1 x
64, the runs started by 32 tasks of the same process through the same orchestrator).
Then the issue's targets, met or missed (reported, never asserted): the drain ratios
take saga at its best one-process concurrency (64 or 128), as each queue at its best.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Literal

from benchmarks._base import STARTERS, fmt, verdict
from benchmarks._harness import Harness
from benchmarks._measure import QueueRow, SagaRow, embedded_client, measure_queue, measure_saga
from benchmarks._queue import BATCH
from benchmarks._stat import Stat
from benchmarks._throughput import NOISY_OTHER_CPU
from benchmarks._window import Measured

Family = Literal["queue", "batched", "drain", "embedded"]
C1_SHARE = 3  # concurrency-1 rows run runs // 3 (their rate is steady; they are slow)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One row: a workload at a concurrency (queue: tasks) in some worker processes."""

    family: Family
    concurrency: int
    processes: int = 1

    @property
    def label(self) -> str:
        procs = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        what = {
            "queue": "queue unbatched, drain",
            "batched": f"queue batched ({BATCH} per claim), drain",
            "drain": "saga drain",
            "embedded": f"saga embedded ({STARTERS} starters in the process)",
        }[self.family]
        return f"{what}, {procs} x {self.concurrency}"

    def runs(self, runs: int) -> int:
        return max(1, runs // C1_SHARE) if self.concurrency == 1 else runs


SAGA_64 = Spec("drain", 64)
SAGA_128 = Spec("drain", 128)
SAGA_1 = Spec("drain", 1)
SAGA_4P = Spec("drain", 64, 4)
EMBEDDED = Spec("embedded", 64)
SPECS = (
    Spec("queue", 1),
    Spec("queue", 16),
    Spec("queue", 64),
    Spec("batched", 4),
    Spec("batched", 16),
    SAGA_64,
    SAGA_128,
    SAGA_1,
    SAGA_4P,
    EMBEDDED,
)
#: The one-process drain rows: saga at its best of these, as the queues at theirs.
SAGA_DRAINS = (SAGA_64, SAGA_128)

Versus = dict[Spec, list[Measured]]  # row -> repeats


async def measure(h: Harness) -> Versus:
    v: Versus = {}
    for repeat in range(h.opts.repeats):
        for spec in SPECS:
            v.setdefault(spec, []).append(await _once(h, spec, repeat))
    return v


async def _once(h: Harness, spec: Spec, repeat: int) -> Measured:
    runs = spec.runs(h.opts.runs)
    label = f"vs_{spec.family}_p{spec.processes}_c{spec.concurrency}_r{repeat}"
    if spec.family in ("queue", "batched"):
        batch = BATCH if spec.family == "batched" else None
        row = QueueRow(spec.concurrency, batch, drain=True, runs=runs)
        return await measure_queue(h, row, label)
    saga_row = SagaRow(
        concurrency=spec.concurrency,
        processes=spec.processes,
        drain=spec.family == "drain",
        runs=runs,
    )
    client = None
    if spec.family == "embedded":
        (worker,) = await h.ensure_workers(1)
        client = embedded_client(worker, runs)
    return await measure_saga(h, saga_row, label, client=client)


def _rps(ms: list[Measured]) -> Stat:
    return Stat.of([m.runs_per_s for m in ms])


def _us_per_step(ms: list[Measured]) -> Stat:
    return Stat.of([1e6 * m.worker_cpu / (m.items * m.runs) for m in ms])


def _writes(ms: list[Measured]) -> Stat:
    return Stat.of([m.writes_per_item for m in ms])


def best(v: Versus, family: Family) -> Spec | None:
    """The row of ``family`` with the highest median runs/s."""
    return _best(v, [s for s in v if s.family == family])


def _best(v: Versus, rows: list[Spec]) -> Spec | None:
    return max((s for s in rows if s in v), key=lambda s: _rps(v[s]).med, default=None)


@dataclasses.dataclass(frozen=True)
class Target:
    text: str
    measured: str
    reference: str
    ok: bool | None


def _ratio_target(v: Versus, text: str, spec: Spec, ref: Spec | None, least: float) -> Target:
    if spec not in v or ref is None:
        return Target(text, "n/a", "n/a", None)
    st, ref_st = _rps(v[spec]), _rps(v[ref])
    return Target(
        text,
        f"{st.ratio(ref_st.med)} x ({st.fmt()} runs/s, {spec.label})",
        f"{ref_st.fmt()} runs/s ({ref.label})",
        st.med / ref_st.med >= least,
    )


@dataclasses.dataclass(frozen=True)
class Figure:
    """A per-measurement figure over the repeats, and how it is written."""

    of: Callable[[list[Measured]], Stat]
    digits: int
    unit: str = ""

    def text(self, ms: list[Measured]) -> str:
        return self.of(ms).fmt(self.digits, self.unit)


CPU_PER_STEP = Figure(_us_per_step, 0, " µs")
WRITES = Figure(_writes, 2)


def _figure_target(
    v: Versus, text: str, spec: Spec, fig: Figure, most: float, refs: list[Spec | None]
) -> Target:
    if spec not in v:
        return Target(text, "n/a", "n/a", None)
    reference = [f"{fig.text(v[s])} ({s.label})" for s in refs if s is not None and s in v]
    return Target(
        text,
        f"{fig.text(v[spec])} ({spec.label})",
        "; ".join(reference) or "-",
        round(fig.of(v[spec]).med, fig.digits) <= most,  # as written in the table
    )


def targets(v: Versus) -> list[Target]:
    """Issue 15's targets, one each."""
    queue, batched = best(v, "queue"), best(v, "batched")
    saga = _best(v, list(SAGA_DRAINS)) or SAGA_64
    q64 = Spec("queue", 64) if Spec("queue", 64) in v else None
    q1 = Spec("queue", 1) if Spec("queue", 1) in v else None
    return [
        _ratio_target(
            v,
            "drain, 1 process at its best: ≥ 2 x the unbatched queue at its best",
            saga,
            queue,
            2.0,
        ),
        _ratio_target(
            v,
            "drain, 1 process at its best: ≥ 0.4 x the batched queue at its best",
            saga,
            batched,
            0.4,
        ),
        _ratio_target(
            v,
            "runs started by the same process (embedded): ≥ 1.5 x the unbatched queue at its best",
            EMBEDDED,
            queue,
            1.5,
        ),
        _figure_target(
            v, "worker CPU per step ≤ 60 µs", SAGA_64, CPU_PER_STEP, 60, [queue, batched]
        ),
        _figure_target(
            v, "write commits/step ≤ 0.5 at concurrency 64", SAGA_64, WRITES, 0.5, [q64, batched]
        ),
        _figure_target(v, "write commits/step ≤ 1.0 at concurrency 1", SAGA_1, WRITES, 1.0, [q1]),
        _ratio_target(v, "4 worker processes ≥ 1 process (drain)", SAGA_4P, SAGA_64, 1.0),
    ]


def summary(v: Versus) -> list[str]:
    """The line of the report's Targets table."""
    if not v:
        return []
    ts = targets(v)
    missed = [t.text for t in ts if t.ok is False]
    met = sum(1 for t in ts if t.ok)
    return [
        f"| issue 15, saga beside hand-written queues (section Versus) | {met} of "
        f"{len(ts)} met" + (f"; missed: {'; '.join(missed)}" if missed else "") + f" | "
        f"{verdict(not missed if met or missed else None)} |"
    ]


HEAD = (
    "| workload | runs/s | steps/s | runs/s ÷ best unbatched | runs/s ÷ best batched "
    "| write commits/step | all commits/step | worker CPU µs/step "
    "| CPU cores: workers / this process / postgres | backend states (sampled) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
)


def _row(spec: Spec, ms: list[Measured], queue: float, batched: float) -> str:
    rps = _rps(ms)
    steps = Stat.of([m.items * m.runs_per_s for m in ms])
    med = statistics.median
    cores = " / ".join(
        fmt(med(getattr(m, part) / m.wall for m in ms), 2)
        for part in ("worker_cpu", "client_cpu", "postgres_cpu")
    )
    noisy = " †" if max(m.other_cpu for m in ms) > NOISY_OTHER_CPU else ""
    warn = " ⚠" if any(m.lease_expiries for m in ms) else ""
    return (
        f"| {spec.label}{noisy}{warn} | {rps.fmt()} | {steps.fmt()} | {rps.ratio(queue)} | "
        f"{rps.ratio(batched)} | {_writes(ms).fmt(2)} | "
        f"{Stat.of([m.commits_per_item for m in ms]).fmt(2)} | {_us_per_step(ms).fmt(0)} | "
        f"{cores} | {ms[len(ms) // 2].waits} |"
    )


def render(v: Versus, runs: int, repeats: int) -> list[str]:
    if not v:
        return []
    queue, batched = best(v, "queue"), best(v, "batched")
    q = _rps(v[queue]).med if queue else 0.0
    b = _rps(v[batched]).med if batched else 0.0
    lines = [
        "## Versus: saga beside hand-written queues (issue 15)",
        "",
        f"One run, this cluster, durable settings; median (min-max) of {repeats} repeats, "
        f"interleaved row by row; a fresh database per measurement. {runs:,} chains or "
        f"runs of 3 no-op steps per measurement ({max(1, runs // C1_SHARE):,} at "
        "concurrency 1). **drain**: all started first (32 starters, 4 connections), then "
        "the worker process(es) open while a transaction of the benchmark locks every "
        "run, and its commit (with a NOTIFY) lets them all claim at once; runs/s = N / "
        "(first claim to last finish, server clock); their CPU and write transactions "
        "while opening are not counted. **embedded**: one worker process opens "
        "`saga.Orchestrator(dsn, "
        f"concurrency=64)` and {STARTERS} tasks of that process start the N runs with "
        "`await orch.start(...)` while it executes them; runs/s = N / (first start to last "
        "finish). Queue unbatched: claim one job (`SKIP LOCKED`), complete it and insert "
        f"the next in a second statement (2 commits per step); batched: claim up to {BATCH} "
        "in one statement, complete them all and insert their next steps in one "
        "statement. Queue concurrency = worker tasks, saga's = the orchestrator's "
        "`concurrency` per process; the drain targets compare each at its best (saga: "
        "the faster of its one-process rows at 64 and 128). Worker CPU µs/step = CPU "
        "seconds of the worker process(es) / 3N. A figure meets its bound as the table "
        "writes it: at concurrency 1 a drain of N runs writes 3N + 1 transactions, one per "
        "step (the last of a run claims the next run) and the claim of the first run, so "
        "its commits/step is 1 + 1/3N (1.0003 at N = 1,000), written 1.00.",
        "",
        "| target | measured | reference | verdict |",
        "| --- | --- | --- | --- |",
        *(f"| {t.text} | {t.measured} | {t.reference} | {verdict(t.ok)} |" for t in targets(v)),
        "",
        *HEAD,
        *(_row(spec, ms, q, b) for spec, ms in v.items()),
        "",
        "write commits/step = (transactions assigned an xid - the S that started the runs "
        "- the drain's opening) / 3N, cluster-wide (S counted from the run_started events' "
        "xmin: starts made together share a transaction); "
        "all commits/step also counts read-only transactions (empty claims, NOTIFY reads). "
        "This process = the benchmark (polling; the drain rows' starts ran before the "
        f"window). † = more than {NOISY_OTHER_CPU} cores busy outside our processes and "
        "the cluster (noisy); ⚠ = some run waited for a lease to expire.",
        "",
    ]
    return lines
