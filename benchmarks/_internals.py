"""Everything in ``benchmarks/`` that depends on saga beyond its public API.

This module touches **private API** (``saga._store.Store``) and **saga's table layout**
(schema ``saga``: ``runs``, ``events``). The benchmarks need both on purpose:

- the scale section EXPLAINs the claim statement exactly as saga sends it, which only the
  store knows (``Store._q["claim"]``, its ``$n`` parameters in order);
- the profile section counts ``Store`` calls per run in the worker process, by wrapping
  the store's methods (a benchmark-only monkeypatch);
- the harness times and checks runs from the server's own clock and state (``created_at``,
  ``finished_at``, ``step_started`` events), and the scale section clones finished runs
  column by column;
- the waits section sees when every run is parked (``status = 'waiting'``), times from the
  first signal received (``signals.received_at``), and sorts the write transactions by
  the events they inserted (``events.xmin``).

Every other module uses the public ``saga`` API only, so when the core is reshaped,
this is the one file that must follow (the smoke test, ``tests/test_benchmarks_smoke.py``,
runs the parts that use it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import saga
from benchmarks._base import BenchmarkError

# -- private API: the store ------------------------------------------------------------

# Store calls counted while a window runs with "count_calls" (the profile rows): how many
# claims, transitions, heartbeats, ... a run costs, and how many items the claims returned.
COUNTED = (
    "start_run",
    "claim",
    "transition",
    "heartbeat",
    "release",
    "census",
    "count_unclaimable",
    "watch_run",
    "get_run",
    "notify_work",
)
_calls: dict[str, int] = {}


def count_store_calls() -> None:
    """Wrap saga's ``Store`` methods (once per process) to count calls."""
    from saga._store import Store

    if getattr(Store, "_bench_counted", False):
        return
    for name in COUNTED:
        original = getattr(Store, name, None)
        if original is None:
            raise BenchmarkError(f"saga's Store has no {name}(): update benchmarks/_internals.py")
        setattr(Store, name, _counting(name, original))
    Store._bench_counted = True  # type: ignore[attr-defined]  # a marker on a private class


def _counting(name: str, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def counted(self: object, *args: object, **kwargs: object) -> Any:
        result = await original(self, *args, **kwargs)
        _calls[name] = _calls.get(name, 0) + 1
        if name == "claim":
            _calls["claimed items"] = _calls.get("claimed items", 0) + len(result)
            if not result:
                _calls["empty claims"] = _calls.get("empty claims", 0) + 1
        return result

    return counted


def take_calls() -> dict[str, int]:
    """The calls counted since the last take (and reset the counts)."""
    calls = dict(_calls)
    _calls.clear()
    return calls


_CLAIM_TYPES = ("text", "int", "float8", "text[]", "int[]", "text[]")
_TABLE_TYPES = ("text[]", "boolean[]", "boolean[]", "text[]", "text[]", "text[]")


def claim_statement(pool: asyncpg.Pool) -> tuple[str, tuple[str, ...]]:
    """The claim statement as saga sends it, and its parameter types (for PREPARE)."""
    from saga._store import Store

    return Store(pool)._q["claim"], _CLAIM_TYPES + _TABLE_TYPES


def claim_args(definition: saga.Saga[Any], limit: int) -> tuple[object, ...]:
    """The claim's parameters: worker id, max items, lease seconds, the registered
    definitions (names, versions, fingerprints, pairwise), then the claim table's
    columns (status before, cancel requested, signalled, status after, wake-up event,
    start event)."""
    from saga._claims import claim_table_args

    name, version, fp = definition.name, definition.version, definition.fingerprint
    return (
        "bench-explain",
        limit,
        30.0,
        [name, name],
        [version, version],
        [fp, "-"],
        *claim_table_args(),
    )


# -- the schema: saga's tables -----------------------------------------------------------

TABLES = ("saga.runs", "saga.events")
DUE_INDEX = "runs_due"  # the partial index the claim must use

# What a correctly finished run looks like, per benchmark saga.
FINISHED_OK = {
    "noop": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 3",
    "compensate": "status = 'compensated' AND error->>'type' = 'saga.PermanentError'",
    "gate": "status = 'completed' AND output::text = '1'",
    "noop2": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 2",
    "wait": "status = 'completed' AND output::text = '1' "
    "AND completed_steps = '{s1,decision,s2}' AND results->>'decision' = '{\"approved\":true}'",
    "fanout": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 5",
}

# Runs finished since $1. The partial index runs_finished_at keeps this cheap at 1M rows.
DONE_SINCE = "SELECT count(*) FROM saga.runs WHERE due_at IS NULL AND finished_at >= $1"
COMPLETED = "SELECT count(*) FROM saga.runs WHERE status = 'completed'"
LEASED = "SELECT count(*) FROM saga.runs WHERE status = 'running' AND lease_owner IS NOT NULL"
# Runs parked at a wait (their step before it completed, no lease held).
WAITING = "SELECT count(*) FROM saga.runs WHERE status = 'waiting' AND lease_owner IS NULL"


def span_sql(kind: str) -> str:
    """The runs created since $1: first start, last and p99 finish, first claim, first
    signal received, count, correctly finished count, lease expiries."""
    return f"""
        WITH r AS (SELECT * FROM saga.runs WHERE created_at >= $1)
        SELECT min(created_at) AS first_start, max(finished_at) AS last_done,
               percentile_disc(0.99) WITHIN GROUP (ORDER BY finished_at) AS p99_done,
               count(*) AS n, count(*) FILTER (WHERE {FINISHED_OK[kind]}) AS ok,
               (SELECT count(*) FROM saga.events e JOIN r ON e.run_id = r.id
                WHERE e.kind = 'lease_expired') AS expiries,
               (SELECT min(e.at) FROM saga.events e JOIN r ON e.run_id = r.id
                WHERE e.kind = 'step_started') AS first_claim,
               (SELECT min(s.received_at) FROM saga.signals s JOIN r ON s.run_id = r.id)
                AS first_signal
        FROM r
        """


# The write transactions that wrote the runs' history (every run in the database), by
# the kinds of event each wrote (events are never updated: an event's xmin is the id of
# the transaction that inserted it): ``kinds`` (sorted, comma-separated) -> transactions.
WRITES_BY_EVENTS = """
    WITH tx AS (
        SELECT xmin::text AS xid, string_agg(DISTINCT kind, ',' ORDER BY kind) AS kinds
        FROM saga.events
        GROUP BY 1
    )
    SELECT kinds, count(*) AS n FROM tx GROUP BY kinds ORDER BY n DESC, kinds
    """


# A transaction that wrote only events of these kinds is a claim (a transition that
# leases the next step writes step_completed too).
CLAIM_EVENTS = frozenset({"step_started", "woke", "lease_expired"})

# Per run of $1 (ids): created-to-finished and created-to-first-claim, in seconds.
RUN_TIMES = """
    SELECT extract(epoch FROM r.finished_at - r.created_at)::float8 AS s,
           extract(epoch FROM c.at - r.created_at)::float8 AS claim
    FROM saga.runs r
    JOIN LATERAL (SELECT min(at) AS at FROM saga.events e
                  WHERE e.run_id = r.id AND e.kind = 'step_started') c ON true
    WHERE r.id = ANY($1)
    """

# 1,000 due runs of one definition ($1 name, $2 version, $3 fingerprint) for EXPLAIN.
INSERT_DUE_RUNS = """
    INSERT INTO saga.runs (id, saga_name, saga_version, fingerprint, input, step_name, due_at)
    SELECT gen_random_uuid(), $1, $2, $3, jsonb_build_object('i', g)::text, 's1',
           now() - interval '1 s'
    FROM generate_series(1, 1000) g
    """

# Cloning finished runs: every column of saga.runs as the template run has it (the column
# list is read from the table, so a new column cannot be skipped silently), except these.
# ``at`` is the clone's creation time, ``d`` the template's duration, ``g`` its number.
RUN_CLONE_OVERRIDES = {
    "id": "gen_random_uuid()",
    "idempotency_key": "NULL",
    "input": "jsonb_build_object('i', g)::text",
    "due_at": "NULL",
    "lease_owner": "NULL",
    "cancel_requested": "false",
    "released": "false",
    "created_at": "at",
    "updated_at": "at + d",
    "finished_at": "at + d",
}
RUN_COLUMNS = """
    SELECT column_name FROM information_schema.columns
    WHERE table_schema = 'saga' AND table_name = 'runs' ORDER BY ordinal_position
    """


def clone_runs_sql(columns: list[str]) -> str:
    """$2 clones of the run $1, created 2 s apart from 30 days ago."""
    values = ", ".join(RUN_CLONE_OVERRIDES.get(c, f"t.{c}") for c in columns)
    return f"""
        INSERT INTO saga.runs ({", ".join(columns)})
        SELECT {values}
        FROM saga.runs t,
             generate_series(1, $2) AS g,
             LATERAL (SELECT now() - interval '30 days' + g * interval '2 s' AS at,
                             t.finished_at - t.created_at AS d) x
        WHERE t.id = $1
        """


# The first $2 events of the run $1, for every other run, shifted to its creation time.
CLONE_EVENTS = """
    INSERT INTO saga.events (run_id, at, kind, step, attempt, worker, data)
    SELECT r.id, r.created_at + (e.at - t.created_at), e.kind, e.step,
           e.attempt, e.worker, e.data
    FROM saga.runs r
    CROSS JOIN (SELECT * FROM saga.events WHERE run_id = $1 ORDER BY id LIMIT $2) e
    CROSS JOIN (SELECT created_at FROM saga.runs WHERE id = $1) t
    WHERE r.id <> $1
    """
EVENTS_OF = "SELECT count(*) FROM saga.events WHERE run_id = $1"
