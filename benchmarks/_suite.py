"""The suite: the selected sections in their order, in one sitting, into ``Results``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

from benchmarks import (
    _ceiling,
    _compensation,
    _graphs,
    _latency,
    _memory,
    _priority,
    _profile,
    _retention,
    _scale,
    _throughput,
    _tracing,
    _versus,
    _waits,
)
from benchmarks._base import say
from benchmarks._harness import Harness
from benchmarks._window import Measured


@dataclasses.dataclass
class Results:
    ceiling: _ceiling.Ceiling | None = None
    throughput: _throughput.Throughput = dataclasses.field(default_factory=_throughput.Throughput)
    versus: _versus.Versus = dataclasses.field(default_factory=dict)
    compensation: list[Measured] = dataclasses.field(default_factory=list)
    graphs: list[Measured] = dataclasses.field(default_factory=list)
    priority: _priority.Priority = dataclasses.field(default_factory=dict)
    waits: _waits.Waits | None = None
    latency: _latency.Latency = dataclasses.field(default_factory=dict)
    scale: _scale.Scale | None = None
    retention: _retention.Retention | None = None
    memory: list[_memory.Memory] = dataclasses.field(default_factory=list)
    tracing: _tracing.TracingResult | None = None
    profile: dict[str, _profile.Profiled] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # section -> s
    notes: list[str] = dataclasses.field(default_factory=list)


async def _ceiling_step(h: Harness, r: Results) -> None:
    r.ceiling = await _ceiling.measure(h)


async def _throughput_step(h: Harness, r: Results) -> None:
    wanted = h.opts.sections
    r.throughput = await _throughput.measure(h, "queue" in wanted, "saga" in wanted)


async def _versus_step(h: Harness, r: Results) -> None:
    r.versus = await _versus.measure(h)


async def _compensation_step(h: Harness, r: Results) -> None:
    r.compensation = await _compensation.measure(h)


async def _graphs_step(h: Harness, r: Results) -> None:
    r.graphs = await _graphs.measure(h)


async def _priority_step(h: Harness, r: Results) -> None:
    r.priority = await _priority.measure(h)


async def _waits_step(h: Harness, r: Results) -> None:
    r.waits = await _waits.measure(h)


async def _latency_step(h: Harness, r: Results) -> None:
    r.latency = await _latency.measure(h)


async def _scale_step(h: Harness, r: Results) -> None:
    r.scale = await _scale.measure(h)


async def _retention_step(h: Harness, r: Results) -> None:
    r.retention = await _retention.measure(h)


async def _memory_step(h: Harness, r: Results) -> None:
    r.memory = await _memory.measure(h)


async def _tracing_step(h: Harness, r: Results) -> None:
    r.tracing = await _tracing.measure(h, profile="profile" in h.opts.sections)


async def _profile_step(h: Harness, r: Results) -> None:
    r.profile = await _profile.measure(h)


# In the order of the README; a step runs when any of its sections is selected.
STEPS: list[tuple[str, Callable[[Harness, Results], Awaitable[None]]]] = [
    ("ceiling", _ceiling_step),
    ("queue+saga", _throughput_step),
    ("versus", _versus_step),
    ("compensation", _compensation_step),
    ("graphs", _graphs_step),
    ("priority", _priority_step),
    ("waits", _waits_step),
    ("latency", _latency_step),
    ("scale", _scale_step),
    ("retention", _retention_step),
    ("memory", _memory_step),
    ("tracing", _tracing_step),
    ("profile", _profile_step),
]


async def collect(h: Harness) -> Results:
    """Run every selected section (``h.opts.sections``)."""
    r = Results()
    for name, step in STEPS:
        if set(h.opts.sections).isdisjoint(name.split("+")):
            continue
        began = time.monotonic()
        say(f"== {name}")
        await step(h, r)
        r.timings[name] = time.monotonic() - began
    r.notes = h.notes
    return r
