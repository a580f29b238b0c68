"""The compensation path: 3-step sagas whose third step fails for good, with (no-op)
compensations on steps 1 and 2; every run must end ``compensated`` with that error."""

from __future__ import annotations

from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, measure_saga
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, TP_HEAD, tp_row
from benchmarks._window import Measured


async def measure(h: Harness) -> list[Measured]:
    c, p = HEADLINE
    row = SagaRow(kind="compensate", concurrency=c, processes=p)
    return [await measure_saga(h, row, f"comp_c{c}_r{r}") for r in range(h.opts.repeats)]


def render(rows: list[Measured], happy: list[Measured] | None, ceiling: float) -> list[str]:
    """``happy``: the saga row at the same settings, for the ratio."""
    if not rows:
        return []
    c, p = HEADLINE
    happy_med = Stat.of([m.runs_per_s for m in happy or []]).med
    rps = Stat.of([m.runs_per_s for m in rows])
    row = tp_row(f"compensation, {p} process x {c}", rows, ceiling)
    return [
        "## Compensation path",
        "",
        "3-step sagas whose third step raises `saga.PermanentError`; steps 1 and 2 have "
        "(no-op) compensations, so a run is 3 steps + 2 compensations = 5 work items and "
        f"ends `compensated`. {p} worker process x {c}, same method as above.",
        "",
        *TP_HEAD,
        row,
        "",
        f"Runs/s relative to the happy path at the same settings: {rps.ratio(happy_med)}; "
        '"steps/s" here counts the 5 work items, "commits/step" is per work item.',
        "",
    ]
