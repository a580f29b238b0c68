"""saga.testing's faults refuse, when given, a step they could never fire on: something
not a step, or a name no step can have (ConfigurationError, naming it)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import saga
import saga.testing


class Job(BaseModel):
    n: int = 0


class Decision(BaseModel):
    ok: bool


fault_args = saga.Saga("fault_args", input=Job)


@fault_args.step()
async def book(ctx: saga.Context[Job]) -> int:
    return 1


@book.compensate
async def unbook(ctx: saga.Context[Job], booking: int) -> None:
    return None


decision = fault_args.wait_for("decision", Decision, timeout=3600)


@fault_args.step()
async def pay(ctx: saga.Context[Job]) -> bool:
    return ctx.result(decision).ok


pause = fault_args.sleep(60)


@fault_args.step()
async def ship(ctx: saga.Context[Job]) -> int:
    return 2


FAULTS = ["crash_after", "expire_lease", "fail_compensation", "drop_connection_at_commit"]
NOT_A_STEP: dict[str, Any] = {
    "a Wait": decision,
    "a Sleep": pause,
    "None": None,
    "an int": 5,
    "bytes": b"book",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", list(NOT_A_STEP))
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_something_not_a_step_is_a_saga_error(fault: str, what: str) -> None:
    """README, "Testing your sagas": "Each takes the step object (that saga's step only)
    or a step name (the step of that name in any saga), and `run_id=` limits it to one
    run." API/Errors: "ConfigurationError  a bad runtime argument" (every error saga
    raises derives from `SagaError`); "What you can rely on": "Settings that cannot work
    are refused when given, naming the setting".

    The same methods refuse an empty step name, a bad `run_id`, a non-bool flag and a
    bad `times` with `saga.ConfigurationError`, and `attach()` a Client with one too.
    So do a `Wait` or a `Sleep` (the objects `wait_for()`/`sleep()` return, easy to
    pass by mistake), None, an int or bytes. Before, they escaped as a bare `TypeError`,
    which an `except saga.SagaError` around a test's set-up did not catch."""
    faults = saga.testing.Faults()
    with pytest.raises(saga.ConfigurationError, match="a fault needs a step"):
        getattr(faults, fault)(NOT_A_STEP[what])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["book pay", "book\n", "<book>", "9book"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_a_step_name_no_step_can_have_is_refused(fault: str, name: str) -> None:
    """README, "Testing your sagas": a fault takes "a step name (the step of that name
    in any saga)"; "What you can rely on": "Settings that cannot work are refused when
    given, naming the setting", and "Bad input raises a clear error ... `DefinitionError`
    for names outside `[A-Za-z_][A-Za-z0-9_.:-]{0,127}`".

    A name outside that pattern can never be a step's (declaring one raises
    DefinitionError), so such a fault can never fire: the test it is written for then
    passes without its fault (``faults.fired`` stays empty). Before, it was accepted
    silently (only "" and NUL were refused); now a ConfigurationError names it."""
    faults = saga.testing.Faults()
    with pytest.raises(saga.ConfigurationError, match="not a name a step can have"):
        getattr(faults, fault)(name)


@pytest.mark.timeout(30)
def test_a_compensation_fault_on_a_step_without_one_is_refused() -> None:
    """README ("What you can rely on"): "Settings that cannot work are refused when
    given, naming the setting". ``fail_compensation(step)`` and the compensation side of
    ``crash_after``/``drop_connection_at_commit`` on a step object that has no
    compensation could never fire (the test would pass without its fault): a
    ConfigurationError naming the step. On a step that has one they are accepted."""
    faults = saga.testing.Faults()
    for call in (
        lambda: faults.fail_compensation(pay),
        lambda: faults.crash_after(pay, compensation=True),
        lambda: faults.drop_connection_at_commit(pay, compensation=True),
    ):
        with pytest.raises(saga.ConfigurationError, match="'pay', which has no compensation"):
            call()
    faults.fail_compensation(book)
    faults.crash_after(book, compensation=True)
