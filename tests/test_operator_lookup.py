"""Finding and counting runs from Python (saga.list_runs(key=...), saga.count_runs) on a
real PostgreSQL, and the query plans that keep the key lookup cheap with many runs."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import saga
from saga._store import Store
from tests._sagas import Job, parked_saga
from tests.conftest import ClientFactory, OrchestratorFactory
from tests.test_operator import age, finished_runs, quick_saga

# Keys as operators meet them: business ids with punctuation, spaces, quotes, non-ASCII
# text, separators, SQL wildcards, and the longest key start() accepts (512 characters).
KEYS = [
    "order-1",
    'o\'brien "quoted"',
    "  spaced  out  ",
    "ключ-ü-日本-😀",
    "tenant:42:order:7",
    "100%_like",
    "back\\slash",
    "k" * 511 + "é",
]


async def test_list_runs_by_key_is_an_exact_match_for_every_kind_of_key(
    open_client: ClientFactory,
) -> None:
    """key= finds exactly the run started with that key, whatever its characters
    (quotes, spaces, unicode, ':', SQL wildcards, 512 characters); a prefix, a
    different case, a wildcard pattern or a longer key than any run has finds nothing."""
    parked = parked_saga()
    client = await open_client(parked)
    runs = {key: await client.start(parked, Job(n=i), key=key) for i, key in enumerate(KEYS)}
    await client.start(parked, Job(n=99))  # no key at all

    for key, run in runs.items():
        page = await saga.list_runs(client, key=key)
        assert [r.id for r in page.runs] == [run.id], key
        assert page.runs[0].key == key
        assert page.next_before is None
    for near_miss in ["order", "order-10", "ORDER-1", "order-_", "100%", "%", "_", "k" * 512]:
        assert (await saga.list_runs(client, key=near_miss)).runs == [], near_miss
    assert (await saga.list_runs(client, key="x" * 100_000)).runs == []


async def test_list_runs_by_key_across_sagas_combines_with_every_filter(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """The same key used by two sagas gives both runs, newest first; saga=, status=,
    older_than= and limit=/before= paging narrow them as they narrow any listing."""
    alpha, beta = parked_saga("alpha"), parked_saga("beta")
    client = await open_client(alpha, beta)
    a = await client.start(alpha, Job(n=1), key="shared:1")
    b = await client.start(beta, Job(n=2), key="shared:1")
    await client.start(alpha, Job(n=3), key="shared:2")
    await age(db, a.id, created=7200, finished=0)

    page = await saga.list_runs(client, key="shared:1")
    assert [(r.id, r.saga) for r in page.runs] == [(b.id, "beta"), (a.id, "alpha")]
    assert [r.id for r in (await saga.list_runs(client, key="shared:1", saga="alpha")).runs] == [
        a.id
    ]
    assert (await saga.list_runs(client, key="shared:1", saga="gamma")).runs == []
    older = await saga.list_runs(client, key="shared:1", older_than=timedelta(hours=1))
    assert [r.id for r in older.runs] == [a.id]
    assert (await saga.list_runs(client, key="shared:1", status="completed")).runs == []
    first = await saga.list_runs(client, key="shared:1", limit=1)
    assert [r.id for r in first.runs] == [b.id]
    assert first.next_before == b.id
    second = await saga.list_runs(client, key="shared:1", limit=1, before=first.next_before)
    assert [r.id for r in second.runs] == [a.id]
    assert second.next_before is None


async def test_list_runs_by_key_finds_finished_runs_too(
    orchestrator: OrchestratorFactory,
) -> None:
    """A run that ended (read through the finished-runs half of the listing) is found by
    its key like an active one."""
    quick = quick_saga()
    orch = await orchestrator(quick, concurrency=2)
    run = await orch.start(quick, Job(n=5), key="done-key")
    await run.result(timeout=20)
    [info] = (await saga.list_runs(orch, key="done-key")).runs
    assert (info.id, info.status) == (run.id, saga.RunStatus.COMPLETED)


async def test_list_runs_rejects_keys_no_run_can_have(open_client: ClientFactory) -> None:
    """An empty key, a non-str, a NUL character or a lone surrogate (undecodable bytes
    from a command line) raise ConfigurationError instead of a driver error."""
    client = await open_client()
    for bad in ["", "a\x00b", "\udcff", 42]:
        with pytest.raises(saga.ConfigurationError, match="key must be a non-empty str"):
            await saga.list_runs(client, key=bad)  # type: ignore[arg-type]
    with pytest.raises(saga.ConfigurationError, match="saga must be a non-empty str"):
        await saga.list_runs(client, saga="bad\x00name")


def _scans(plan: Any) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every node of an EXPLAIN (FORMAT JSON) plan."""
    out = [(plan["Node Type"], plan.get("Relation Name"), plan.get("Index Name"))]
    for child in plan.get("Plans", []):
        out += _scans(child)
    return out


@pytest.mark.timeout(120)
async def test_key_lookup_plans_use_the_unique_index_with_many_runs(
    open_client: ClientFactory, store: Store, db: asyncpg.Connection
) -> None:
    """With 20,000 runs over 3 sagas (analyzed), finding a key without a saga walks the
    (saga, key) unique index (a loose index scan over the saga names, then one probe per
    saga), and listing by key within a saga probes it too: no sequential scan of runs.
    (Private: the store's lookup statements and their plans are what this checks.)"""
    await db.execute(
        """
        INSERT INTO saga.runs (id, saga_name, saga_version, idempotency_key, status, input,
                               step_name, due_at, finished_at)
        SELECT gen_random_uuid(), (ARRAY['alpha', 'beta', 'gamma'])[g % 3 + 1], 1,
               'key-' || (g / 3), 'completed', '{}', 'one', NULL, now()
        FROM generate_series(0, 19999) AS g
        """
    )
    await db.execute("ANALYZE saga.runs")
    queries = store._q
    cases = [
        ("find_runs_by_key", ["key-77", None]),
        ("find_runs_by_key", ["no-such-key", None]),
        ("find_runs_by_key", ["key-77", "beta"]),
        ("list_runs", ["beta", None, None, None, None, 51, "key-77", None, None, None]),
    ]
    for name, args in cases:
        raw = await db.fetchval(f"EXPLAIN (FORMAT JSON)\n{queries[name]}", *args)
        scans = _scans(json.loads(raw)[0]["Plan"])
        # The runs are in the DEFAULT partition (random ids): it is read through its
        # unique index (the days' partitions are empty: the planner may read them whole).
        seq = [s for s in scans if s[0] == "Seq Scan" and s[1] == "runs_default"]
        assert not seq, (name, scans)
        assert any(s[2] == "runs_default_idempotency_key" for s in scans), (name, scans)

    page = await saga.list_runs(await open_client(), key="key-77")
    assert sorted(r.saga for r in page.runs) == ["alpha", "beta", "gamma"]


async def test_count_runs_is_zero_for_every_status_on_an_empty_database(
    open_client: ClientFactory,
) -> None:
    """On a database with no runs, every status is present with 0, with or without
    filters."""
    client = await open_client()
    zeros = dict.fromkeys(saga.RunStatus, 0)
    assert await saga.count_runs(client) == zeros
    assert await saga.count_runs(client, saga="nope", newer_than=timedelta(days=1)) == zeros


async def test_count_runs_counts_each_status_and_honours_the_filters(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """count_runs() counts runs per status, finished and active alike, over every saga
    or one; older_than/newer_than count by creation age like list_runs."""
    orch, done = await finished_runs(orchestrator, 3)
    await finished_runs(orchestrator, 1, fail="second")  # compensated
    await finished_runs(orchestrator, 1, fail="second,undo")  # failed
    parked = parked_saga()
    client = await open_client(parked)
    pending = [await client.start(parked, Job(n=i)) for i in range(2)]
    await age(db, done[0].id, created=3 * 86400, finished=3 * 86400)
    await age(db, pending[0].id, created=3 * 86400, finished=0)

    counts = await saga.count_runs(client)
    assert set(counts) == set(saga.RunStatus)
    S = saga.RunStatus
    assert {s: n for s, n in counts.items() if n} == {
        S.COMPLETED: 3,
        S.COMPENSATED: 1,
        S.FAILED: 1,
        S.PENDING: 2,
    }
    assert (await saga.count_runs(client, saga="parked"))[S.PENDING] == 2
    assert sum((await saga.count_runs(client, saga="parked")).values()) == 2
    assert sum((await saga.count_runs(orch, saga="quick")).values()) == 5
    old = await saga.count_runs(client, older_than=timedelta(days=1))
    assert {s: n for s, n in old.items() if n} == {S.COMPLETED: 1, S.PENDING: 1}
    new = await saga.count_runs(client, newer_than=timedelta(days=1))
    assert sum(new.values()) == 5
    assert new[S.COMPLETED] == 2


async def test_count_runs_rejects_bad_arguments_like_list_runs(
    open_client: ClientFactory,
) -> None:
    """A negative or non-timedelta age and an empty saga name raise ConfigurationError
    with the same messages as list_runs."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match="must not be negative"):
        await saga.count_runs(client, older_than=timedelta(seconds=-1))
    with pytest.raises(saga.ConfigurationError, match=r"must be a datetime\.timedelta"):
        await saga.count_runs(client, newer_than=5)  # type: ignore[arg-type]
    with pytest.raises(saga.ConfigurationError, match="saga must be a non-empty str"):
        await saga.count_runs(client, saga="")
