"""What the web example tests share: hostile request bodies and a database outage.

The bodies are raw JSON text: ``json.dumps`` refuses to write NaN in strict mode and a
test must send exactly what a careless client would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import asyncpg

#: Bigger than MAX_BODY_BYTES (1 MiB) five times over.
HUGE = 5 * 1024 * 1024

#: Non-finite numbers in every numeric field of an order: the int (pydantic refuses
#: them), the bounded floats (their bounds refuse NaN and -Infinity), and +Infinity in
#: ``weight_kg``, which only ``gt=0`` guards and saga's codec refuses.
NON_FINITE_ORDERS = [
    f'{{"order_id":"nf","amount_cents":{value}}}' for value in ("NaN", "Infinity", "-Infinity")
] + [
    f'{{"order_id":"nf","amount_cents":1,"{field}":{value}}}'
    for field in ("weight_kg", "step_delay")
    for value in ("NaN", "Infinity", "-Infinity")
]

#: The one body of NON_FINITE_ORDERS that passes pydantic and reaches ``start()``.
REACHES_SAGA = '{"order_id":"nf","amount_cents":1,"weight_kg":Infinity}'

#: Orders the model refuses, and bodies that are no order at all.
INVALID_ORDERS = [
    "{}",
    '{"amount_cents":1}',
    '{"order_id":"","amount_cents":1}',
    '{"order_id":"' + "x" * 101 + '","amount_cents":1}',
    '{"order_id":"o","amount_cents":0}',
    '{"order_id":"o","amount_cents":-1}',
    '{"order_id":"o","amount_cents":1.5}',
    '{"order_id":"o","amount_cents":"lots"}',
    '{"order_id":"o","amount_cents":1,"weight_kg":0}',
    '{"order_id":"o","amount_cents":1,"step_delay":60}',
    '{"order_id":null,"amount_cents":1}',
    "[]",
    '"order"',
    "not json",
    "",
]

#: Bodies no JSON parser of Python reads, each an invalid order as "not json" is: an
#: integer beyond Python's 4,300-digit limit, arrays nested deeper than its recursion
#: limit, bytes that are not UTF-8 (FastAPI itself answers them 400, not 422).
UNREADABLE_BODIES = {
    "a 5,000-digit amount": b'{"order_id":"h1","amount_cents":' + b"9" * 5000 + b"}",
    "nesting 5,000 deep": b'{"order_id":"d1","amount_cents":5,"card":'
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "bytes that are not UTF-8": b'{"order_id":"u\xff\xfe","amount_cents":5}',
}

#: Run ids that are not UUIDs (the apps answer 422: the request is malformed, it does
#: not name a run that could exist).
MALFORMED_RUN_IDS = ["not-a-uuid", "123", "00000000-0000-0000-0000-0000000000000", "%20"]


def huge_order() -> bytes:
    """A well-formed order of HUGE bytes (its destination is the bulk)."""
    head = b'{"order_id":"big","amount_cents":1,"destination":"'
    return head + b"x" * (HUGE - len(head) - 2) + b'"}'


async def chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``body`` streamed in pieces: sent chunked, without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


@asynccontextmanager
async def database_down(base_dsn: str, dsn: str) -> AsyncIterator[None]:
    """Inside the block the database of ``dsn`` refuses new connections and every
    session to it is gone, as if its server were unreachable; the shared server stays up
    for the other tests. On exit the database accepts connections again."""
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        # pg_terminate_backend only signals: wait until the sessions are gone.
        sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
        with anyio.fail_after(10):
            while await admin.fetchval(sessions, name):  # noqa: ASYNC110 - polling the server
                await anyio.sleep(0.01)
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
