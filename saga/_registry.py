"""Which open clients have registered which saga, so that ``checkout.start(...)`` finds
its client while the definition itself holds no reference to any runtime.

Weak on both sides: a closed or forgotten client drops out by itself, and so does a saga
definition nobody holds any more; there is nothing to reset between tests.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from saga._errors import DefinitionError
from saga._run import RunHandle


class Starter(Protocol):
    """What ``Saga.start()`` needs of a client."""

    @property
    def is_open(self) -> bool: ...

    async def start(
        self,
        saga: Any,
        input: Any,
        *,
        key: str | None = None,
        require_same_input: bool = True,
        conn: Any = None,
    ) -> RunHandle: ...


_clients: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def register(saga: Any, client: Starter) -> None:
    _clients.setdefault(saga, weakref.WeakSet()).add(client)


def unregister(saga: Any, client: Starter) -> None:
    clients = _clients.get(saga)
    if clients is not None:
        clients.discard(client)


def open_clients(saga: Any) -> list[Starter]:
    """The open clients that registered ``saga``."""
    return [c for c in _clients.get(saga, ()) if c.is_open]


def the_client(saga: Any) -> Starter:
    """The one open client that registered ``saga`` (``Saga.start`` goes through it)."""
    live = open_clients(saga)
    if len(live) != 1:
        raise DefinitionError(
            f"saga {saga.name!r} is registered with {len(live)} open clients; "
            "start it with `client.start(saga, input)`"
            if live
            else f"saga {saga.name!r} is not registered with an open Client or Orchestrator"
        )
    return live[0]
