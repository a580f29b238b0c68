"""Definition-time checks and retry arithmetic: pure logic; only registration, which
freezes a definition, opens a client on the test database."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Job
from tests.conftest import OrchestratorFactory


class In(BaseModel):
    x: int


def test_duplicate_step_names_are_rejected() -> None:
    """Two steps with one name fail when the second is declared, naming both."""
    s = saga.Saga("dup", input=In)

    @s.step()
    async def a(ctx: saga.Context[In]) -> None: ...

    with pytest.raises(saga.DefinitionError, match="already has a step named 'a'"):

        @s.step(name="a")
        async def b(ctx: saga.Context[In]) -> None: ...


def test_sync_functions_are_rejected() -> None:
    """Steps and compensations must be `async def`."""
    s = saga.Saga("sync", input=In)
    with pytest.raises(saga.DefinitionError, match="must be an `async def`"):
        s.step()(lambda ctx: None)  # type: ignore[arg-type,return-value]

    @s.step()
    async def a(ctx: saga.Context[In]) -> int:
        return 1

    def undo(ctx: saga.Context[In], r: int) -> None: ...

    with pytest.raises(saga.DefinitionError, match="must be an `async def`"):
        a.compensate(undo)  # type: ignore[arg-type]


def test_wrong_arity_is_rejected() -> None:
    """A step takes (ctx); a compensation takes (ctx, result)."""
    s = saga.Saga("arity", input=In)
    with pytest.raises(saga.DefinitionError, match=r"must take \(ctx\)"):

        @s.step()
        async def a(ctx: saga.Context[In], extra: int) -> None: ...  # type: ignore[arg-type]

    @s.step()
    async def b(ctx: saga.Context[In]) -> int:
        return 1

    with pytest.raises(saga.DefinitionError, match=r"must take \(ctx, result\)"):

        @b.compensate  # type: ignore[arg-type]
        async def undo(ctx: saga.Context[In]) -> None: ...


def test_second_compensation_for_a_step_is_rejected() -> None:
    """A step has at most one compensation."""
    s = saga.Saga("twice", input=In)

    @s.step()
    async def a(ctx: saga.Context[In]) -> int:
        return 1

    @a.compensate
    async def undo(ctx: saga.Context[In], r: int) -> None: ...

    with pytest.raises(saga.DefinitionError, match="already has a compensation"):

        @a.compensate
        async def undo2(ctx: saga.Context[In], r: int) -> None: ...


async def test_saga_without_steps_cannot_be_registered() -> None:
    """Registering a saga with no steps fails before any connection is made."""
    empty = saga.Saga("empty", input=In)
    orch = saga.Orchestrator("postgresql://nowhere/db", sagas=[empty])
    with pytest.raises(saga.DefinitionError, match="has no steps"):
        await orch.__aenter__()


@pytest.mark.parametrize(
    "name",
    [
        *["", "a b", "x'; DROP TABLE runs; --", "$$", "a$$b", "line\nbreak", "é", "a" * 129],
        *["1st", "q" * 10_240, 'quote"d', "semi;colon", "nul\x00"],
    ],
)
def test_hostile_names_are_rejected(name: str) -> None:
    """Saga and step names outside [A-Za-z_][A-Za-z0-9_.:-]{0,127} are refused."""
    with pytest.raises(saga.DefinitionError, match="invalid saga name"):
        saga.Saga(name, input=In)
    s = saga.Saga("ok", input=In)
    with pytest.raises(saga.DefinitionError, match="invalid step name"):

        @s.step(name=name)
        async def a(ctx: saga.Context[In]) -> None: ...


def test_input_must_be_a_pydantic_model() -> None:
    """The input type must be a pydantic BaseModel subclass; version a positive int."""
    with pytest.raises(saga.DefinitionError, match="BaseModel"):
        saga.Saga("bad", input=dict)  # type: ignore[type-var]
    with pytest.raises(saga.DefinitionError, match="version"):
        saga.Saga("bad", input=In, version=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": -1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"non_retryable": (int,)},
    ],
)
def test_invalid_retry_policies_are_rejected(kwargs: dict[str, object]) -> None:
    """Retry refuses values that make no sense."""
    with pytest.raises(saga.DefinitionError):
        saga.Retry(**kwargs)  # type: ignore[arg-type]


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    """Delays double per attempt, stay within [base*(1-jitter), base], and never pass
    max_delay."""
    policy = saga.Retry(initial_delay=1, multiplier=2, max_delay=5, jitter=0.5)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 5), (10, 5)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in delays)
        assert max(delays) - min(delays) > 0  # jitter really spreads them
    assert saga.Retry(initial_delay=1, jitter=0).delay(3) == 4


def test_retryable_classification() -> None:
    """PermanentError and listed types are not retried; anything else is."""
    policy = saga.Retry(non_retryable=(KeyError,))
    assert policy.retryable(RuntimeError())
    assert not policy.retryable(saga.PermanentError())
    assert not policy.retryable(KeyError())


async def test_definitions_freeze_once_registered(dsn: str) -> None:
    """After registration a saga's steps cannot change."""
    s = saga.Saga("frozen", input=In)

    @s.step()
    async def a(ctx: saga.Context[In]) -> int:
        return 1

    async with saga.Client(dsn, sagas=[s]):
        with pytest.raises(saga.DefinitionError, match="can no longer change"):

            @s.step()
            async def b(ctx: saga.Context[In]) -> None: ...


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schema": "Bad-Schema"},
        {"schema": 'x"; drop schema public; --'},
        {"concurrency": -1},
        {"lease_seconds": 0},
        {"poll_interval": -1},
        {"max_payload_bytes": 0},
    ],
)
def test_bad_orchestrator_arguments_fail_before_any_sql(kwargs: dict[str, object]) -> None:
    """Invalid schema names and settings raise ConfigurationError at construction."""
    s = saga.Saga("cfg", input=In)
    with pytest.raises(saga.ConfigurationError):
        saga.Orchestrator("postgresql://nowhere/db", sagas=[s], **kwargs)  # type: ignore[arg-type]


class _Receipt(BaseModel):
    charge_id: str


async def test_a_declared_output_is_checked_and_types_the_result(
    orchestrator: OrchestratorFactory,
) -> None:
    """``Saga(output=...)`` declares the type of a completed run's output: registration
    refuses one the steps do not end with (a DefinitionError naming both), and a saga
    whose last step returns it registers, its run's result being that type."""
    wrong = saga.Saga("wrong_output", input=Job, output=int)

    @wrong.step()
    async def pay(ctx: saga.Context[Job]) -> _Receipt:
        return _Receipt(charge_id="c")

    with pytest.raises(saga.DefinitionError, match=r"output='int'.*'_Receipt'"):
        await orchestrator(wrong)

    right = saga.Saga("right_output", input=Job, output=_Receipt)

    @right.step()
    async def charge(ctx: saga.Context[Job]) -> _Receipt:
        return _Receipt(charge_id=f"c-{ctx.input.n}")

    orch = await orchestrator(right)
    run = await orch.start(right, Job(n=3))
    assert await run.result(timeout=20) == _Receipt(charge_id="c-3")
