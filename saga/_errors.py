"""Exceptions raised by saga.

Every exception the library raises derives from one root, so ``except saga.SagaError``
catches all of them. The user's own exception, where there is one in this process,
travels as ``__cause__``; a failure that happened in another process is described by an
:class:`ErrorInfo` (type name and message), never flattened into a string.

Hierarchy::

    SagaError
    ├── DefinitionError          a saga or step definition is broken (raised at definition)
    ├── ConfigurationError       a bad argument to the runtime (schema name, sizes, ...)
    ├── MigrationError           a recorded migration's file changed since it was applied
    ├── InvalidInputError        start() input failed pydantic validation; nothing written
    ├── IdempotencyConflictError start() key used by a run with another input or definition
    ├── SerializationError       a payload cannot be stored as JSON (NaN, bytes, objects, NUL)
    │   └── PayloadTooLargeError a payload is above the configured size cap
    ├── PermanentError           raised by a step to fail at once, without retries
    ├── LifecycleError           an orchestrator used before open, after close, or twice
    ├── RunNotFoundError         no run with that id
    ├── InvalidRunStateError     cancel/retry asked of a run in a state that forbids it
    ├── RunTimeoutError          result(timeout=...) expired; the run goes on (also TimeoutError)
    ├── RunError                 the run ended without completing
    │   ├── RunCompensatedError  a step failed for good and every compensation succeeded
    │   ├── RunCancelledError    cancelled; what had completed was compensated
    │   └── RunFailedError       a compensation exhausted its retries; needs an operator
    └── DatabaseError            a database error, translated at the store boundary
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from uuid import UUID


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A recorded failure: the exception's qualified type name and its message.

    The exception object itself cannot cross processes, so this is what the history and
    :class:`RunError` carry. ``step`` names the step (or compensation) that raised it.
    """

    type: str
    message: str
    step: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ErrorInfo | None:
        if not isinstance(data, dict):
            return None
        return cls(
            type=str(data.get("type", "")),
            message=str(data.get("message", "")),
            step=data.get("step"),
        )

    def __str__(self) -> str:
        where = f" in step {self.step!r}" if self.step else ""
        return f"{self.type}{where}: {self.message}" if self.message else f"{self.type}{where}"


_MAX_MESSAGE = 4000


def storable_text(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` made storable in Postgres and safe to print: NUL and lone surrogates are
    escaped (jsonb and UTF-8 refuse them), and it is cut at ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def exception_type(exc: BaseException) -> str:
    """The qualified type name recorded for an exception (``saga.X`` for saga's own),
    read past a metaclass that hides it."""
    cls = type(exc)
    try:
        module = _plain(type.__getattribute__(cls, "__module__"))
        qualname = _plain(type.__getattribute__(cls, "__qualname__"))
    except Exception:
        return "<unnamed exception type>"
    if module.startswith("saga._"):
        module = "saga"
    name = qualname if module in ("builtins", "") else f"{module}.{qualname}"
    return storable_text(name, 500)


def _plain(text: object) -> str:
    """A str as itself (a str subclass may override what len() or slicing do)."""
    return str.__str__(text) if isinstance(text, str) else ""


def exception_message(exc: BaseException) -> str:
    """The exception's message, whatever its ``__str__`` does (raise, return a non-str,
    hold NUL or lone surrogates)."""
    try:
        text = str(exc)
        if type(text) is not str:  # a subclass whose own methods may raise
            text = str.__str__(text)
    except BaseException:
        try:
            text = f"<unprintable {type(exc).__name__}: {object.__repr__(exc)}>"
        except BaseException:  # pragma: no cover - object.__repr__ does not fail
            text = "<unprintable>"
    return storable_text(text)


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` for error messages of saga's own."""
    message = exception_message(exc)
    return f"{exception_type(exc)}: {message}" if message else exception_type(exc)


def error_record(exc: BaseException, step: str | None) -> dict[str, Any]:
    """The JSON form of a failure, as the history and the run row store it."""
    return {"type": exception_type(exc), "message": exception_message(exc), "step": step}


class SagaError(Exception):
    """Root of every exception raised by saga."""


class DefinitionError(SagaError):
    """A saga, step or compensation definition is invalid."""


class ConfigurationError(SagaError):
    """An argument to the runtime is invalid (schema name, sizes, intervals...)."""


class MigrationError(SagaError):
    """A migration recorded as applied no longer matches its file (its checksum differs):
    the database holds what the old file did. Migrations are immutable once applied."""


class InvalidInputError(SagaError):
    """The input given to ``start()`` failed validation; nothing was written.

    The pydantic ``ValidationError`` is the ``__cause__``.
    """


class IdempotencyConflictError(SagaError):
    """``start()`` got an idempotency key that an existing run of the saga was started
    with, but a different input (or by another version or fingerprint of the saga).
    Nothing was written; ``run_id`` is the existing run.

    Pass ``require_same_input=False`` to ``start()`` to get the existing run instead.
    """

    def __init__(self, message: str, run_id: UUID) -> None:
        super().__init__(message)
        self.run_id = run_id

    def __reduce__(self) -> tuple[Any, ...]:  # (as every error here: it crosses processes)
        return type(self), (self.args[0], self.run_id), self.__dict__


class SerializationError(SagaError):
    """A value cannot be stored as JSON without loss (NaN, bytes, sets, objects, NUL...)."""


class PayloadTooLargeError(SerializationError):
    """A serialized payload is larger than the configured ``max_payload_bytes``."""


class PermanentError(SagaError):
    """Raise from a step or compensation to fail at once, without further retries."""


class LifecycleError(SagaError):
    """An object was used outside its lifecycle (not open, already open, closed)."""


class RunNotFoundError(SagaError):
    """No run exists with the given id (or, ``key``, of ``saga`` with that idempotency
    key: ``run_id`` is then None)."""

    def __init__(
        self, run_id: UUID | None = None, *, key: str | None = None, saga: str | None = None
    ) -> None:
        if run_id is None:
            super().__init__(f"no run of saga {saga!r} has the idempotency key {key!r}")
        else:
            super().__init__(f"no run with id {run_id}")
        self.run_id = run_id
        self.key = key
        self.saga = saga

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = functools.partial(type(self), key=self.key, saga=self.saga)
        return rebuild, (self.run_id,), self.__dict__


class InvalidRunStateError(SagaError):
    """An operation is not allowed in the run's current state."""


class RunTimeoutError(SagaError, TimeoutError):
    """Waiting for a run's result timed out. The run itself goes on."""


class RunError(SagaError):
    """The run ended without completing.

    ``error`` is the failure that started the rollback (``None`` for a cancel);
    ``compensation_error`` is set when a compensation exhausted its retries.
    """

    def __init__(
        self,
        run_id: UUID,
        status: str,
        error: ErrorInfo | None,
        compensation_error: ErrorInfo | None,
    ) -> None:
        parts = [f"run {run_id} ended {status}"]
        if error is not None:
            parts.append(f"failure: {error}")
        if compensation_error is not None:
            parts.append(f"compensation failure: {compensation_error}")
        super().__init__("; ".join(parts))
        self.run_id = run_id
        self.status = status
        self.error = error
        self.compensation_error = compensation_error

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.run_id, self.status, self.error, self.compensation_error)
        return type(self), args, self.__dict__


class RunCompensatedError(RunError):
    """A step failed for good; every needed compensation ran and succeeded."""


class RunCancelledError(RunError):
    """The run was cancelled; the steps that had completed were compensated."""


class RunFailedError(RunError):
    """A compensation exhausted its retries; the run waits for an operator (``retry()``)."""


class RunStoppedError(RunError):
    """A wait timed out and its saga declared ``on_timeout="stop"``: the run is stopped
    for an operator, who sends the awaited signal or retries the wait
    (``error.type`` is ``saga.WaitTimedOut``)."""


class DatabaseError(SagaError):
    """A database operation failed. The driver's exception is the ``__cause__``."""
