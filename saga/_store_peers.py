"""The store's presence queries: which executing orchestrators share the schema.

An executing orchestrator marks its LISTEN session present with a shared advisory lock
of the schema, held for as long as the session lasts (a crashed process's session ends,
and its mark with it), and tells the others on the schema's peers channel when it comes
and goes. Each counts the marks (``pg_locks``, readable by every role) to pace its
writes (see ``Store.pace``).

A part of :class:`~saga._store.Store` (a mixin).
"""

from __future__ import annotations

from saga._db import Executor, translate_errors


class PresenceQueries:
    """Needs ``_q`` and ``peers_channel`` from the store it is part of."""

    _q: dict[str, str]
    peers_channel: str

    async def enter_presence(self, conn: Executor) -> bool:
        """Mark ``conn``'s session present and notify the others; False when the lock
        was not granted (a session of the application holds that key exclusively)."""
        async with translate_errors("marking this orchestrator present"):
            present: bool = await conn.fetchval(
                self._q["presence_enter"], self.peers_channel, timeout=5
            )
        return present

    async def leave_presence(self, conn: Executor) -> None:
        """Unmark ``conn``'s session (it stays open, back in the pool) and notify."""
        async with translate_errors("unmarking this orchestrator"):
            await conn.execute(self._q["presence_leave"], self.peers_channel, timeout=2)

    async def count_present(self, conn: Executor) -> int:
        """The executing orchestrators marked present on the schema, this one included."""
        async with translate_errors("counting the orchestrators present"):
            count: int = await conn.fetchval(self._q["presence_count"], timeout=5)
        return count
