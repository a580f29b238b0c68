"""saga: durable sagas with per-step compensation for asyncio, on plain PostgreSQL.

Define a saga with decorated async functions, register it with an
:class:`Orchestrator`, and ``await saga.start(input)``: the run is committed to Postgres,
its steps run with retries on any orchestrator sharing the database, and if a step fails
for good the completed steps are compensated newest first.
"""

from saga._definition import Compensation, Context, Retry, Saga, Step
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    DefinitionError,
    ErrorInfo,
    IdempotencyConflictError,
    InvalidInputError,
    InvalidRunStateError,
    LifecycleError,
    PayloadTooLargeError,
    PermanentError,
    RunCancelledError,
    RunCompensatedError,
    RunError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
    SagaError,
    SerializationError,
)
from saga._operator import (
    PruneResult,
    RunPage,
    StepAttempt,
    count_runs,
    list_runs,
    migrate,
    prune,
    timeline,
)
from saga._orchestrator import Orchestrator
from saga._run import HistoryEvent, RunHandle, RunInfo, RunStatus

__version__ = "0.1.0"

__all__ = [
    "Compensation",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DefinitionError",
    "ErrorInfo",
    "HistoryEvent",
    "IdempotencyConflictError",
    "InvalidInputError",
    "InvalidRunStateError",
    "LifecycleError",
    "Orchestrator",
    "PayloadTooLargeError",
    "PermanentError",
    "PruneResult",
    "Retry",
    "RunCancelledError",
    "RunCompensatedError",
    "RunError",
    "RunFailedError",
    "RunHandle",
    "RunInfo",
    "RunNotFoundError",
    "RunPage",
    "RunStatus",
    "RunTimeoutError",
    "Saga",
    "SagaError",
    "SerializationError",
    "Step",
    "StepAttempt",
    "count_runs",
    "list_runs",
    "migrate",
    "prune",
    "timeline",
]
