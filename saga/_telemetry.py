"""OpenTelemetry traces and metrics, through the API package only.

The application brings the SDK (or nothing, and every call here is a cheap no-op). One
trace per run: ``start()`` opens a span and stores its W3C context with the run; every
step and compensation attempt, in whatever process it runs, is a child of it. Names and
attributes live under ``saga.*`` (listed in the README) and never carry input, results
or exception messages: only types and identifiers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from saga._store import Census, DefinitionKey

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
OUTCOME = "saga.outcome"  # success, retry, failure, lease_lost, refused
WORKER = "saga.worker"
SCHEMA = "saga.schema"
CREATED = "saga.run.created"
FINGERPRINT = "saga.fingerprint"
ERROR_TYPE = "error.type"  # OpenTelemetry semantic convention

TERMINAL = ("completed", "compensated", "failed", "cancelled")


class _Gauges:
    """Database-wide figures, refreshed by each orchestrator's census loop and read by
    the observable instruments (whose callbacks cannot await)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_schema: dict[str, tuple[Census, dict[DefinitionKey, int]]] = {}

    def update(self, schema: str, census: Census, unclaimable: dict[DefinitionKey, int]) -> None:
        with self._lock:
            self._by_schema[schema] = (census, unclaimable)

    def forget(self, schema: str) -> None:
        with self._lock:
            self._by_schema.pop(schema, None)

    def snapshot(self) -> list[tuple[str, Census, dict[DefinitionKey, int]]]:
        with self._lock:
            return [(s, c, u) for s, (c, u) in self._by_schema.items()]


class Telemetry:
    """Instruments of one meter provider; shared by the orchestrators that use it."""

    # Instruments are registered once per (tracer, meter) provider pair and kept for the
    # process: registering them again would double the observable gauges. Providers are
    # process-long objects, so this holds a handful of entries at most.
    _cache: ClassVar[dict[tuple[int, int], Telemetry]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_providers(
        cls, tracer_provider: trace.TracerProvider | None, meter_provider: Any | None
    ) -> Telemetry:
        key = (id(tracer_provider), id(meter_provider))
        with cls._cache_lock:
            found = cls._cache.get(key)
            if found is None:
                found = cls._cache[key] = cls(tracer_provider, meter_provider)
            return found

    def __init__(self, tracer_provider: trace.TracerProvider | None, meter_provider: Any) -> None:
        self._tracer_provider = tracer_provider
        self.tracer = trace.get_tracer("saga", VERSION, tracer_provider=tracer_provider)
        meter = metrics.get_meter("saga", VERSION, meter_provider=meter_provider)
        self.gauges = _Gauges()
        runs = "{run}"
        self.runs_started = meter.create_counter(
            "saga.runs.started", unit=runs, description="Runs started (committed)."
        )
        self.runs_ended = {
            status: meter.create_counter(
                f"saga.runs.{status}", unit=runs, description=f"Runs that ended {status}."
            )
            for status in TERMINAL
        }
        self.attempts = {
            kind: meter.create_counter(
                f"saga.{kind}.attempts",
                unit="{attempt}",
                description=f"{kind.title()} attempts by outcome and error type.",
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
        self.leases_expired = meter.create_counter(
            "saga.leases.expired",
            unit="{lease}",
            description="Leases reclaimed after their worker stopped renewing them.",
        )
        self.writes_refused = meter.create_counter(
            "saga.writes.refused",
            unit="{write}",
            description="Writes refused because the writer's lease token was stale.",
        )
        meter.create_observable_gauge(
            "saga.runs.active",
            callbacks=[self._observe_runs],
            unit=runs,
            description="Runs per state (pending, running, compensating, failed).",
        )
        meter.create_observable_gauge(
            "saga.runs.oldest_active_age",
            callbacks=[self._observe_oldest],
            unit="s",
            description="Age of the oldest run not yet in a terminal state.",
        )
        meter.create_observable_gauge(
            "saga.scheduler.lag",
            callbacks=[self._observe_lag],
            unit="s",
            description="Now minus the due time of the oldest runnable item.",
        )
        meter.create_observable_gauge(
            "saga.runs.unclaimable",
            callbacks=[self._observe_unclaimable],
            unit=runs,
            description="Active runs of saga versions no orchestrator here registered.",
        )

    # -- observable gauges -----------------------------------------------------------

    def _observe_runs(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self.gauges.snapshot():
            for status in ("pending", "running", "compensating", "failed"):
                yield Observation(
                    census.runs_by_status.get(status, 0), {SCHEMA: schema, RUN_STATUS: status}
                )

    def _observe_oldest(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self.gauges.snapshot():
            yield Observation(census.oldest_active_age, {SCHEMA: schema})

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, census, _ in self.gauges.snapshot():
            yield Observation(census.scheduler_lag, {SCHEMA: schema})

    def _observe_unclaimable(self, _options: CallbackOptions) -> Iterable[Observation]:
        for schema, _, unclaimable in self.gauges.snapshot():
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

    # -- spans -------------------------------------------------------------------------

    @contextmanager
    def start_span(self, saga: Saga[Any]) -> Iterator[tuple[Span, str]]:
        """The span of ``start()``; yields it and the context carrier (JSON) to store."""
        with self.tracer.start_as_current_span(
            f"saga.start {saga.name}",
            kind=SpanKind.PRODUCER,
            attributes={SAGA: saga.name, SAGA_VERSION: saga.version},
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            yield span, json.dumps(carrier)

    @staticmethod
    def parent_context(carrier_json: str | None) -> Context | None:
        """The run's start span context, from the carrier stored with the run (parsed once
        per claimed run, not per attempt)."""
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
        """Close an attempt's span and count it. Only types, never messages."""
        span.set_attribute(OUTCOME, outcome)
        attrs: dict[str, Any] = {SAGA: saga, STEP: step, OUTCOME: outcome}
        if error_type is not None:
            span.set_attribute(ERROR_TYPE, error_type)
            span.add_event("exception", {"exception.type": error_type})
            attrs[ERROR_TYPE] = error_type
        if outcome in ("failure", "lease_lost", "refused") or (
            outcome == "retry" and error_type is not None
        ):
            span.set_status(Status(StatusCode.ERROR, error_type or outcome))
        if run_status is not None:
            span.set_attribute(RUN_STATUS, run_status)
            span.add_event(f"saga.run.{run_status}")
        span.end()
        self.attempts[kind].add(1, attrs)
        self.durations[kind].record(duration, {SAGA: saga, STEP: step, OUTCOME: outcome})

    def run_ended(self, saga: str, status: str, age: float | None) -> None:
        self.runs_ended[status].add(1, {SAGA: saga})
        if age is not None:
            self.run_duration.record(age, {SAGA: saga, RUN_STATUS: status})
