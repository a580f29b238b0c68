"""A saga's traffic settings: its runs' priority, one-at-a-time per business key, and its
lane (orchestrators given ``lanes=`` execute only the sagas of those lanes).

``priority`` (an int from 0 to 100, or a function of the input returning one) orders
claiming: due work of a higher priority is claimed before older work of a lower one.
``concurrency_key`` (a function of the input returning a str, such as an account id)
with ``concurrency_limit`` (default 1) lets at most that many runs with the same key
be active at once, for their whole life: the others wait, in start order, holding no
lease and costing no claim, and start when a slot frees (see ``key_fill`` in the
queries). Checked when the saga is defined, and for each run at start, before anything
is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saga import _checks
from saga._errors import DefinitionError, InvalidInputError, describe_exception

#: The priorities a run may have: 0 (the default, lowest) to 100.
MAX_PRIORITY = 100
#: The largest concurrency limit.
MAX_LIMIT = 10_000
#: The longest concurrency key.
MAX_KEY_LENGTH = 200

Priority = int | Callable[[Any], int]


@dataclass(frozen=True, slots=True)
class RunTraffic:
    """What the store records for one run: its priority and its concurrency key."""

    priority: int = 0
    key: str | None = None
    limit: int = 1


_PLAIN = RunTraffic()


@dataclass(frozen=True, slots=True)
class Traffic:
    """A saga's settings (see the module)."""

    saga: str
    priority: Priority | None = None
    key: Callable[[Any], str] | None = None
    limit: int = 1
    lane: str = "default"

    @classmethod
    def of(cls, saga: str, priority: Any, key: Any, limit: Any, lane: Any = "default") -> Traffic:
        """Checked settings; DefinitionError names what is wrong."""
        if priority is not None and not callable(priority):
            check_priority(f"saga {saga!r}: priority", priority, DefinitionError)
        if key is not None and not callable(key):
            raise DefinitionError(
                f"saga {saga!r}: concurrency_key must be a function of the input returning "
                f"a str (e.g. lambda order: order.account_id), got {_checks.show(key)}"
            )
        _checks.integer(
            f"saga {saga!r}: concurrency_limit", limit, DefinitionError, minimum=1,
            maximum=MAX_LIMIT,
        )  # fmt: skip
        if key is None and limit != 1:
            raise DefinitionError(
                f"saga {saga!r}: concurrency_limit={limit} limits the runs sharing a key; "
                "give concurrency_key= too (a function of the input returning the key)"
            )
        _checks.validate_name(lane, "lane")
        return cls(saga, priority, key, limit, lane)

    def for_run(self, model: Any, priority: Any = None) -> RunTraffic:
        """The priority (``priority`` given at start, else the saga's) and the key of a
        run of ``model``; InvalidInputError when a function returns something unusable,
        or raises."""
        if self.priority is None and self.key is None and priority is None:
            return _PLAIN  # the common case, on every start: nothing to check
        where = "priority"
        if self.priority is None and priority is not None:
            raise InvalidInputError(
                f"saga {self.saga!r} has no priorities: declare Saga(..., priority=0) (or a "
                "function of the input) to start its runs with a priority"
            )
        if priority is None:
            where = f"saga {self.saga!r}: priority of this input"
            priority = self.priority or 0
            if callable(priority):
                priority = _call(where, priority, model)
        check_priority(where, priority, InvalidInputError)
        if self.key is None:
            return RunTraffic(priority)
        key = _call(f"saga {self.saga!r}: concurrency_key", self.key, model)
        _checks.text(
            f"saga {self.saga!r}: concurrency key", key, InvalidInputError,
            max_length=MAX_KEY_LENGTH,
        )  # fmt: skip
        return RunTraffic(priority, key, self.limit)


def _call(what: str, fn: Callable[[Any], Any], model: Any) -> Any:
    try:
        return fn(model)
    except Exception as exc:
        raise InvalidInputError(f"{what} raised {describe_exception(exc)}") from exc


def check_priority(name: str, value: Any, error: type[Exception]) -> int:
    return _checks.integer(name, value, error, minimum=0, maximum=MAX_PRIORITY)
