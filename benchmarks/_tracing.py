"""Tracing overhead: the headline row alternately without and with the OpenTelemetry SDK
exporting every span and metric over OTLP/HTTP (to a dummy receiver), in the worker and
in the client."""

from __future__ import annotations

import dataclasses

from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, Traced, measure_saga
from benchmarks._otel import METRIC_INTERVAL_MS, Tracing
from benchmarks._procs import WorkerProc
from benchmarks._pyspy import Profiles, hook
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, TP_HEAD, tp_row
from benchmarks._window import Measured


@dataclasses.dataclass
class TracingResult:
    plain: list[Measured]
    traced: list[Measured]
    client_spans: dict[str, int]
    profile: Profiles  # a traced row under py-spy (profile section), or empty
    profiled: Measured | None


async def measure(h: Harness, profile: bool) -> TracingResult:
    """Alternately untraced (the shared workers, which never load the SDK) and traced
    (worker processes of their own, with the SDK set up once per process). ``profile``:
    one more traced row under py-spy, for the profile section."""
    receiver = await h.spawn("receiver")
    try:
        hello = await receiver.expect(None, timeout=30)
        endpoint = f"http://127.0.0.1:{hello['port']}"
        client = Tracing(endpoint)
        traced_workers: list[WorkerProc] = []
        try:
            traced_workers = [await h.spawn() for _ in range(HEADLINE[1])]
            return await _rows(h, Traced(client, endpoint, traced_workers), profile)
        finally:
            for worker in traced_workers:  # they flush and shut down their SDK at exit
                await worker.stop()
            client.shutdown()
    finally:
        await receiver.stop()


async def _rows(h: Harness, traced: Traced, profile: bool) -> TracingResult:
    c, p = HEADLINE
    row = SagaRow(concurrency=c, processes=p)
    plain: list[Measured] = []
    on: list[Measured] = []
    for repeat in range(h.opts.repeats):
        plain.append(await measure_saga(h, row, f"trace_off_r{repeat}"))
        on.append(await measure_saga(h, row, f"trace_on_r{repeat}", traced=traced))
    profiles: Profiles = {}
    profiled = None
    if profile and h.opts.py_spy:
        recording = hook(h.opts.py_spy, h.logdir, profiles, h.notes, client=False)
        profiled = await measure_saga(h, row, "trace_profile", traced=traced, hook=recording)
    return TracingResult(plain, on, traced.client.flush(), profiles, profiled)


def render(t: TracingResult, repeats: int, ceiling: float) -> list[str]:
    c, p = HEADLINE
    off = Stat.of([m.runs_per_s for m in t.plain])
    on = Stat.of([m.runs_per_s for m in t.traced])
    cpu_off = Stat.of([m.worker_ms_per_run for m in t.plain])
    cpu_on = Stat.of([m.worker_ms_per_run for m in t.traced])
    spans: dict[str, int] = {}
    for m in t.traced:
        for k, v in m.spans.items():
            spans[k] = spans.get(k, 0) + v
    overhead = 100 * (1 - on.med / off.med)
    cpu_overhead = 100 * (cpu_on.med / cpu_off.med - 1)
    ended, exported = spans.get("ended", 0), spans.get("exported", 0)
    return [
        "## Tracing overhead",
        "",
        "Traced: the worker process(es) and the client each run the OpenTelemetry SDK as an "
        "application would: `TracerProvider` + `BatchSpanProcessor` (SDK defaults: queue "
        "2,048 spans, batches of 512, every 5 s) + `OTLPSpanExporter` (OTLP/HTTP, protobuf), "
        f"and a `MeterProvider` with a `PeriodicExportingMetricReader` every "
        f"{METRIC_INTERVAL_MS / 1000:g} s + `OTLPMetricExporter`, all passed as "
        "`tracer_provider=`/`meter_provider=`; they export to a dummy OTLP/HTTP receiver "
        "on 127.0.0.1 (a separate process that reads each request and answers 200). "
        f"Untraced: no providers (the API's no-ops). {p} process x {c}, alternating, "
        f"{repeats} times each.",
        "",
        *TP_HEAD,
        tp_row("untraced", t.plain, ceiling),
        tp_row("traced", t.traced, ceiling, off.med),
        "",
        f"**Throughput overhead: {overhead:.1f} %** (median runs/s traced ÷ untraced = "
        f"{on.med / off.med:.2f}; range of the ratio {on.ratio(off.med)}). Worker CPU per "
        f"run: {cpu_off.fmt(2)} ms untraced vs {cpu_on.fmt(2)} ms traced "
        f"(**+{cpu_overhead:.0f} %**). Worker spans: {ended:,} ended, {exported:,} exported, "
        f"{ended - exported:,} not exported (dropped by a full queue), "
        f"{spans.get('export_failures', 0)} failed exports; client: "
        f"{t.client_spans['ended']:,} ended, {t.client_spans['exported']:,} exported.",
        "",
    ]
