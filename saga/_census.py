"""The census: database-wide figures for the gauges, and a warning about waiting work.

Every ``census_interval`` one orchestrator reads the runs per state, the oldest active
run's age, the scheduler lag and the active runs no definition of its own can execute
(two small queries over the active and failed runs only). It warns about that waiting
work at most once a minute: runs of a version nobody here runs, or whose definition
changed without a version bump. An orchestrator that executes work also keeps the
planner's statistics of the runs table current: after a burst of starts, the claim would
otherwise scan and sort every due run (10 ms a claim at 10,000 due runs, not 0.2 ms)
until autovacuum's analyze comes, a minute or more later. It creates the coming days'
partitions too (see saga/_partitions.py), every ten minutes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio

from saga._db import unreachable
from saga._errors import DatabaseError
from saga._instruments import GaugeState
from saga._log import Outage, logger
from saga._store import Store
from saga._store_ops import DefinitionKey
from saga._telemetry import Telemetry

_WARN_EVERY = 60.0
# How often an executing orchestrator checks that the coming days have partitions.
_PARTITIONS_EVERY = 600.0
_PARTITIONS_RETRY = 60.0


async def census_loop(
    store: Store,
    telemetry: Telemetry,
    definitions: Sequence[DefinitionKey],
    known: Sequence[DefinitionKey],
    interval: float,
    outage: Outage,
    warn: bool,
) -> None:
    """Report the census of ``definitions`` (those executed here) every ``interval``, and
    the active runs of definitions not ``known`` here; with ``warn``, log those and keep
    the coming days' partitions created (on a timer of their own: a failed check is
    tried again a minute later, whatever ``interval``)."""
    gauges = telemetry.gauges(store.schema)
    report = _Report(store, gauges, {(name, version): fp for name, version, fp in known}, warn)
    census_at = partitions_at = -math.inf
    try:
        while True:
            if warn and anyio.current_time() >= partitions_at:
                partitions_at = anyio.current_time() + await _partitions(store, outage)
            if anyio.current_time() >= census_at:
                await report.once(definitions, known, outage)
                census_at = anyio.current_time() + interval
            wake = min(census_at, partitions_at if warn else math.inf)
            await anyio.sleep(max(wake - anyio.current_time(), 0.0))
    finally:
        telemetry.forget(gauges)


class _Report:
    """One census: the gauges, and the warning about waiting work (once a minute)."""

    def __init__(
        self, store: Store, gauges: GaugeState, mine: dict[tuple[str, int], str | None], warn: bool
    ) -> None:
        self._store, self._gauges, self._mine, self._warn = store, gauges, mine, warn
        self._warned_at = -math.inf

    async def once(
        self,
        definitions: Sequence[DefinitionKey],
        known: Sequence[DefinitionKey],
        outage: Outage,
    ) -> None:
        store, warn = self._store, self._warn
        try:
            census = await store.census(definitions)
            waiting = await store.count_unclaimable(known)
            if warn and await store.refresh_statistics():
                logger.info("statistics_refreshed", table=f"{store.schema}.runs")
        except DatabaseError as exc:
            outage.lost("reading run statistics", exc)
            return
        outage.back()
        self._gauges.update(census, waiting)
        if warn and waiting and anyio.current_time() - self._warned_at >= _WARN_EVERY:
            self._warned_at = anyio.current_time()
            for (name, version, fp), runs in waiting.items():
                logger.warning(
                    "unknown_definition_waiting",
                    saga=name,
                    version=version,
                    fingerprint=fp,
                    registered_fingerprint=self._mine.get((name, version)),
                    runs=runs,
                )


async def _partitions(store: Store, outage: Outage) -> float:
    """Create the coming days' partitions when missing; seconds until the next check
    (sooner after a failure: a lock not granted in time, a database away). A database
    away is the outage's to report (one line as it starts, one as it ends), not a
    warning a minute."""
    try:
        created = await store.ensure_partitions()
    except DatabaseError as exc:
        if unreachable(exc):
            outage.lost("creating partitions", exc)
        else:
            cause = type(exc.__cause__ or exc).__name__  # the type only, as every log line
            logger.warning("partitions_not_created", schema=store.schema, error_type=cause)
        return _PARTITIONS_RETRY
    outage.back()
    if created:
        logger.info("partitions_created", schema=store.schema, days=[str(d) for d in created])
    return _PARTITIONS_EVERY
