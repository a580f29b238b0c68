"""examples/responses.py: the one table mapping saga's errors to HTTP statuses (no
database; the apps' tests check the same statuses over HTTP)."""

from __future__ import annotations

import uuid

import pytest

import saga
from examples import responses
from examples.responses import RETRY_AFTER, error_response


class NarrowSerializationError(saga.SerializationError):
    """A subclass the table does not list."""


class NarrowTooLargeError(saga.PayloadTooLargeError):
    """A subclass of a subclass the table does list."""


MAPPED: list[tuple[saga.SagaError, int]] = [
    (saga.InvalidInputError("invalid input for saga 'checkout'"), 422),
    (saga.SerializationError("input.weight_kg: inf cannot be stored as JSON"), 422),
    (NarrowSerializationError("input: nope"), 422),
    (saga.PayloadTooLargeError("input: 9 bytes of JSON is above the limit of 8"), 413),
    (NarrowTooLargeError("input: too large"), 413),
    (saga.RunNotFoundError(uuid.uuid4()), 404),
    (saga.InvalidRunStateError("run ended cancelled: cannot cancel"), 409),
    (saga.IdempotencyConflictError("key 'o-1' was used with another input", uuid.uuid4()), 409),
    (saga.DatabaseError('starting a run failed: database "secret_db" is down'), 503),
    (saga.LifecycleError("the orchestrator is closed"), 503),
]


@pytest.mark.parametrize(("exc", "status"), MAPPED, ids=[type(e).__name__ for e, _ in MAPPED])
def test_each_error_class_gets_its_status_and_body(exc: saga.SagaError, status: int) -> None:
    """Every mapped error and its subclasses get the status of their nearest listed
    class (a PayloadTooLargeError is a SerializationError but answers 413), a body
    ``{"error": <type name>, "detail": <message>}``, and a 503 a Retry-After and a
    detail that does not repeat the database's message."""
    mapped = error_response(exc)
    assert mapped is not None
    got_status, body, headers = mapped
    assert got_status == status
    assert set(body) == {"error", "detail"}
    assert body["error"] == type(exc).__name__
    if status == 503:
        assert headers == {"Retry-After": str(RETRY_AFTER)}
        assert str(exc) not in body["detail"]
        assert "secret_db" not in body["detail"]
    else:
        assert headers == {}
        assert body["detail"] == str(exc)


@pytest.mark.parametrize(
    "exc",
    [
        saga.ConfigurationError("schema name"),
        saga.DefinitionError("broken saga"),
        saga.RunTimeoutError("timed out"),
        saga.RunError(uuid.uuid4(), "compensated", None, None),
        saga.SagaError("root"),
        ValueError("not saga's"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unmapped_errors_are_left_to_be_500s(exc: Exception) -> None:
    """Errors that are the server's own bug, or that the routes handle themselves
    (timeouts, ended runs), are not mapped: the framework answers 500."""
    assert error_response(exc) is None


def test_the_most_specific_class_wins_whatever_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table is looked up along the error's MRO, so listing SerializationError
    before or after PayloadTooLargeError does not change a status; adding a type is one
    line."""
    reordered = dict(reversed(list(responses.ERROR_STATUS.items())))
    monkeypatch.setattr(responses, "ERROR_STATUS", reordered)
    for exc, status in MAPPED:
        mapped = error_response(exc)
        assert mapped is not None
        assert mapped[0] == status


def test_the_table_lists_only_saga_errors() -> None:
    """Every key is a saga.SagaError subclass with a 4xx/5xx status."""
    for error_type, status in responses.ERROR_STATUS.items():
        assert issubclass(error_type, saga.SagaError)
        assert 400 <= status < 600
