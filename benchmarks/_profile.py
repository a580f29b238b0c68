"""Where the time goes: the throughput row once more (its figures are not used above)
with saga's Store calls counted in the worker and, when py-spy is available, py-spy
sampling the worker process and this process; at concurrency 64 and 1."""

from __future__ import annotations

import dataclasses

from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, measure_saga
from benchmarks._pyspy import RATE, Profile, Profiles, hook
from benchmarks._throughput import HEADLINE
from benchmarks._window import Measured

CALL_KEYS = (
    "claim",
    "claimed items",
    "empty claims",
    "transition",
    "heartbeat",
    "census",
    "count_unclaimable",
)


@dataclasses.dataclass
class Profiled:
    measured: Measured
    profiles: Profiles


async def measure(h: Harness) -> dict[str, Profiled]:
    rows: dict[str, Profiled] = {}
    for c in (HEADLINE[0], 1):
        profiles: Profiles = {}
        recording = hook(h.opts.py_spy, h.logdir, profiles, h.notes) if h.opts.py_spy else None
        runs = h.opts.runs if c > 1 else max(1, h.opts.runs // 3)
        row = SagaRow(concurrency=c, count_calls=True, runs=runs)
        m = await measure_saga(h, row, f"profile_c{c}", hook=recording)
        rows[f"saga, 1 process x {c}"] = Profiled(m, profiles)
    if not h.opts.py_spy:
        h.notes.append(
            "py-spy not found (--py-spy, $SAGA_BENCH_PYSPY, PATH, /tmp/pyspy-venv): the "
            "profile shows Store call counts only"
        )
    return rows


HEADER = [
    "## Where the time goes",
    "",
    "The throughput row run once more (not part of the figures above), with saga's "
    "`Store` calls counted in the worker process (a wrapper, benchmark-only) and "
    f"py-spy (`record --nonblocking`, {RATE} Hz) sampling the worker process and "
    "the benchmark process; 'busy' = samples / (rate x seconds): the share of time the "
    "process was not idle in the event loop's `select` (running, or runnable and "
    "waiting for a CPU).",
    "",
]


def render_calls(rows: dict[str, Profiled]) -> list[str]:
    lines = [
        "Store calls per run, counted in the worker process:",
        "",
        "| row | runs/s | write / all commits per step | " + " | ".join(CALL_KEYS) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in CALL_KEYS) + " |",
    ]
    for label, row in rows.items():
        m = row.measured
        cells = " | ".join(f"{m.calls.get(k, 0) / m.runs:.3f}" for k in CALL_KEYS)
        commits = f"{m.writes_per_item:.2f} / {m.commits_per_item:.2f}"
        lines.append(f"| {label} | {m.runs_per_s:,.0f} | {commits} | {cells} |")
    return [
        *lines,
        "",
        "A run's commits beyond its start: its claims (one per claim statement, shared "
        "by the runs it leased; empty claims commit too) plus one transition per step.",
        "",
    ]


def render_samples(rows: dict[str, Profiled], traced: Profiled | None) -> list[str]:
    """The py-spy tables, the traced row's (``traced``) included."""
    profiles = [
        (label, name, p, r.measured) for label, r in rows.items() for name, p in r.profiles.items()
    ]
    if traced is not None:
        label = f"saga traced, 1 process x {HEADLINE[0]}"
        profiles += [(label, name, p, traced.measured) for name, p in traced.profiles.items()]
    if not profiles:
        return []
    lines = [
        "py-spy counts a thread as busy while it runs *or waits for a CPU*. On 2 shared "
        "cores the worker is often preempted right after the `send()` that wakes a "
        "Postgres backend, so samples pile up in `_SelectorSocketTransport.write`: "
        "that is mostly waiting for a CPU, not work (compare 'busy' with the CPU the "
        "process really used, from /proc, and with its small kernel share above).",
        "",
    ]
    for label, name, p, m in profiles:
        if p.samples:
            lines += _samples(label, name, p, m)
    return lines


def _samples(label: str, name: str, p: Profile, m: Measured) -> list[str]:
    total = p.samples
    used = (m.worker_cpu if name.startswith("worker") else m.client_cpu) / m.wall
    areas = ", ".join(f"{a} {100 * n / total:.0f}%" for a, n in p.areas if n / total >= 0.01)
    lines = [
        f"**{label}, {name}**: busy {100 * p.busy:.0f}% ({total:,} samples), CPU "
        f"used {used:.2f} cores. Own time by library: {areas}.",
        "",
        "| hottest functions (own time) | % | saga functions (inclusive) | % |",
        "| --- | ---: | --- | ---: |",
    ]
    for i in range(max(len(p.own), len(p.saga))):
        own = p.own[i] if i < len(p.own) else ("", 0)
        inc = p.saga[i] if i < len(p.saga) else ("", 0)
        inc_name = f"`{inc[0]}`" if inc[0] else ""
        inc_pct = f"{100 * inc[1] / total:.1f}" if inc[0] else ""
        lines.append(f"| `{own[0]}` | {100 * own[1] / total:.1f} | {inc_name} | {inc_pct} |")
    return [*lines, ""]
