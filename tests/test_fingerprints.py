"""Definitions outside storable ranges, and definition fingerprints (README, "Deploys"):
the fingerprint covers the input model's fields (names, aliases, types) and the steps
(order, result types, whether they compensate), not function bodies, policies, module
paths or class names; an orchestrator executes only runs of the definitions it has."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, replace
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, Ledger, small_saga
from tests.conftest import OrchestratorFactory


class Receipt(BaseModel):
    charge_id: str
    amount: int


class Refund(BaseModel):
    refund_id: str


class ReceiptV2(BaseModel):
    charge_id: str
    amount: float


# -- building definitions from a plain description -----------------------------------------


@dataclass(frozen=True)
class Spec:
    """A definition's shape: input fields (name, type, alias) and steps (name, result type,
    compensates)."""

    fields: tuple[tuple[str, Any, str | None], ...]
    steps: tuple[tuple[str, Any, bool], ...]
    camel_aliases: bool = False


BASE = Spec(
    fields=(("order_id", str, None), ("amount", int, None), ("tags", list[str], "labels")),
    steps=(("reserve", str, True), ("charge", Receipt, True), ("notify", int, False)),
)


def build(spec: Spec, *, policy: int = 0) -> saga.Saga[Any]:
    """The saga `spec` describes; `policy` varies what the fingerprint must ignore
    (function bodies, retries, timeouts, leases)."""
    config = ConfigDict(alias_generator=to_camel) if spec.camel_aliases else None
    fields: dict[str, Any] = {name: (tp, Field(alias=alias)) for name, tp, alias in spec.fields}
    model = create_model("Input", __config__=config, **fields)
    s = saga.Saga("fingerprinted", input=model)
    retry = saga.Retry(max_attempts=policy + 1, initial_delay=policy)
    for name, result_type, compensates in spec.steps:

        async def step(ctx: Any) -> Any:
            return policy

        step.__annotations__ = {"ctx": saga.Context, "return": result_type}
        timeout, lease = (None, None) if policy == 0 else (policy * 10, policy * 5)
        declared = s.step(name=name, retry=retry, timeout=timeout, lease_seconds=lease)(step)
        if compensates:

            async def undo(ctx: Any, result: Any) -> None:
                assert policy >= 0

            declared.compensate(retry=retry, timeout=timeout)(undo)
    return s


def _with_steps(*steps: tuple[str, Any, bool]) -> Spec:
    return replace(BASE, steps=steps)


def _with_fields(*fields: tuple[str, Any, str | None]) -> Spec:
    return replace(BASE, fields=fields)


RESERVE, CHARGE, NOTIFY = BASE.steps
ORDER_ID, AMOUNT, TAGS = BASE.fields
CHANGES = {
    "step added last": _with_steps(RESERVE, CHARGE, NOTIFY, ("audit", int, False)),
    "step added first": _with_steps(("audit", int, False), RESERVE, CHARGE, NOTIFY),
    "step removed": _with_steps(RESERVE, CHARGE),
    "step renamed": _with_steps(RESERVE, ("charge_card", Receipt, True), NOTIFY),
    "steps reordered": _with_steps(CHARGE, RESERVE, NOTIFY),
    "result str to int": _with_steps(("reserve", int, True), CHARGE, NOTIFY),
    "result model to another model": _with_steps(RESERVE, ("charge", Refund, True), NOTIFY),
    "result model field retyped": _with_steps(RESERVE, ("charge", ReceiptV2, True), NOTIFY),
    "result made optional": _with_steps(RESERVE, CHARGE, ("notify", int | None, False)),
    "result list item type": _with_steps(RESERVE, CHARGE, ("notify", list[int], False)),
    "compensation added": _with_steps(RESERVE, CHARGE, ("notify", int, True)),
    "compensation removed": _with_steps(("reserve", str, False), CHARGE, NOTIFY),
    "input field added": _with_fields(ORDER_ID, AMOUNT, TAGS, ("note", str, None)),
    "input field removed": _with_fields(ORDER_ID, AMOUNT),
    "input field renamed": _with_fields(ORDER_ID, ("amount_cents", int, None), TAGS),
    "input field int to float": _with_fields(ORDER_ID, ("amount", float, None), TAGS),
    "input list item type": _with_fields(ORDER_ID, AMOUNT, ("tags", list[int], "labels")),
    "input field to a model": _with_fields(ORDER_ID, ("amount", Receipt, None), TAGS),
    "input field aliased": _with_fields(("order_id", str, "orderId"), AMOUNT, TAGS),
    "input field re-aliased": _with_fields(ORDER_ID, AMOUNT, ("tags", list[str], "labelList")),
    "input field alias removed": _with_fields(ORDER_ID, AMOUNT, ("tags", list[str], None)),
    "input aliases generated": replace(BASE, camel_aliases=True),
}


def test_fingerprint_is_stable_for_the_same_definition() -> None:
    """The same definition built twice (new model classes, new functions) has the same
    fingerprint, and so it has whatever the function bodies, retry policies, timeouts and
    leases."""
    assert build(BASE).fingerprint == build(BASE).fingerprint
    assert build(BASE, policy=3).fingerprint == build(BASE).fingerprint


@pytest.mark.parametrize("changed", list(CHANGES.values()), ids=list(CHANGES))
def test_fingerprint_changes_with_the_stored_data_contract(changed: Spec) -> None:
    """Adding, removing, renaming or reordering a step, changing a result type, adding or
    removing a compensation, and adding, removing, renaming, retyping or re-aliasing an
    input field each change the fingerprint."""
    assert build(changed).fingerprint != build(BASE).fingerprint


TYPES: list[Any] = [int, str, float, bool, list[int], list[str], dict[str, int], int | None]
TYPES += [Receipt, ReceiptV2, Refund]
NAMES = st.sampled_from(["a", "b", "c", "d"])


def _fields(drawn: dict[str, tuple[Any, str | None]]) -> tuple[tuple[str, Any, str | None], ...]:
    return tuple(
        (name, tp, None if alias is None else f"{name}_{alias}")
        for name, (tp, alias) in sorted(drawn.items())
    )


def _effective(spec: Spec) -> Any:
    """The shape as stored: each field's alias is the explicit one, else the generated one."""
    fields = [
        (name, tp, alias or (to_camel(name) if spec.camel_aliases else None))
        for name, tp, alias in spec.fields
    ]
    return fields, spec.steps


specs = st.builds(
    Spec,
    fields=st.dictionaries(
        NAMES, st.tuples(st.sampled_from(TYPES), st.sampled_from([None, "x", "y"])), max_size=3
    ).map(_fields),
    steps=st.lists(
        st.tuples(NAMES, st.sampled_from(TYPES), st.booleans()),
        min_size=1,
        max_size=4,
        unique_by=lambda step: step[0],
    ).map(tuple),
    camel_aliases=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(first=specs, data=st.data())
def test_fingerprints_are_equal_exactly_when_the_shapes_are(first: Spec, data: Any) -> None:
    """For any two definition shapes (input fields with types and aliases, steps with
    result types and compensations), the fingerprints are equal exactly when the shapes
    are."""
    second = data.draw(st.just(first) | specs, label="second")
    same = build(first).fingerprint == build(second).fingerprint
    assert same == (_effective(first) == _effective(second))


MODELS = """
from typing import Generic, TypeVar
import enum
from pydantic import BaseModel, Field
import saga

T = TypeVar("T")

class {P}Color(enum.Enum):
    RED = "red"
    BLUE = "blue"

class {P}Leaf(BaseModel):
    v: int

class {P}Page(BaseModel, Generic[T]):
    items: list[T]

class {P}Input(BaseModel):
    order_id: str = Field(alias="orderId")
    leaf: {P}Leaf
    color: {P}Color
    leaves: list[{P}Leaf] = []

definition = saga.Saga("moved", input={P}Input)

@definition.step()
async def first(ctx) -> {P}Leaf: ...

@first.compensate
async def undo(ctx, result: {P}Leaf) -> None: ...

@definition.step()
async def second(ctx) -> {P}Page[dict[str, {P}Color]]: ...
"""

RECURSIVE = """
from __future__ import annotations
from pydantic import BaseModel
import saga

class {P}Tree(BaseModel):
    name: str
    children: list[{P}Tree] = []

definition = saga.Saga("tree", input={P}Tree)

@definition.step()
async def walk(ctx) -> {P}Tree: ...
"""


def _define_in_module(monkeypatch: pytest.MonkeyPatch, module: str, source: str) -> Any:
    namespace = types.ModuleType(module)
    monkeypatch.setitem(sys.modules, module, namespace)
    exec(source, namespace.__dict__)
    return namespace.definition


@pytest.mark.parametrize(
    ("source", "prefix"),
    [
        pytest.param(MODELS, "", id="models, enum, generic: in another module"),
        pytest.param(MODELS, "Renamed", id="models, enum, generic: under other class names"),
        pytest.param(RECURSIVE, "", id="recursive model: in another module"),
        pytest.param(RECURSIVE, "Renamed", id="recursive model: under another class name"),
    ],
)
def test_fingerprint_ignores_where_and_under_what_name_models_are_defined(
    monkeypatch: pytest.MonkeyPatch, source: str, prefix: str
) -> None:
    """The same models (nested, enums, generic, recursive) and steps, defined in another
    module or under other class names, give the same fingerprint."""
    original = _define_in_module(monkeypatch, "fingerprint_models_a", source.replace("{P}", ""))
    moved = _define_in_module(monkeypatch, "fingerprint_models_b", source.replace("{P}", prefix))
    assert moved.fingerprint == original.fingerprint


# -- storable ranges and runs on a real database -------------------------------------------


async def test_the_largest_storable_version_runs(orchestrator: OrchestratorFactory) -> None:
    """version=2**31 cannot be stored and is refused; version=2**31-1, the largest Postgres
    integer, is accepted, and a run of it completes and reports that version."""
    with pytest.raises(saga.DefinitionError, match="version"):
        saga.Saga("largest", input=Job, version=2**31)
    s = small_saga("largest", version=2**31 - 1, result=lambda ctx: ctx.input.n * 2, retry=None)
    orch = await orchestrator(s)
    with anyio.fail_after(15):
        run = await orch.start(s, Job(n=21))
        assert await run.result(timeout=10) == 42
    assert (await run.info()).version == 2**31 - 1


def _shared(tag: str, steps: list[str], ledger: Ledger) -> saga.Saga[Job]:
    """A definition of ("shared", 1) whose steps record their calls in ``ledger`` (one per
    definition: it tells which definition ran a step) and return ``tag``."""
    return small_saga("shared", steps, ledger=ledger, result=lambda _: tag, retry=None)


async def test_each_orchestrator_runs_only_its_own_definition(
    orchestrator: OrchestratorFactory,
) -> None:
    """Two definitions under one (name, version) with different steps, on one database:
    an orchestrator never claims the other definition's runs, which stay pending with
    attempt 0, are reported by unclaimable_runs() under (name, version, fingerprint) and
    logged as unknown_definition_waiting with both fingerprints; an orchestrator with
    their definition runs them; with both open, each runs exactly its own runs."""
    ledgers = {"one": Ledger(), "two": Ledger()}
    one = _shared("one", ["reserve"], ledgers["one"])
    two = _shared("two", ["reserve", "charge"], ledgers["two"])
    assert one.fingerprint != two.fingerprint
    runs: dict[str, list[saga.RunHandle]] = {"one": [], "two": []}
    with capture_logs() as logs, anyio.fail_after(40):
        client_two = await orchestrator(two, concurrency=0)
        runs["two"] += [await client_two.start(two, Job(n=n)) for n in range(3)]
        worker_one = await orchestrator(one, census_interval=0.1)
        runs["one"] += [await worker_one.start(one, Job(n=n)) for n in range(3)]
        # worker_one claimed its runs while the other definition's were due before them.
        assert [await run.result(timeout=10) for run in runs["one"]] == ["one"] * 3
        for run in runs["two"]:
            info = await run.info()
            assert (info.status, info.attempt, info.worker) == (saga.RunStatus.PENDING, 0, None)
            assert [event.kind for event in await run.history()] == ["run_started"]
        assert await worker_one.unclaimable_runs() == {("shared", 1, two.fingerprint): 3}
        while not [e for e in logs if e["event"] == "unknown_definition_waiting"]:  # noqa: ASYNC110
            await anyio.sleep(0.05)
        worker_two = await orchestrator(two, census_interval=0.1)
        assert [await run.result(timeout=10) for run in runs["two"]] == ["two"] * 3
        # Both open: each claims only its own definition's runs.
        for n in range(3, 6):
            runs["two"].append(await worker_two.start(two, Job(n=n)))
            runs["one"].append(await worker_one.start(one, Job(n=n)))
        for tag, handles in runs.items():
            assert [await run.result(timeout=10) for run in handles] == [tag] * len(handles)
        assert await worker_one.unclaimable_runs() == {}
        assert await worker_two.unclaimable_runs() == {}
    warned = [e for e in logs if e["event"] == "unknown_definition_waiting"]
    assert warned[0]["log_level"] == "warning"
    assert {
        k: warned[0][k]
        for k in ("saga", "version", "fingerprint", "registered_fingerprint", "runs")
    } == {
        "saga": "shared",
        "version": 1,
        "fingerprint": two.fingerprint,
        "registered_fingerprint": one.fingerprint,
        "runs": 3,
    }
    for tag, handles in runs.items():
        steps = ["reserve"] if tag == "one" else ["reserve", "charge"]
        for run in handles:
            executed = [
                (t, c.step) for t, ledger in ledgers.items() for c in ledger.of(run_id=run.id)
            ]
            assert executed == [(tag, s) for s in steps]
