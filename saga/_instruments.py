"""The metric instruments of one meter provider, shared by the clients and orchestrators
using it: counters and histograms recorded by :mod:`saga._telemetry`, and the gauges
observed from each orchestrator's census (``GaugeState``), merged per schema. Attribute
names are decided here, once (README "Tracing and metrics")."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from saga._model import RunStatus
from saga._store_ops import Census, DefinitionKey
from saga._tally import Tally

VERSION = "0.1.0"

# Attribute names, decided once (README "Tracing and metrics").
RUN_ID = "saga.run.id"
RUN_STATUS = "saga.run.status"
SAGA = "saga.name"
SAGA_VERSION = "saga.version"
STEP = "saga.step"
ATTEMPT = "saga.attempt"
KIND = "saga.kind"  # "step" or "compensation"
OUTCOME = "saga.outcome"  # success, retry, failure, lease_lost, refused, parked, ...
WORKER = "saga.worker"
SCHEMA = "saga.schema"
CREATED = "saga.run.created"
FINGERPRINT = "saga.fingerprint"
ERROR_TYPE = "error.type"  # OpenTelemetry semantic convention
SCHEDULE = "saga.schedule"
PRIORITY = "saga.priority"
RATE_LIMIT = "saga.rate_limit"

# saga.runs.active: active runs, and failed and stopped ones; saga.runs.<status>: ends.
_GAUGED = tuple(str(s) for s in (*RunStatus.active(), RunStatus.FAILED, RunStatus.STOPPED))
#: A gauge value's attributes, as a hashable tuple of (key, value).
Attrs = tuple[tuple[str, Any], ...]


def _parked(c: Census) -> dict[Attrs, float]:
    return {((SAGA, n), (RUN_STATUS, s)): runs for (n, s), runs in c.parked.items()}


def _queued(c: Census) -> dict[Attrs, float]:
    return {((SAGA, n), (PRIORITY, p)): runs for (n, p), (runs, _) in c.queues.items()}


def _queue_wait(c: Census) -> dict[Attrs, float]:
    return {((SAGA, n), (PRIORITY, p)): wait for (n, p), (_, wait) in c.queues.items()}


def _keys_waiting(c: Census) -> dict[Attrs, float]:
    return {((SAGA, n),): runs for n, runs in c.keys_waiting.items()}


def _late(c: Census) -> dict[Attrs, float]:
    return {((SCHEDULE, n),): late for n, late in c.schedules_late.items()}


class GaugeState:
    """One orchestrator's latest census of the database: its own, never shared. The
    observable instruments read every live state of their provider (callbacks cannot
    await) and merge them per schema, so closing one orchestrator removes only its own."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.census: Census | None = None
        self.unclaimable: dict[DefinitionKey, int] = {}
        self.updated = 0.0

    def update(self, census: Census, unclaimable: dict[DefinitionKey, int]) -> None:
        self.census, self.unclaimable = census, unclaimable
        self.updated = time.monotonic()


class _Instruments:
    """The instruments of one meter provider, created once for it (creating them again
    would register the observable gauges twice); the gauge states live apart."""

    def __init__(self, meter_provider: Any) -> None:
        meter = metrics.get_meter("saga", VERSION, meter_provider=meter_provider)
        self._lock = threading.Lock()
        self._seen: dict[Any, set[Attrs]] = {}  # per gauge, the attribute sets reported
        self._states: list[GaugeState] = []
        runs = "{run}"
        counter = partial(Tally.observed, meter)  # counters: see saga/_tally.py
        self.runs_started = counter("saga.runs.started", runs, "Runs start() inserted.")
        self.runs_ended = {
            status: counter(f"saga.runs.{status}", runs, f"Runs that ended {status}.")
            for status in (str(s) for s in RunStatus.terminal())
        }
        self.attempts = {
            kind: counter(
                f"saga.{kind}.attempts",
                "{attempt}",
                f"{kind.title()} attempts by outcome and error type.",
            )
            for kind in ("step", "compensation")
        }
        self.durations = {
            kind: meter.create_histogram(
                f"saga.{kind}.duration", unit="s", description=f"Duration of {kind} attempts."
            )
            for kind in ("step", "compensation")
        }
        self.run_duration = meter.create_histogram(
            "saga.run.duration", unit="s", description="From start() to the terminal state."
        )
        self.leases_expired = counter(
            "saga.leases.expired",
            "{lease}",
            "Leases reclaimed after their worker stopped renewing them.",
        )
        self.rate_delay = meter.create_histogram(
            "saga.rate_limit.delay",
            unit="s",
            description="How long attempts waited for a rate limit's token (0: none).",
        )
        self.writes_refused = counter(
            "saga.writes.refused",
            "{write}",
            "Writes refused because the writer's lease token was stale.",
        )
        for name, callback, unit, description in (
            ("saga.runs.active", self._observe_runs, runs, "Runs per state."),
            ("saga.runs.oldest_active_age", self._observe_oldest, "s", "Oldest active run."),
            ("saga.scheduler.lag", self._observe_lag, "s", "Now minus the oldest due time."),
            (
                "saga.timers.lag",
                self._observe_timer_lag,
                "s",
                "Now minus the oldest overdue sleep or wait timeout (0: none overdue).",
            ),
            (
                "saga.runs.waiting",
                partial(self._observe_by, _parked),
                runs,
                "Sleeping and waiting runs.",
            ),
            (
                "saga.queue.depth",
                partial(self._observe_by, _queued),
                runs,
                "Runs due, not taken yet.",
            ),
            (
                "saga.queue.wait",
                partial(self._observe_by, _queue_wait),
                "s",
                "The oldest due run's wait.",
            ),
            (
                "saga.runs.waiting_for_key",
                partial(self._observe_by, _keys_waiting),
                runs,
                "Runs queued behind their concurrency key.",
            ),
            (
                "saga.schedules.late",
                partial(self._observe_by, _late),
                "s",
                "Seconds since a schedule's slot passed without starting its run (0: on "
                "time); above a few seconds, no orchestrator handles it.",
            ),
            (
                "saga.runs.unclaimable",
                self._observe_unclaimable,
                runs,
                "Active runs of definitions no orchestrator here registered.",
            ),
        ):
            meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )

    def add(self, state: GaugeState) -> None:
        with self._lock:
            self._states.append(state)

    def remove(self, state: GaugeState) -> None:
        with self._lock:
            self._states = [s for s in self._states if s is not state]

    def _merged(self) -> list[tuple[str, Census, dict[DefinitionKey, int]]]:
        """Per schema, what the live orchestrators of this provider report together:
        runs per state and the oldest age from the freshest census (they are
        database-wide), the worst scheduler lag, and as unclaimable only the work none
        of them can execute."""
        with self._lock:
            states = [s for s in self._states if s.census is not None]
        by_schema: dict[str, list[GaugeState]] = {}
        for state in states:
            by_schema.setdefault(state.schema, []).append(state)
        merged = []
        for schema, group in by_schema.items():
            freshest = max(group, key=lambda s: s.updated)
            assert freshest.census is not None
            lag = max(s.census.scheduler_lag for s in group if s.census is not None)
            timers = max(s.census.timer_lag for s in group if s.census is not None)
            fresh = freshest.census
            census = Census(
                fresh.runs_by_status,
                fresh.oldest_active_age,
                lag,
                timers,
                fresh.parked,
                fresh.schedules_late,
                fresh.queues,
                fresh.keys_waiting,
            )
            keys = set.intersection(*(set(s.unclaimable) for s in group))
            unclaimable = {k: min(s.unclaimable[k] for s in group) for k in keys}
            merged.append((schema, census, unclaimable))
        return merged

    def _observe_runs(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            for status in _GAUGED:
                count = census.runs_by_status.get(status, 0)
                yield Observation(count, {SCHEMA: schema, RUN_STATUS: status})

    def _observe_oldest(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            yield Observation(census.oldest_active_age, {SCHEMA: schema})

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            yield Observation(census.scheduler_lag, {SCHEMA: schema})

    def _observe_timer_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            yield Observation(census.timer_lag, {SCHEMA: schema})

    def _observe_by(
        self, values: Callable[[Census], dict[Attrs, float]], _options: CallbackOptions
    ) -> Iterable[Observation]:
        """A per-saga gauge's values (``values`` of each schema's census), and 0 for each
        attribute set it reported before and has none for now: a backend keeping a
        gauge's last value would show a drained queue as full for ever."""
        found = {
            ((SCHEMA, schema), *attrs): value
            for schema, census, _ in self._merged()
            for attrs, value in values(census).items()
        }
        seen = self._seen.setdefault(values, set())
        seen.update(found)
        return [Observation(found.get(attrs, 0), dict(attrs)) for attrs in seen]

    def _observe_unclaimable(self, _options: CallbackOptions) -> Iterable[Observation]:
        """The unclaimable runs per definition, and 0 for a definition reported before
        whose runs are gone (drained by a worker that has it, or pruned)."""
        found: dict[Attrs, float] = {
            (
                (SCHEMA, schema),
                (SAGA, name),
                (SAGA_VERSION, version),
                (FINGERPRINT, fingerprint or "-"),
            ): count
            for schema, _, unclaimable in self._merged()
            for (name, version, fingerprint), count in unclaimable.items()
        }
        seen = self._seen.setdefault(self._observe_unclaimable, set())
        seen.update(found)
        return [Observation(found.get(attrs, 0), dict(attrs)) for attrs in seen]


_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_global: dict[None, _Instruments] = {}
_lock = threading.Lock()


def instruments(meter_provider: Any) -> _Instruments:
    """The instruments of ``meter_provider`` (None: the global one), made once."""
    with _lock:
        cache: Any = _global if meter_provider is None else _by_provider
        found: _Instruments | None = cache.get(meter_provider)
        if found is None:
            found = cache[meter_provider] = _Instruments(meter_provider)
        return found
