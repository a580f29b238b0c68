"""saga: durable sagas with per-step compensation for asyncio, on plain PostgreSQL.

Define a saga with decorated async functions, register it with an
:class:`Orchestrator`, and ``await saga.start(input)``: the run is committed to Postgres,
its steps run with retries on any orchestrator sharing the database, and if a step fails
for good the completed steps are compensated newest first.
"""

from saga._bulk import BulkResult, cancel_runs, count_matching, needs_attention, retry_runs
from saga._children import ChildFailed, InputsChanged, TakenKey, TooManyChildren
from saga._client import Client
from saga._context import Context
from saga._cron import Schedule
from saga._definition import Compensation, Saga, Step
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    DefinitionError,
    ErrorInfo,
    IdempotencyConflictError,
    InvalidInputError,
    InvalidRunStateError,
    LifecycleError,
    MigrationError,
    PayloadTooLargeError,
    PermanentError,
    RunCancelledError,
    RunCompensatedError,
    RunError,
    RunFailedError,
    RunNotFoundError,
    RunStoppedError,
    RunTimeoutError,
    SagaError,
    SerializationError,
)
from saga._model import HistoryEvent, RunInfo, RunStatus
from saga._operator import PruneResult, RunPage, count_runs, list_runs, migrate, prune
from saga._orchestrator import Orchestrator
from saga._policy import Retry
from saga._queues import KeyWait, QueueDepth, Queues, RateLimitState, queues
from saga._rate import RateLimit
from saga._run import RunHandle
from saga._schedules import (
    Scheduled,
    list_schedules,
    pause_schedule,
    remove_schedule,
    resume_schedule,
)
from saga._store_sched import ScheduleInfo
from saga._timeline import StepAttempt, timeline
from saga._waits import Sleep, Wait

__version__ = "0.1.0"

__all__ = [
    "BulkResult",
    "ChildFailed",
    "Client",
    "Compensation",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DefinitionError",
    "ErrorInfo",
    "HistoryEvent",
    "IdempotencyConflictError",
    "InputsChanged",
    "InvalidInputError",
    "InvalidRunStateError",
    "KeyWait",
    "LifecycleError",
    "MigrationError",
    "Orchestrator",
    "PayloadTooLargeError",
    "PermanentError",
    "PruneResult",
    "QueueDepth",
    "Queues",
    "RateLimit",
    "RateLimitState",
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
    "RunStoppedError",
    "RunTimeoutError",
    "Saga",
    "SagaError",
    "Schedule",
    "ScheduleInfo",
    "Scheduled",
    "SerializationError",
    "Sleep",
    "Step",
    "StepAttempt",
    "TakenKey",
    "TooManyChildren",
    "Wait",
    "cancel_runs",
    "count_matching",
    "count_runs",
    "list_runs",
    "list_schedules",
    "migrate",
    "needs_attention",
    "pause_schedule",
    "prune",
    "queues",
    "remove_schedule",
    "resume_schedule",
    "retry_runs",
    "timeline",
]
