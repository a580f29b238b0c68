"""Send saga's traces and metrics to an OpenTelemetry backend (or to the console).

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 SAGA_DSN=postgresql://... \\
        python examples/tracing.py

With OTEL_EXPORTER_OTLP_ENDPOINT set, spans and metrics go over OTLP/HTTP (Jaeger,
Tempo, Honeycomb, an OpenTelemetry Collector...); without it they are printed to the
console. saga itself only uses the OpenTelemetry API: configuring the SDK, as below, is
the application's job. Needs `pip install opentelemetry-sdk
opentelemetry-exporter-otlp-proto-http` (both in saga's `dev` extra).
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from pydantic import BaseModel

import saga


def configure_opentelemetry() -> tuple[TracerProvider, MeterProvider]:
    resource = Resource.create({"service.name": "checkout-service"})
    span_exporter: SpanExporter
    metric_exporter: MetricExporter
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter, metric_exporter = OTLPSpanExporter(), OTLPMetricExporter()
    else:
        span_exporter, metric_exporter = ConsoleSpanExporter(), ConsoleMetricExporter()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[PeriodicExportingMetricReader(metric_exporter, 5_000)],
    )
    trace.set_tracer_provider(tracer_provider)  # saga uses the global providers by default
    metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


class Order(BaseModel):
    order_id: str


checkout = saga.Saga("checkout", input=Order)


@checkout.step(retry=saga.Retry(max_attempts=3, initial_delay=0.1))
async def reserve(ctx: saga.Context[Order]) -> str:
    if ctx.attempt == 1:
        raise ConnectionError("inventory timed out")  # a retry: two spans in the trace
    return f"rsv-{ctx.input.order_id}"


@reserve.compensate
async def release(ctx: saga.Context[Order], reservation: str) -> None:
    return None


@checkout.step()
async def charge(ctx: saga.Context[Order]) -> str:
    if ctx.input.order_id.endswith("-declined"):
        raise saga.PermanentError("card declined")  # the trace shows the rollback
    return "ch-1"


async def main() -> None:
    tracer_provider, meter_provider = configure_opentelemetry()
    dsn = os.environ["SAGA_DSN"]
    tracer = trace.get_tracer("checkout-service")
    async with saga.Orchestrator(dsn, sagas=[checkout], census_interval=2) as orch:
        for order_id in ("o-1", "o-2-declined"):
            with tracer.start_as_current_span("POST /orders"):  # what a web framework does
                run = await orch.start(checkout, Order(order_id=order_id))
            try:
                print(order_id, "->", await run.result(timeout=30))
            except saga.RunError as exc:
                print(order_id, "->", exc.status)
    tracer_provider.shutdown()
    meter_provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
