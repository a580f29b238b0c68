"""The public API surface."""

from __future__ import annotations

import types

import saga


def test_all_is_sorted_and_complete() -> None:
    """Every public name in saga/__init__.py is exported in a sorted __all__."""
    public = {
        name
        for name, obj in vars(saga).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }
    assert saga.__all__ == sorted(saga.__all__)
    assert set(saga.__all__) == public


def test_every_exception_derives_from_saga_error() -> None:
    """One root: `except saga.SagaError` catches everything saga raises."""
    for name in saga.__all__:
        obj = getattr(saga, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, saga.SagaError), name
