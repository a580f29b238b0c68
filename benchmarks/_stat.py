"""Figures over repeats: median with (min-max), ratios, percentiles."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Stat:
    """Median, min and max over the repeats."""

    med: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, digits: int = 0, unit: str = "") -> str:
        if math.isnan(self.med):
            return "n/a"
        if self.n == 1:
            return f"{self.med:,.{digits}f}{unit}"
        return f"{self.med:,.{digits}f}{unit} ({self.lo:,.{digits}f}-{self.hi:,.{digits}f})"

    def ratio(self, other: float, digits: int = 2) -> str:
        """This figure divided by ``other``: median (min-max)."""
        if math.isnan(self.med) or not other or math.isnan(other):
            return "n/a"
        if self.n == 1:
            return f"{self.med / other:.{digits}f}"
        return (
            f"{self.med / other:.{digits}f} ({self.lo / other:.{digits}f}-"
            f"{self.hi / other:.{digits}f})"
        )


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
