"""The web process in client mode: it starts runs and waits for them, and runs no step.

Three pieces, one database::

    export SAGA_DSN=postgresql://localhost/shop
    saga migrate                                              # once per deploy
    saga worker examples.checkout:SAGAS --concurrency 16      # one or more workers
    uvicorn examples.client_worker.web:app                    # the web process(es)

The web process opens a :class:`saga.Client` (``create_app(concurrency=0)``): it
registers the sagas (so inputs are validated and outputs come back typed), starts runs,
and is woken by NOTIFY when they end, but runs no worker loop. The workers import the same sagas
module (``examples/checkout.py``), so both sides agree on names, versions and types.
Scale either side independently; a worker killed mid-step loses nothing (its lease
expires and another worker resumes the run).

The web process also skips migrating (``migrate=False``): the deploy runs ``saga
migrate`` once instead of every web process racing to do it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from examples.fastapi_app import create_app


def create_client_app(dsn: str | None = None, **options: Any) -> FastAPI:
    """The FastAPI example in client mode (a ``saga.Client``, ``migrate=False``)."""
    options.setdefault("migrate", False)
    return create_app(dsn, concurrency=0, **options)


app = create_client_app()
