"""Counters kept in the process and reported through observable counters.

With the OpenTelemetry SDK, each ``Counter.add`` builds a measurement, cleans and copies
its attribute dict, hashes it and takes the aggregation's lock: about as much CPU as
the rest of an attempt's bookkeeping. A :class:`Tally` counts per attribute set in a
dict under a lock instead; an observable counter of the same name, unit and description
reports the cumulative totals when the meter provider's reader collects. Exported, it
is the same monotonic sum; without a meter provider, the count stays in a small dict.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation

Key = tuple[tuple[str, str | int], ...]  # an attribute set, sorted by name

#: Distinct attribute sets per tally; beyond it, counts go to the overflow set (the
#: SDK's own default limit per metric, and its overflow attribute).
LIMIT = 2000
OVERFLOW: Key = (("otel.metric.overflow", True),)


def key_of(attributes: Mapping[str, str | int]) -> Key:
    return tuple(sorted(attributes.items()))


class Tally:
    """Counts per attribute set, observed as a cumulative counter. ``add`` has the
    signature of ``Counter.add``; :meth:`count` takes a key built once (:func:`key_of`)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._counts: dict[Key, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def observed(cls, meter: Meter, name: str, unit: str, description: str) -> Tally:
        """A tally reported by an observable counter of ``meter`` (created once per meter
        provider: a second one of the same name would report twice)."""
        tally = cls()
        meter.create_observable_counter(
            name, callbacks=[tally.observe], unit=unit, description=description
        )
        return tally

    def add(self, amount: int, attributes: Mapping[str, str | int]) -> None:
        self.count(key_of(attributes), amount)

    def count(self, key: Key, amount: int = 1) -> None:
        with self._lock:
            counts = self._counts
            if key not in counts and len(counts) >= LIMIT:
                key = OVERFLOW
            counts[key] = counts.get(key, 0) + amount

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._counts.items())
        return [Observation(total, dict(key)) for key, total in counts]
