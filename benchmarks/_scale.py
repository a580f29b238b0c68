"""Scale: throughput with 10,000,000 finished runs in the tables (1,000,000 a day in
past days' partitions) versus empty tables, and the plans of the claim statement at that
size."""

from __future__ import annotations

import dataclasses

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from benchmarks import _internals
from benchmarks._harness import Harness
from benchmarks._load import Load, load_finished_runs, past_days
from benchmarks._measure import SagaRow, measure_saga
from benchmarks._sagas import build
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, TP_HEAD, tp_row
from benchmarks._window import Measured

# The loaded days end this many days before today (a few days back, as finished runs
# kept for a while are).
LAST_DAY_AGO = 3


@dataclasses.dataclass
class Scale:
    empty: list[Measured]
    big: list[Measured]
    load: Load
    custom_plan: str
    generic_plan: str

    @property
    def uses_due_index(self) -> bool:
        """Both plans read the loaded days' partitions through their due index."""
        days = self.load.days
        return _internals.uses_due_index(self.custom_plan, days) and _internals.uses_due_index(
            self.generic_plan, days
        )

    @property
    def ratio(self) -> float:
        """Throughput on the loaded tables ÷ on empty tables (medians)."""
        big = Stat.of([m.runs_per_s for m in self.big]).med
        return big / Stat.of([m.runs_per_s for m in self.empty]).med

    @property
    def pairs(self) -> Stat:
        """The same ratio within each repeat (loaded ÷ the empty window just before)."""
        return Stat.of(
            [b.runs_per_s / e.runs_per_s for e, b in zip(self.empty, self.big, strict=True)]
        )


#: At least this many measurements on each side: the target (within 10 %) is about as
#: wide as one measurement's noise here (a ratio of medians of 3 ranged 0.90-1.00 over
#: five full runs of unchanged code).
SCALE_REPEATS = 5
#: Each window runs this many times --runs (9,000 runs by default): a window of 3,000
#: lasted under a second here, and its noise alone was as wide as the target.
SCALE_WINDOW_FACTOR = 3


async def measure(h: Harness) -> Scale:
    c, p = HEADLINE
    big_db, big_dsn = await h.saga_database("scale_big")
    runs = h.opts.scale_runs
    load = await load_finished_runs(h, big_dsn, runs, past_days(runs, LAST_DAY_AGO))
    custom, generic = await explain_claim(big_dsn)
    empty: list[Measured] = []
    big: list[Measured] = []
    row = SagaRow(concurrency=c, processes=p, runs=h.opts.runs * SCALE_WINDOW_FACTOR)
    for repeat in range(max(h.opts.repeats, SCALE_REPEATS)):
        empty.append(await measure_saga(h, row, f"scale_empty_r{repeat}"))
        big.append(await measure_saga(h, row, f"scale_big_r{repeat}", database=(big_db, big_dsn)))
    await h.drop(big_db)
    return Scale(empty, big, load, custom, generic)


async def explain_claim(dsn: str) -> tuple[str, str]:
    """EXPLAIN of saga's claim statement on the loaded tables: the custom plan with
    ANALYZE (1,000 due runs inserted first; everything rolled back), and the generic
    plan a prepared statement may switch to."""
    definition = build("noop")
    args = _internals.claim_args(definition, 64)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        claim, types = _internals.claim_statement(pool)
        async with pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                due = (definition.name, definition.version, definition.fingerprint)
                await conn.execute(_internals.INSERT_DUE_RUNS, *due)
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + claim, *args)
                custom = "\n".join(r[0] for r in rows)
            finally:
                await tr.rollback()
            generic = await _generic_plan(conn, claim, types, args)
    finally:
        await pool.close()
    return custom, generic


async def _generic_plan(
    conn: PoolConnectionProxy[asyncpg.Record],
    claim: str,
    types: tuple[str, ...],
    args: tuple[object, ...],
) -> str:
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE bench_claim({', '.join(types)}) AS {claim}")
    # EXECUTE takes no bind parameters: let the server quote them as literals.
    quote = ", ".join(f"${i + 1}::{t}" for i, t in enumerate(types))
    execute = await conn.fetchval(
        f"SELECT format('EXECUTE bench_claim({', '.join('%L' for _ in types)})', {quote})",
        *args,
    )
    rows = await conn.fetch(f"EXPLAIN (COSTS OFF) {execute}")
    await conn.execute("DEALLOCATE bench_claim")
    await conn.execute("RESET plan_cache_mode")
    return "\n".join(r[0] for r in rows)


def _days(load: Load) -> str:
    first, last = load.days[0], load.days[-1]
    return f"{first}" if first == last else f"{first} to {last}"


def render(s: Scale, scale_runs: int, ceiling: float) -> list[str]:
    load = s.load
    c, p = HEADLINE
    return [
        f"## Scale: {scale_runs:,} finished runs",
        "",
        f"{load.runs:,} finished runs ({load.runs_size} with indexes) and "
        f"{load.events:,} events ({load.events_size}) were bulk-inserted with "
        "`INSERT ... SELECT generate_series`, cloned from one real run of the no-op saga "
        "(status completed, due_at NULL, finished_at set, every column as saga writes it), "
        f"{load.per_run} events per run (a real run has {load.real_events}) and its end "
        "mark (watches row), each clone with a UUIDv7 id of its creation time, spread "
        f"evenly over {len(load.days)} whole past UTC day(s) ({_days(load)}, at most "
        "1,000,000 runs a day) in those days' partitions (created first); the partitioned "
        "indexes dropped during the load and rebuilt after, then `VACUUM ANALYZE` and "
        "`CHECKPOINT`: "
        f"{load.seconds:.0f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in load.timings.items())
        + f"). Then the same measurement ({p} process x {c}, {s.empty[0].runs:,} runs "
        f"per window) alternately on a fresh empty database and on the loaded one, "
        f"{len(s.empty)} times each.",
        "",
        *TP_HEAD,
        tp_row("empty tables", s.empty, ceiling),
        tp_row(f"{load.runs:,} finished runs", s.big, ceiling),
        "",
        f"Loaded ÷ empty: {s.ratio:.2f} (medians); within each repeat {s.pairs.fmt(2)}.",
        "",
        'Claim statement (`Store._q["claim"]`) on the loaded tables, custom plan with '
        "`EXPLAIN (ANALYZE, BUFFERS)` (1,000 due runs inserted first in the same, "
        "rolled-back transaction; limit 64):",
        "",
        "```",
        s.custom_plan,
        "```",
        "",
        "Generic plan (`plan_cache_mode = force_generic_plan`, as a prepared statement may "
        "use after five executions):",
        "",
        "```",
        s.generic_plan,
        "```",
        "",
    ]
