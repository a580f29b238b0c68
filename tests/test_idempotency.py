"""Idempotency keys, both kinds (README, "What you can rely on"):

- ``ctx.idempotency_key``, the key a step hands to external services, is
  ``"<run id>:step:<step>"`` / ``"<run id>:compensation:<step>"``, stable across attempts,
  and never the same for two operations, whatever the step names;
- ``start(key=...)``, the key that makes starting a run idempotent: an equal input returns
  the existing run, a different one conflicts, and invalid keys write nothing.
"""

from __future__ import annotations

import functools
import re
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import saga
from tests._sagas import Job, Ledger, permanent, small_saga, transient
from tests.conftest import ClientFactory, OrchestratorFactory

STEP_NAME = r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}"


def documented_key_formats() -> dict[str, str]:
    """The key formats as the README states them, as str.format patterns by phase."""
    readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    found = re.findall(r'`"(<run id>:[a-z]+:<step>)"`', readme)
    formats = {
        fmt.split(":")[1]: fmt.replace("<run id>", "{run_id}").replace("<step>", "{step}")
        for fmt in found
    }
    assert set(formats) == {"step", "compensation"}, found
    return formats


FORMATS = documented_key_formats()

# Names that collide under naive key schemes (joining with ':' or '.', or a suffix).
COLLIDING = [
    *["a", "a:compensate", "compensate", "step:a", "compensation:a", "a:step", "a.b", "a-b"],
    *["a_b", "step", "compensation", "a:compensation", "a:", "a::b", "step:compensation:a"],
]


class Transient(Exception):
    pass


async def test_step_and_compensation_keys_are_distinct_stable_and_documented(
    orchestrator: OrchestratorFactory,
) -> None:
    """In a run whose steps are named to collide under naive schemes, each with a
    compensation, and whose last step fails for good so that every compensation runs:
    every step and compensation sees the documented key, one step's and one
    compensation's retry see the same key as their first attempt, and no two operations
    share a key."""
    ledger = Ledger()  # its phase is ctx.is_compensation
    s = small_saga(
        "colliding",
        [*COLLIDING, "boom"],
        compensate=True,
        ledger=ledger,
        fail={
            "boom": permanent("the last step fails for good"),
            "a:step": transient(1, Transient, "retried once"),
        },
        fail_undo={"compensation:a": transient(1, Transient, "retried once")},
    )
    orch = await orchestrator(s)
    with anyio.fail_after(30):
        run = await orch.start(s, Job(n=1))
        with pytest.raises(saga.RunCompensatedError):
            await run.result(timeout=25)

    seen = [(c.phase, c.step, c.attempt, c.key) for c in ledger.calls]
    # Each compensation received its own step's result (the step's name).
    assert all(c.value == c.step for c in ledger.of("compensation"))
    for phase, step, _, key in seen:
        assert key == FORMATS[phase].format(run_id=run.id, step=step)
    keys_by_operation: dict[tuple[str, str], set[str]] = {}
    for phase, step, _, key in seen:
        keys_by_operation.setdefault((phase, step), set()).add(key)
    assert all(len(keys) == 1 for keys in keys_by_operation.values())
    assert len({k for keys in keys_by_operation.values() for k in keys}) == len(keys_by_operation)
    assert {step for phase, step in keys_by_operation if phase == "compensation"} == set(COLLIDING)
    retried = [(phase, step) for phase, step, attempt, _ in seen if attempt == 2]
    assert sorted(retried) == [("compensation", "compensation:a"), ("step", "a:step")]


@settings(max_examples=300, deadline=None)
@given(
    names=st.sets(
        st.sampled_from(COLLIDING) | st.from_regex(STEP_NAME, fullmatch=True),
        min_size=1,
        max_size=40,
    ),
    run_ids=st.lists(st.uuids(), min_size=1, max_size=3, unique=True),
)
def test_documented_key_format_never_collides(names: set[str], run_ids: list[uuid.UUID]) -> None:
    """For any set of valid step names (saga accepts them all) and any runs, the
    documented key format gives every (run, phase, step) its own key."""
    small_saga("keys", sorted(names))  # saga accepts every one of them
    keys = [
        fmt.format(run_id=run_id, step=name)
        for run_id in run_ids
        for fmt in FORMATS.values()
        for name in names
    ]
    assert len(set(keys)) == len(keys)


# -- start(key=...) -----------------------------------------------------------------------


class Line(BaseModel):
    sku: str
    qty: int


class Order(BaseModel):
    order_id: str
    meta: dict[str, Any]
    lines: list[Line] = []


def ordering() -> saga.Saga[Order]:
    return small_saga("ordering", ["take"], input=Order, result=lambda ctx: ctx.input.order_id)


ORIGINAL = {"order_id": "o-1", "meta": {"a": 1, "b": {"x": [1, 2], "y": "z"}}, "lines": []}
ORIGINAL["lines"] = [{"sku": "s-1", "qty": 2}]
EQUAL_INPUTS = {
    "the same model": Order.model_validate(ORIGINAL),
    "dict keys in another order": Order(
        order_id="o-1", meta={"b": {"y": "z", "x": [1, 2]}, "a": 1}, lines=[Line(sku="s-1", qty=2)]
    ),
    "a mapping, fields in another order": {
        "lines": [{"qty": 2, "sku": "s-1"}],
        "meta": {"b": {"y": "z", "x": [1, 2]}, "a": 1},
        "order_id": "o-1",
    },
}
DIFFERENT_INPUTS = {
    "another scalar field": {**ORIGINAL, "order_id": "o-2"},
    "another dict value": {**ORIGINAL, "meta": {"a": 2, "b": {"x": [1, 2], "y": "z"}}},
    "an extra dict key": {**ORIGINAL, "meta": {**ORIGINAL["meta"], "c": None}},
    "a missing dict key": {**ORIGINAL, "meta": {"b": {"x": [1, 2], "y": "z"}}},
    "a nested list reordered": {**ORIGINAL, "meta": {"a": 1, "b": {"x": [2, 1], "y": "z"}}},
    "another nested model": {**ORIGINAL, "lines": [{"sku": "s-1", "qty": 3}]},
    "a str for a number": {**ORIGINAL, "meta": {"a": "1", "b": {"x": [1, 2], "y": "z"}}},
}


async def _rows(db: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
    runs = await db.fetch("SELECT * FROM saga.runs ORDER BY id")
    events = await db.fetch("SELECT * FROM saga.events ORDER BY id")
    return [tuple(r) for r in runs], [tuple(e) for e in events]


@pytest.mark.parametrize("again", list(EQUAL_INPUTS.values()), ids=list(EQUAL_INPUTS))
async def test_restart_with_an_equal_input_returns_the_same_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, again: Any
) -> None:
    """start() twice with one key and an equal input (the same values, whatever the order
    of dict keys or fields, as a model or a mapping) returns the first run, with
    created False, and writes nothing."""
    s = ordering()
    client = await orchestrator(s, concurrency=0)
    first = await client.start(s, Order.model_validate(ORIGINAL), key="order-1")
    assert first.created
    before = await _rows(db)
    second = await client.start(s, again, key="order-1")
    assert (second.id, second.created) == (first.id, False)
    assert await _rows(db) == before


async def test_a_handle_from_get_run_says_it_created_nothing(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `RunHandle.created` says whether the call that gave out the handle
    inserted the run: True from the `start()` that did, False from `get_run()` (it only
    names an existing run, e.g. one another process started)."""
    s = ordering()
    client = await orchestrator(s, concurrency=0)
    first = await client.start(s, Order.model_validate(ORIGINAL), key="order-2")
    assert first.created
    assert client.get_run(first.id).created is False
    assert client.get_run(str(first.id)).created is False


@pytest.mark.parametrize("other", list(DIFFERENT_INPUTS.values()), ids=list(DIFFERENT_INPUTS))
async def test_restart_with_a_different_input_conflicts_and_writes_nothing(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, other: dict[str, Any]
) -> None:
    """start() with a used key and a different input raises IdempotencyConflictError whose
    run_id names the existing run, and writes nothing; with require_same_input=False it
    returns the existing run (created False), still with its first input."""
    s = ordering()
    client = await orchestrator(s, concurrency=0)
    first = await client.start(s, Order.model_validate(ORIGINAL), key="order-1")
    before = await _rows(db)
    with pytest.raises(saga.IdempotencyConflictError) as conflict:
        await client.start(s, other, key="order-1")
    assert conflict.value.run_id == first.id
    assert await _rows(db) == before
    lenient = await client.start(s, other, key="order-1", require_same_input=False)
    assert (lenient.id, lenient.created) == (first.id, False)
    assert await _rows(db) == before


async def test_the_key_of_an_ended_run_still_returns_it(orchestrator: OrchestratorFactory) -> None:
    """Once the run of a key completed, starting again with that key and an equal input
    returns that run and its result; it does not run again."""
    s = ordering()
    orch = await orchestrator(s)
    with anyio.fail_after(15):
        first = await orch.start(s, ORIGINAL, key="order-1")
        assert await first.result(timeout=10) == "o-1"
        again = await orch.start(s, ORIGINAL, key="order-1")
        assert (again.id, again.created) == (first.id, False)
        assert await again.result(timeout=10) == "o-1"
    kinds = [event.kind for event in await again.history()]
    assert kinds.count("run_started") == 1
    assert kinds.count("step_started") == 1


async def test_saga_start_takes_require_same_input(orchestrator: OrchestratorFactory) -> None:
    """The saga's own start() (one open orchestrator) honours require_same_input=False
    like orchestrator.start(): a key reused with another input returns the existing
    run."""
    s = ordering()
    await orchestrator(s, concurrency=0)
    first = await s.start(Order.model_validate(ORIGINAL), key="order-1")
    other = Order.model_validate(DIFFERENT_INPUTS["another scalar field"])
    with pytest.raises(saga.IdempotencyConflictError):
        await s.start(other, key="order-1")
    lenient = await s.start(other, key="order-1", require_same_input=False)  # type: ignore[call-arg]
    assert (lenient.id, lenient.created) == (first.id, False)


async def test_one_key_in_two_sagas_starts_two_runs(open_client: ClientFactory) -> None:
    """Keys are unique per saga: the same key used by two sagas starts one run in each,
    even with different inputs."""
    s, t = ordering(), small_saga("other")
    client = await open_client(s, t)
    one = await client.start(s, ORIGINAL, key="shared")
    two = await client.start(t, Job(n=1), key="shared")
    assert one.created
    assert two.created
    assert one.id != two.id


BAD_KEYS = {
    "lone high surrogate": "order-\ud800",
    "lone low surrogate": "\udc80",
    "NUL": "order\x001",
    "empty": "",
    "513 characters": "k" * 513,
    "513 four-byte characters": "\U0001f600" * 513,
    "int": 5,
    "bytes": b"order-1",
    "UUID": uuid.UUID(int=1),
    "True": True,
}


@pytest.mark.parametrize("entry", ["orchestrator.start", "saga.start"])
@pytest.mark.parametrize("key", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
async def test_invalid_keys_are_refused_and_write_nothing(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, key: Any, entry: str
) -> None:
    """An idempotency key that is not a str, is empty, longer than 512 characters, or holds
    NUL or a lone surrogate raises InvalidInputError, and nothing is written."""
    s = ordering()
    client = await orchestrator(s, concurrency=0)
    start = s.start if entry == "saga.start" else functools.partial(client.start, s)
    with pytest.raises(saga.InvalidInputError, match="key"):
        await start(Order.model_validate(ORIGINAL), key=key)
    assert await _rows(db) == ([], [])


async def test_keys_up_to_the_limits_are_accepted(orchestrator: OrchestratorFactory) -> None:
    """Keys of 1 to 512 characters of any valid Unicode (four-byte characters, spaces,
    colons, control characters other than NUL) start a run, are reported back unchanged
    and find that run again."""
    s = ordering()
    client = await orchestrator(s, concurrency=0)
    keys = ["k" * 512, "\U0001f600" * 512, "é" * 512, "x", " ", "a:b:c", "tab\there", "\u200b"]
    for key in keys:
        run = await client.start(s, ORIGINAL, key=key)
        assert run.created
        assert (await run.info()).key == key
        assert (await client.start(s, ORIGINAL, key=key)).id == run.id
