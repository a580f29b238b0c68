"""The graph path: a fan-out with a join (s1, then s2, s3 and s4 in parallel, then s5
once all three completed), beside the linear 3-step saga at the same settings."""

from __future__ import annotations

from benchmarks._base import verdict
from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, measure_saga
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, TP_HEAD, tp_row
from benchmarks._window import Measured


async def measure(h: Harness) -> list[Measured]:
    c, p = HEADLINE
    row = SagaRow(kind="fanout", concurrency=c, processes=p)
    return [await measure_saga(h, row, f"fanout_c{c}_r{r}") for r in range(h.opts.repeats)]


def target(rows: list[Measured]) -> list[str]:
    """The commit budget of a fan-out with a join."""
    if not rows:
        return []
    writes = Stat.of([m.writes_per_item for m in rows])
    return [
        "| a 3-wide fan-out with a join costs ≤ 1.2 durable commits per step | "
        f"write commits/step {writes.fmt(2)} (1 process x 64) | {verdict(writes.med <= 1.2)} |"
    ]


def render(rows: list[Measured], linear: list[Measured] | None, ceiling: float) -> list[str]:
    """``linear``: the 3-step saga row at the same settings, for the comparison."""
    if not rows:
        return []
    c, p = HEADLINE
    steps = Stat.of([m.runs_per_s * m.items for m in rows])
    linear_steps = Stat.of([m.runs_per_s * m.items for m in linear or []]).med
    writes = Stat.of([m.writes_per_item for m in rows])
    return [
        "## Steps in parallel",
        "",
        "Graph sagas of 5 no-op steps: s1, then s2, s3 and s4 in parallel, then s5 once all "
        "three completed (each step its own leased item; the join decided under the run's "
        f"row lock). {p} worker process x {c}, same method as above; commits/step is per "
        "step.",
        "",
        *TP_HEAD,
        tp_row(f"fan-out 3 + join, {p} process x {c}", rows, ceiling),
        "",
        f"Steps/s relative to the linear 3-step saga at the same settings: "
        f"{steps.ratio(linear_steps)}; write commits per step: {writes.med:.2f} (the "
        "target: at most 1.2).",
        "",
    ]
