"""The operator API's creation-time filters take a time as well as an age: runs created
at or before / at or after it, to the microsecond, by the database's record of when they
were created (never a process's clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

import saga
from tests._sagas import Job, small_saga
from tests.conftest import ClientFactory


@pytest.mark.timeout(60)
async def test_times_bound_every_filtering_function_to_the_microsecond(
    open_client: ClientFactory,
) -> None:
    """README (Operator API): `older_than`/`newer_than` as an aware datetime select the
    runs created at or before / at or after it, in list_runs, count_runs,
    count_matching and the bulk actions alike; an offset other than UTC is the same
    instant."""
    s = small_saga("stamped", 1)
    client = await open_client(s)  # executes nothing: the runs stay pending
    first, second = [await client.start(s, Job(n=n)) for n in range(2)]
    t1 = (await client.info(first.id)).created_at
    t2 = (await client.info(second.id)).created_at
    assert t1 < t2
    just = timedelta(microseconds=1)
    paris = timezone(timedelta(hours=1))

    async def listed(**bounds: datetime) -> set[object]:
        return {r.id for r in (await saga.list_runs(client, **bounds)).runs}  # type: ignore[arg-type]

    assert await listed(older_than=t1) == {first.id}
    assert await listed(older_than=t1 - just) == set()
    assert await listed(newer_than=t2) == {second.id}
    assert await listed(newer_than=t2 + just) == set()
    assert await listed(newer_than=t1, older_than=t2) == {first.id, second.id}
    assert await listed(newer_than=(t1 + just).astimezone(paris)) == {second.id}
    counts = await saga.count_runs(client, older_than=t2 - just)
    assert counts[saga.RunStatus.PENDING] == 1
    assert await saga.count_matching(client, newer_than=t1 + just) == 1
    result = await saga.cancel_runs(client, limit=10, older_than=t2 - just, expect=1)
    assert result.acted == [first.id]
    assert not (await client.info(second.id)).cancel_requested


@pytest.mark.timeout(30)
async def test_a_naive_or_impossible_time_is_refused_naming_the_argument(
    open_client: ClientFactory,
) -> None:
    """A naive datetime (whose zone nobody knows), one out of range once in UTC, or
    another type, is a ConfigurationError naming the argument, before anything runs."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match="newer_than must be a timezone-aware"):
        await saga.list_runs(client, newer_than=datetime(2026, 1, 1))
    with pytest.raises(saga.ConfigurationError, match="older_than is out of range"):
        await saga.count_runs(
            client, older_than=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
        )
    with pytest.raises(saga.ConfigurationError, match=r"older_than must be a datetime\.timedelta"):
        await saga.cancel_runs(client, limit=1, older_than="1h")  # type: ignore[arg-type]
    with pytest.raises(saga.ConfigurationError, match="newer_than"):
        await saga.count_matching(client, newer_than=datetime.now(UTC).date())  # type: ignore[arg-type]
