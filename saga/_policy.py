"""Retry policies, the bounds of timing settings, and the checks of what a definition
is given: pure values and functions, validated when a saga is declared."""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from saga import _checks
from saga._checks import show
from saga._codec import unusable_type
from saga._errors import DefinitionError, PermanentError

#: The most attempts a policy may allow (attempt numbers are stored as 32-bit ints).
MAX_ATTEMPTS = 1_000_000
#: The longest wait between attempts, and the longest attempt timeout: one year.
MAX_DELAY = 365 * 24 * 3600.0
#: Lease bounds: a lease must outlive a heartbeat round trip, and a dead worker's lease
#: must run out within a day.
MIN_LEASE_SECONDS = 0.1
MAX_LEASE_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Retry:
    """How a step or compensation is retried.

    Attempt ``n`` (1-based) that fails with a retryable error waits
    ``min(max_delay, initial_delay * multiplier ** (n - 1))``, reduced by a random
    fraction of up to ``jitter`` so that many runs failing together do not retry in step.
    ``max_attempts`` counts every attempt, including one whose worker crashed.
    ``PermanentError`` and the types in ``non_retryable`` fail at once. When a step
    gives up, ``on_give_up="compensate"`` (the default) rolls the run back;
    ``on_give_up="stop"`` stops it for an operator first (``stopped``), who retries the
    step (``retry()``) or lets the run compensate (``cancel()``). Compensations ignore it.
    """

    max_attempts: int = 3
    initial_delay: float = 0.5
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5
    non_retryable: Sequence[type[BaseException]] = ()  # a tuple or list (kept as a tuple)
    on_give_up: Literal["compensate", "stop"] = "compensate"

    def __post_init__(self) -> None:
        err = DefinitionError
        _checks.integer(
            "Retry.max_attempts", self.max_attempts, err, minimum=1, maximum=MAX_ATTEMPTS
        )
        for name in ("initial_delay", "max_delay"):
            _checks.seconds(
                f"Retry.{name}", getattr(self, name), err, maximum=MAX_DELAY, allow_zero=True
            )
        multiplier = self.multiplier
        if not isinstance(multiplier, int | float) or isinstance(multiplier, bool):
            raise err(f"Retry.multiplier must be a number, got {_checks.show(multiplier)}")
        if not (_checks.finite(multiplier) and multiplier >= 1):
            raise err(
                f"Retry.multiplier must be a finite number >= 1, got {_checks.show(multiplier)}"
            )
        jitter = self.jitter
        if not isinstance(jitter, int | float) or isinstance(jitter, bool) or not 0 <= jitter <= 1:
            raise err(f"Retry.jitter must be a number within [0, 1], got {_checks.show(jitter)}")
        if not isinstance(self.non_retryable, tuple | list):
            got = _checks.show(self.non_retryable)
            raise err(f"Retry.non_retryable must be a tuple of exception types, got {got}")
        if self.on_give_up not in ("compensate", "stop"):
            raise err(
                f'Retry.on_give_up must be "compensate" or "stop", got '
                f"{_checks.show(self.on_give_up)}"
            )
        object.__setattr__(self, "non_retryable", tuple(self.non_retryable))
        for exc_type in self.non_retryable:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise err(f"Retry.non_retryable holds a non-exception {show(exc_type)}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            growth = float(self.multiplier) ** (attempt - 1)
        except OverflowError:  # a large multiplier after many attempts: the cap applies
            growth = math.inf
        base = min(self.max_delay, self.initial_delay * growth) if self.initial_delay else 0.0
        return base * (1 - self.jitter * rand())

    def retryable(self, exc: BaseException) -> bool:
        """Whether another attempt may help: not for a PermanentError or a
        ``non_retryable`` type, nor for a group of exceptions (a task group's) holding
        one. An exception that cannot be classified (a group nested too deeply or
        holding itself, a type whose checks raise) may be retried: attempts are bounded.
        """
        try:
            return self._retryable(exc, 0)
        except Exception:
            return True

    def _retryable(self, exc: BaseException, depth: int) -> bool:
        kind = type(exc)  # (not exc.__class__: an exception may lie about it)
        if issubclass(kind, BaseExceptionGroup):
            if depth > _GROUP_DEPTH:
                raise RecursionError("exception groups nested too deeply")
            inner = tuple(BaseExceptionGroup.exceptions.__get__(exc))
            return all(self._retryable(one, depth + 1) for one in inner if one is not exc)
        return not issubclass(kind, (PermanentError, *self.non_retryable))


#: Levels of nested exception groups looked into for a non-retryable error.
_GROUP_DEPTH = 100


DEFAULT_STEP_RETRY = Retry()
DEFAULT_COMPENSATION_RETRY = Retry(max_attempts=10)


def function_name(fn: Any) -> str:
    """A step's default name: its function's; one without (a ``functools.partial``) needs
    ``name=``."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        raise DefinitionError(f"{fn!r} has no __name__ (a functools.partial?): pass name=")
    return name


def check_async(fn: Any, what: str, params: int) -> None:
    name = show(getattr(fn, "__qualname__", fn))
    if not inspect.iscoroutinefunction(fn):
        raise DefinitionError(f"{what} {name} must be an `async def` function")
    _checks.takes(fn, params, f"{what} {name}")


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A return annotation that cannot be evaluated yet when the step is declared (a
    model defined further down the module, or in a module still being imported):
    resolved when the saga is registered, whatever the import order was."""

    fn: Callable[..., Any]
    #: The frames of the functions the step was declared in (innermost first): a model
    #: defined in the function that builds the saga, read when resolved.
    frames: tuple[types.FrameType, ...] = ()

    def __repr__(self) -> str:  # (no address: fingerprints read early stay the same)
        return f"<unresolved return annotation of {getattr(self.fn, '__qualname__', '?')}>"


def return_annotation(fn: Callable[..., Any], frames: tuple[types.FrameType, ...] = ()) -> Any:
    """The declared result type, metadata included (``Annotated`` discriminators,
    serializers and validators apply to results too); ``Any`` when undeclared.
    ``frames``: those of the functions the step was declared in (see _return_hint)."""
    try:
        return _return_hint(fn, frames)
    except Exception:  # NameError, or AttributeError from a module half imported
        return Unresolved(fn, frames)


def _return_hint(fn: Callable[..., Any], frames: tuple[types.FrameType, ...] = ()) -> Any:
    """The return annotation alone, evaluated in the function's module (the parameters'
    may name what only exists where it was defined, as the context's input model); a
    name the module lacks, in the functions it was declared in, innermost first, as
    their locals are now (a model defined there, even below the step)."""
    fn = inspect.unwrap(fn)
    annotations = getattr(fn, "__annotations__", None) or {}
    if "return" not in annotations:
        return Any
    shim = types.FunctionType(_SHIM_CODE, getattr(fn, "__globals__", {}))
    shim.__annotations__ = {"return": annotations["return"]}
    try:
        return typing.get_type_hints(shim, include_extras=True)["return"]
    except NameError:
        for frame in frames:
            with contextlib.suppress(NameError):
                hints = typing.get_type_hints(shim, localns=frame.f_locals, include_extras=True)
                return hints["return"]
        raise


_SHIM_CODE = (lambda: None).__code__


def resolve_annotations(saga: Any, *, final: bool = True) -> None:
    """Resolve the steps' return annotations left for registration (see Unresolved);
    not ``final`` (a fingerprint read early), those that still fail stay unresolved."""
    for step in saga.steps:
        if isinstance(step.result_type, Unresolved):
            try:
                step.result_type = _return_hint(step.fn, step.result_type.frames)
            except Exception:
                if final:
                    _unresolvable(saga, step)
        kind = step.result_type
        problem = None if not final or kind is Any else unusable_type(kind)
        if problem is not None:  # refused now, not once a run's step has had its effect
            raise DefinitionError(
                f"saga {saga.name!r}: the return annotation of step {step.name!r} cannot "
                f"be stored and read back: {problem}"
            )


def _unresolvable(saga: Any, step: Any) -> None:
    """At registration: a name the annotation uses is missing (DefinitionError), or it
    evaluates to nothing usable (then the step's results are untyped, as they were)."""
    frames = step.result_type.frames if isinstance(step.result_type, Unresolved) else ()
    try:
        step.result_type = _return_hint(step.fn, frames)
    except NameError as exc:
        raise DefinitionError(
            f"saga {saga.name!r}: the return annotation of step {step.name!r} names "
            f"{exc.name!r}, which is not defined in its module (imported under "
            "TYPE_CHECKING only?): saga reads the step's results back as that type"
        ) from None
    except Exception:
        step.result_type = Any


def check_timeout(timeout: float | None) -> None:
    if timeout is not None:
        _checks.seconds("timeout", timeout, DefinitionError, maximum=MAX_DELAY)


def check_retry(retry: Retry | None) -> None:
    if retry is not None and not isinstance(retry, Retry):
        raise DefinitionError(f"retry must be a saga.Retry, got {show(retry)}")


def check_lease_seconds(value: float, error: type[Exception]) -> float:
    """A lease length both a step and the orchestrator accept."""
    return _checks.seconds(
        "lease_seconds",
        value,
        error,
        minimum=MIN_LEASE_SECONDS,
        maximum=MAX_LEASE_SECONDS,
    )
