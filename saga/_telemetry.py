"""OpenTelemetry traces and metrics, through the API package only.

The application brings the SDK (or nothing: spans are no-ops, counters a dict update). One
trace per run: ``start()`` opens a span and stores its W3C context with the run; every
step and compensation attempt, in whatever process, is its child. Names and attributes
(``saga.*``, in the README) carry types and identifiers only: no payload, no message.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from saga._model import RunStatus
from saga._store_ops import Census, DefinitionKey
from saga._tally import Key, Tally, key_of

if TYPE_CHECKING:
    from saga._definition import Saga

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
#: The parent of the attempts of runs started with no span: none (they are roots).
_NO_PARENT = Context()
_GAUGED = tuple(str(s) for s in (*RunStatus.active(), RunStatus.FAILED, RunStatus.STOPPED))


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
            ("saga.runs.waiting", self._observe_parked, runs, "Sleeping and waiting runs."),
            ("saga.queue.depth", self._observe_queues, runs, "Runs due, not taken yet."),
            ("saga.queue.wait", self._observe_queue_wait, "s", "The oldest due run's wait."),
            (
                "saga.runs.waiting_for_key",
                self._observe_keys,
                runs,
                "Runs queued behind their concurrency key.",
            ),
            (
                "saga.schedules.late",
                self._observe_schedules,
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

    def _observe_parked(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            for (name, status), count in census.parked.items():
                yield Observation(count, {SCHEMA: schema, SAGA: name, RUN_STATUS: status})

    def _observe_queues(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            for (name, priority), (runs, _oldest) in census.queues.items():
                yield Observation(runs, {SCHEMA: schema, SAGA: name, PRIORITY: priority})

    def _observe_queue_wait(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            for (name, priority), (_runs, oldest) in census.queues.items():
                yield Observation(oldest, {SCHEMA: schema, SAGA: name, PRIORITY: priority})

    def _observe_keys(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            for name, runs in census.keys_waiting.items():
                yield Observation(runs, {SCHEMA: schema, SAGA: name})

    def _observe_schedules(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self._merged():
            for name, late in census.schedules_late.items():
                yield Observation(late, {SCHEMA: schema, SCHEDULE: name})

    def _observe_unclaimable(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, _, unclaimable in self._merged():
            for (name, version, fingerprint), count in unclaimable.items():
                yield Observation(
                    count,
                    {
                        SCHEMA: schema,
                        SAGA: name,
                        SAGA_VERSION: version,
                        FINGERPRINT: fingerprint or "-",
                    },
                )


_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_global: dict[None, _Instruments] = {}
_lock = threading.Lock()


def _instruments(meter_provider: Any) -> _Instruments:
    with _lock:
        cache: Any = _global if meter_provider is None else _by_provider
        found: _Instruments | None = cache.get(meter_provider)
        if found is None:
            found = cache[meter_provider] = _Instruments(meter_provider)
        return found


class Telemetry:
    """One client's or orchestrator's telemetry: spans, counters, and its own gauges."""

    def __init__(self, tracer_provider: trace.TracerProvider | None, meter_provider: Any) -> None:
        self.tracer = trace.get_tracer("saga", VERSION, tracer_provider=tracer_provider)
        ins = self._instruments = _instruments(meter_provider)
        self.runs_started, self.runs_ended = ins.runs_started, ins.runs_ended
        self.attempts, self.durations = ins.attempts, ins.durations
        self.run_duration, self.rate_delay = ins.run_duration, ins.rate_delay
        self.leases_expired, self.writes_refused = ins.leases_expired, ins.writes_refused
        # Attribute sets built once per combination (the SDK copies what it is given).
        self._attempt_attrs: dict[tuple[str, str, str, str | None], tuple[Key, dict[str, str]]]
        self._attempt_attrs = {}
        self._run_attrs: dict[tuple[str, str], dict[str, str]] = {}

    def gauges(self, schema: str) -> GaugeState:
        """A gauge state of this telemetry's own, reported until :meth:`forget`."""
        state = GaugeState(schema)
        self._instruments.add(state)
        return state

    def forget(self, state: GaugeState) -> None:
        self._instruments.remove(state)

    # -- spans -------------------------------------------------------------------------

    @contextmanager
    def start_span(self, saga: Saga[Any]) -> Iterator[tuple[Span, str]]:
        """The span of ``start()``; yields it and the context carrier (JSON) to store."""
        with self.tracer.start_as_current_span(
            f"saga.start {saga.name}",
            kind=SpanKind.PRODUCER,
            attributes={SAGA: saga.name, SAGA_VERSION: saga.version},
            record_exception=False,
            set_status_on_exception=False,  # never a message
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            yield span, json.dumps(carrier) if carrier else "{}"  # (no tracing: nothing)

    @staticmethod
    def parent_context(carrier_json: str | None) -> Context | None:
        """The run's start span context, from the carrier stored with the run (parsed once
        per claimed run, not per attempt)."""
        if carrier_json == "{}":  # started with no span (no tracing): a root, parsed free
            return _NO_PARENT
        return propagate.extract(json.loads(carrier_json)) if carrier_json else None

    def attempt_span(
        self,
        parent: Context | None,
        *,
        saga: str,
        version: int,
        run_id: str,
        step: str,
        attempt: int,
        kind: str,
        worker: str,
    ) -> Span:
        """A span for one attempt, parented to the run's start span (any process)."""
        verb = "compensate" if kind == "compensation" else "step"
        return self.tracer.start_span(
            f"saga.{verb} {step}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                RUN_ID: run_id,
                SAGA: saga,
                SAGA_VERSION: version,
                STEP: step,
                ATTEMPT: attempt,
                KIND: kind,
                WORKER: worker,
            },
        )

    def end_attempt(
        self,
        span: Span,
        *,
        kind: str,
        saga: str,
        step: str,
        outcome: str,
        error_type: str | None,
        duration: float,
        run_status: str | None,
    ) -> None:
        """Close an attempt's span and count it. Only types, never messages. A span that
        records nothing (no SDK, or its trace not sampled) gets no attributes."""
        if span.is_recording():
            attrs: dict[str, str] = {OUTCOME: outcome}
            if error_type is not None:
                attrs[ERROR_TYPE] = error_type
                span.add_event("exception", {"exception.type": error_type})
            if run_status is not None:
                attrs[RUN_STATUS] = run_status
            span.set_attributes(attrs)
            if outcome in _ERROR_OUTCOMES or (outcome == "retry" and error_type is not None):
                span.set_status(Status(StatusCode.ERROR, error_type or outcome))
        span.end()
        cache, combination = self._attempt_attrs, (saga, step, outcome, error_type)
        found = cache.get(combination)
        if found is None:
            found = _attempt_keys(saga, step, outcome, error_type)
            if len(cache) < _CACHED:  # error types are few in practice, but not bounded
                cache[combination] = found
        self.attempts[kind].count(found[0])
        self.durations[kind].record(duration, found[1])

    def run_ended(self, saga: str, status: str, age: float | None) -> None:
        attrs = self._run_attrs.get((saga, status))
        if attrs is None:
            attrs = self._run_attrs[saga, status] = {SAGA: saga, RUN_STATUS: status}
        self.runs_ended[status].count(((SAGA, saga),))
        if age is not None:
            self.run_duration.record(age, attrs)


_ERROR_OUTCOMES = frozenset(("failure", "lease_lost", "refused"))
_CACHED = 4096


def _attempt_keys(
    saga: str, step: str, outcome: str, error_type: str | None
) -> tuple[Key, dict[str, str]]:
    """An attempt's counter key (with the error type) and duration attributes."""
    counted = {SAGA: saga, STEP: step, OUTCOME: outcome}
    if error_type is not None:
        counted[ERROR_TYPE] = error_type
    return key_of(counted), {SAGA: saga, STEP: step, OUTCOME: outcome}
