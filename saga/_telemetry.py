"""OpenTelemetry traces and metrics, through the API package only.

The application brings the SDK (or nothing: spans are no-ops, counters a dict update). One
trace per run: ``start()`` opens a span and stores its W3C context with the run; every
step and compensation attempt, in whatever process, is its child. Names and attributes
(``saga.*``, in the README) carry types and identifiers only: no payload, no message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from saga._errors import exception_type
from saga._instruments import (
    ATTEMPT,
    ERROR_TYPE,
    KIND,
    OUTCOME,
    RUN_ID,
    RUN_STATUS,
    SAGA,
    SAGA_VERSION,
    STEP,
    VERSION,
    WORKER,
    GaugeState,
    instruments,
)
from saga._log import logger
from saga._tally import Key, key_of

if TYPE_CHECKING:
    from saga._definition import Saga

#: The parent of the attempts of runs started with no span: none (they are roots).
_NO_PARENT = Context()


class Telemetry:
    """One client's or orchestrator's telemetry: spans, counters, and its own gauges."""

    def __init__(self, tracer_provider: trace.TracerProvider | None, meter_provider: Any) -> None:
        self.tracer = trace.get_tracer("saga", VERSION, tracer_provider=tracer_provider)
        ins = self._instruments = instruments(meter_provider)
        self.runs_started, self.runs_ended = ins.runs_started, ins.runs_ended
        self.attempts, self.durations = ins.attempts, ins.durations
        self.run_duration, self.rate_delay = ins.run_duration, ins.rate_delay
        self.leases_expired, self.writes_refused = ins.leases_expired, ins.writes_refused
        # Attribute sets built once per combination (the SDK copies what it is given).
        self._attempt_attrs: dict[tuple[str, str, str, str | None], tuple[Key, dict[str, str]]]
        self._attempt_attrs = {}
        self._run_attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._failures: set[str] = set()  # the tracer's failures logged (once each)

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
        """The span of ``start()``; yields it and the context carrier (JSON) to store. A
        tracer (or propagator) that raises costs the run its trace, never its start."""
        try:
            span = self.tracer.start_span(
                f"saga.start {saga.name}",
                kind=SpanKind.PRODUCER,
                attributes={SAGA: saga.name, SAGA_VERSION: saga.version},
            )
        except Exception as exc:
            span = self._failed("starting a span", exc)
        carrier: dict[str, str] = {}
        try:
            with trace.use_span(  # (never a message: no exception recorded)
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                try:
                    propagate.inject(carrier)
                except Exception as exc:
                    self._failed("propagating a span", exc)
                yield span, json.dumps(carrier) if carrier else "{}"  # (no tracing: nothing)
        finally:
            self._end(span)

    def _end(self, span: Span) -> None:
        try:
            span.end()
        except Exception as exc:
            self._failed("ending a span", exc)

    def _failed(self, during: str, exc: Exception) -> Span:
        """The application's tracer raised: logged (once per kind of failure), and the
        work goes on without that span (a non-recording one)."""
        if during not in self._failures:
            self._failures.add(during)
            logger.warning("tracing_failed", during=during, error_type=exception_type(exc))
        return trace.INVALID_SPAN

    @staticmethod
    def parent_context(carrier_json: str | None) -> Context | None:
        """The run's start span context, from the carrier stored with the run (parsed once
        per claimed run, not per attempt)."""
        if carrier_json == "{}":  # started with no span (no tracing): a root, parsed free
            return _NO_PARENT
        if not carrier_json:
            return None
        try:
            carrier = json.loads(carrier_json)
            if isinstance(carrier, dict):
                return propagate.extract(carrier)
        except Exception:  # a carrier it cannot read: a trace of its own
            pass
        return None

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
        try:
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
        except Exception as exc:  # the application's tracer: the attempt goes on
            return self._failed("starting a span", exc)

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
        try:
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
        except Exception as exc:  # the application's tracer: the outcome is recorded
            self._failed("ending a span", exc)
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


@contextmanager
def in_run_trace(span: Span | None, parent: Context | None) -> Iterator[None]:
    """User code that saga calls outside a step's function (a sleep's ``until()``, a
    wait's ``on_timeout``) runs in the run's trace: under the attempt's ``span`` if there
    is one (not ended here, and recording no message), else under the run's start span
    (``parent``, the context stored with the run)."""
    if span is not None:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield
    elif parent is not None:
        token = otel_context.attach(parent)
        try:
            yield
        finally:
            otel_context.detach(token)
    else:
        yield


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
