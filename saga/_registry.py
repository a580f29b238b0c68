"""Which open clients have registered which saga, so that ``checkout.start(...)`` finds
its client while the definition itself holds no reference to any runtime.

Weak on both sides: a forgotten client drops out by itself, and so does a saga
definition nobody holds any more; there is nothing to reset between tests. A closed
client stays listed while something holds it, so that starting through it says it is
closed rather than that nothing registered the saga.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from saga._checks import show
from saga._db import Executor
from saga._errors import ConfigurationError, DefinitionError, LifecycleError
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
        priority: int | None = None,
    ) -> RunHandle: ...


_clients: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
#: The kind of client that registered each saga last ("Client", "Orchestrator"): once
#: that client is gone (closed, then collected), a start still says it closed.
_registered_by: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def definitions(sagas: Iterable[Any]) -> dict[tuple[str, int], Any]:
    """The sagas a client registers, by (name, version): one definition each."""
    found: dict[tuple[str, int], Any] = {}
    for saga in sagas:
        if found.setdefault((saga.name, saga.version), saga) is not saga:
            raise DefinitionError(
                f"two different definitions of saga {saga.name!r} version {saga.version}"
            )
    return found


def register(saga: Any, client: Starter) -> None:
    _clients.setdefault(saga, weakref.WeakSet()).add(client)
    _registered_by[saga] = getattr(client, "_kind", type(client).__name__)


def open_clients(saga: Any) -> list[Starter]:
    """The open clients that registered ``saga``."""
    return [c for c in _clients.get(saga, ()) if c.is_open]


def the_client(saga: Any) -> Starter:
    """The one open client that registered ``saga`` (``Saga.start`` goes through it).
    None open, but one that registered it is closed or its loops died: that one (its
    ``start()`` raises LifecycleError, saying which)."""
    registered: list[Starter] = list(_clients.get(saga, ()))
    live = [c for c in registered if c.is_open]
    if not live and registered:
        return registered[0]
    if not registered and saga in _registered_by:  # (that client closed, then went)
        raise LifecycleError(
            f"the {_registered_by[saga]} that registered saga {saga.name!r} is closed"
        )
    if len(live) != 1:
        raise DefinitionError(
            f"saga {saga.name!r} is registered with {len(live)} open clients; "
            "start it with `client.start(saga, input)`"
            if live
            else f"saga {saga.name!r} is not registered with an open Client or Orchestrator"
        )
    return live[0]


def check_start(sagas: dict[Any, Any], saga: Any, conn: Any, require_same_input: Any) -> None:
    """``start()``'s arguments: a saga registered with the client (that very object),
    ``conn`` an asyncpg connection or None, and a bool ``require_same_input``."""
    try:  # the client's sagas are all Saga objects: finding this one is the whole check
        registered = sagas.get((getattr(saga, "name", None), getattr(saga, "version", None)))
    except TypeError:  # an unhashable name or version: no saga's
        registered = None
    if registered is None or registered is not saga:
        if not isinstance(saga, _saga_type()):
            raise ConfigurationError(f"start() takes a saga.Saga, got {show(saga)}")
        raise DefinitionError(
            f"saga {saga.name!r} v{saga.version} is not registered with this client"
            if registered is None
            else f"another Saga object named {saga.name!r} v{saga.version} is registered with "
            "this client, not this one (is its module imported twice, e.g. as __main__ "
            "and by name?): start the registered object"
        )
    check_conn(conn)
    if not isinstance(require_same_input, bool):
        raise ConfigurationError(
            f"require_same_input must be a bool, got {show(require_same_input)}"
        )


def check_conn(conn: Any) -> None:
    """``conn=`` of a start or a signal: None, or an asyncpg connection in an open
    transaction (outside one each statement commits alone: a start of several
    statements could be half-written, and nothing would be the caller's to roll back)."""
    if conn is None:
        return
    if not isinstance(conn, Executor):
        raise ConfigurationError(
            f"conn must be an asyncpg connection (in a transaction), got {show(conn)}"
        )
    if not conn.is_in_transaction():
        raise ConfigurationError(
            "conn must be in an open transaction (async with conn.transaction()): "
            "saga writes in the caller's transaction, and commits nothing itself"
        )


def _saga_type() -> Any:
    from saga._definition import Saga  # _definition imports this module

    return Saga
