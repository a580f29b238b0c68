"""Tracing overhead: the headline row without the OpenTelemetry SDK, with it exporting
every span and metric over OTLP/HTTP (to a dummy receiver) in the worker and in the
client, and with the README's sampling setup (a ratio of runs traced); interleaved."""

from __future__ import annotations

import dataclasses

from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, Traced, measure_saga
from benchmarks._otel import (
    MAX_BATCH,
    MAX_QUEUE,
    METRIC_INTERVAL_MS,
    SAMPLE_RATIO,
    Tracing,
    ratio_sampler,
)
from benchmarks._procs import WorkerProc
from benchmarks._pyspy import Profiles, hook
from benchmarks._spancost import STEPS
from benchmarks._spancost import render as render_costs
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, TP_HEAD, tp_row
from benchmarks._window import Measured

TARGET = 15.0  # % of throughput, every span exported (issue 15)
ATTEMPTS = 30_000  # step attempts per setup and repeat, where a traced attempt's CPU goes
VARIANTS = ("untraced", "traced", "sampled")


@dataclasses.dataclass
class TracingResult:
    plain: list[Measured]
    traced: list[Measured]  # every span exported
    sampled: list[Measured]  # the README's sampling setup
    client_spans: dict[str, int]  # the every-span client's
    sampled_client_spans: dict[str, int]
    profile: Profiles  # a traced row under py-spy (profile section), or empty
    profiled: Measured | None
    attempt_costs: dict[str, list[float]]  # µs per attempt by setup (benchmarks/_spancost)
    lost: int  # spans the cost measurement's exporters did not receive


async def measure(h: Harness, profile: bool) -> TracingResult:
    """Untraced (the shared workers, which never load the SDK), traced and sampled
    (worker processes of their own, with the SDK set up once per process; the two differ
    by the client's sampler only), in a rotating order. ``profile``: one more traced row
    under py-spy, for the profile section."""
    receiver = await h.spawn("receiver")
    try:
        hello = await receiver.expect(None, timeout=30)
        endpoint = f"http://127.0.0.1:{hello['port']}"
        every = Tracing(endpoint)
        sampled = Tracing(endpoint, sampler=ratio_sampler())
        workers: list[WorkerProc] = []
        try:
            workers = [await h.spawn() for _ in range(HEADLINE[1])]
            setups = (Traced(every, endpoint, workers), Traced(sampled, endpoint, workers))
            result = await _rows(h, setups, profile)
        finally:
            for worker in workers:  # they flush and shut down their SDK at exit
                await worker.stop()
            every.shutdown()
            sampled.shutdown()
        costs = await h.spawn("spancost", endpoint, str(ATTEMPTS), str(h.opts.repeats))
        try:
            reply = await costs.expect(None, timeout=900)
        finally:
            await costs.stop()
        result.attempt_costs, result.lost = reply["costs"], reply["lost"]
        return result
    finally:
        await receiver.stop()


async def _rows(h: Harness, setups: tuple[Traced, Traced], profile: bool) -> TracingResult:
    c, p = HEADLINE
    row = SagaRow(concurrency=c, processes=p)
    every, sampled = setups
    by_variant: dict[str, list[Measured]] = {v: [] for v in VARIANTS}
    setup = {"untraced": None, "traced": every, "sampled": sampled}
    for repeat in range(h.opts.repeats):
        for i in range(len(VARIANTS)):  # each variant first, second and last in turn
            variant = VARIANTS[(i + repeat) % len(VARIANTS)]
            m = await measure_saga(h, row, f"{variant}_r{repeat}", traced=setup[variant])
            by_variant[variant].append(m)
    profiles: Profiles = {}
    profiled = None
    if profile and h.opts.py_spy:
        recording = hook(h.opts.py_spy, h.logdir, profiles, h.notes, client=False)
        profiled = await measure_saga(h, row, "trace_profile", traced=every, hook=recording)
    return TracingResult(
        by_variant["untraced"],
        by_variant["traced"],
        by_variant["sampled"],
        every.client.flush(),
        sampled.client.flush(),
        profiles,
        profiled,
        {},
        0,
    )


def _spans(ms: list[Measured]) -> dict[str, int]:
    spans: dict[str, int] = {}
    for m in ms:
        for k, v in m.spans.items():
            spans[k] = spans.get(k, 0) + v
    return spans


def _cost(label: str, ms: list[Measured], plain: list[Measured], client: dict[str, int]) -> str:
    """Throughput and worker CPU against the untraced rows, and where the spans went."""
    off = Stat.of([m.runs_per_s for m in plain])
    on = Stat.of([m.runs_per_s for m in ms])
    cpu_off = Stat.of([m.worker_ms_per_run for m in plain])
    cpu_on = Stat.of([m.worker_ms_per_run for m in ms])
    spans = _spans(ms)
    ended, exported = spans.get("ended", 0), spans.get("exported", 0)
    return (
        f"- **{label}: throughput cost {100 * (1 - on.med / off.med):.1f} %** (median runs/s "
        f"÷ untraced = {on.med / off.med:.2f}; range of the ratio {on.ratio(off.med)}); "
        f"worker CPU per run {cpu_on.fmt(2)} ms vs {cpu_off.fmt(2)} ms untraced "
        f"(**{100 * (cpu_on.med / cpu_off.med - 1):+.0f} %**). Worker spans: {ended:,} "
        f"recorded, {exported:,} exported, {ended - exported:,} not exported (dropped by a "
        f"full queue), {spans.get('export_failures', 0)} failed exports; client: "
        f"{client['ended']:,} recorded, {client['exported']:,} exported."
    )


def render(t: TracingResult, repeats: int, ceiling: float) -> list[str]:
    c, p = HEADLINE
    off = Stat.of([m.runs_per_s for m in t.plain]).med
    every = 100 * (1 - Stat.of([m.runs_per_s for m in t.traced]).med / off)
    met = "met" if every <= TARGET else "MISSED"
    return [
        "## Tracing overhead",
        "",
        "Traced: the worker process(es) and the client each run the OpenTelemetry SDK as the "
        "README recommends for a high-throughput service: `TracerProvider` + "
        f"`BatchSpanProcessor(max_queue_size={MAX_QUEUE:,}, max_export_batch_size="
        f"{MAX_BATCH:,})` (every 5 s) + `OTLPSpanExporter` (OTLP/HTTP, protobuf), and a "
        "`MeterProvider` with a `PeriodicExportingMetricReader` every "
        f"{METRIC_INTERVAL_MS / 1000:g} s + `OTLPMetricExporter`, all passed as "
        "`tracer_provider=`/`meter_provider=`; they export to a dummy OTLP/HTTP receiver "
        "on 127.0.0.1 (a separate process that reads each request and answers 200). "
        "**traced**: the SDK's default sampler everywhere, so every span is recorded and "
        "exported. **sampled**: the same, but the client's sampler is the README's "
        f"`ParentBased(TraceIdRatioBased({SAMPLE_RATIO:g}))`: about "
        f"{SAMPLE_RATIO:.0%} of the runs are traced, completely (the worker's ParentBased "
        "sampler follows each start span's decision); metrics are recorded for every run "
        f"either way. Untraced: no providers (the API's no-ops). {p} process x {c}, "
        f"{repeats} times each, the order of the three rotating between repeats.",
        "",
        *TP_HEAD,
        tp_row("untraced", t.plain, ceiling),
        tp_row("traced, every span", t.traced, ceiling),
        tp_row(f"sampled, {SAMPLE_RATIO:.0%} of runs", t.sampled, ceiling),
        "",
        _cost("Every span exported", t.traced, t.plain, t.client_spans),
        _cost(f"Sampled ({SAMPLE_RATIO:.0%} of runs)", t.sampled, t.plain, t.sampled_client_spans),
        f"- Target (issue 15): every span exported costs at most {TARGET:g} % of the "
        f"throughput: **{met}** ({every:.1f} %).",
        "",
        *render_costs(
            t.attempt_costs,
            t.lost,
            ATTEMPTS,
            1000 * Stat.of([m.worker_ms_per_run for m in t.plain]).med / STEPS,
            1000 * Stat.of([m.worker_ms_per_run for m in t.traced]).med / STEPS,
        ),
    ]
