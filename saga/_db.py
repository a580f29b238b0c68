"""The database boundary: pools, schema names, saga's SQL files, driver errors.

Everything here is what the store modules (``_store*``, ``_migrate``, ``_partitions``)
share: one helper opens every pool saga owns; the schema name is validated against a
strict pattern and quoted, never interpolated raw; the named queries of
``sql/queries.sql`` and the numbered migrations are read once; asyncpg errors are
translated into :class:`saga.DatabaseError`, so no driver type escapes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import anyio
import asyncpg

from saga._checks import show
from saga._dsn import read_dsn
from saga._errors import ConfigurationError, DatabaseError

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


#: A connection statements can run on: the caller's own, or one of a pool's.
Executor = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def validate_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"invalid schema name {show(schema)}: it must match ^[a-z_][a-z0-9_]{{0,62}}$"
        )
    if schema.startswith("pg_") or schema == "information_schema":
        raise ConfigurationError(
            f"invalid schema name {show(schema)}: PostgreSQL reserves the prefix pg_ and "
            "information_schema for its own schemas (pg_dump skips them)"
        )
    return schema


def validate_dsn(dsn: str) -> str:
    """A DSN asyncpg can read: a ``postgresql://`` or ``postgres://`` URI (asyncpg reads
    no libpq ``key=value`` strings) whose host list, ports (1-65535) and query it can
    parse (see ``saga._dsn``). A ConfigurationError naming what is wrong otherwise."""
    read_dsn(dsn)
    return dsn


def check_dsn_or_pool(dsn_or_pool: Any, min_size: int, why: str = "") -> None:
    """A DSN (see validate_dsn), or an asyncpg pool of at least ``min_size``
    connections (``why``: what needs them)."""
    if isinstance(dsn_or_pool, str):
        validate_dsn(dsn_or_pool)
    elif not isinstance(dsn_or_pool, asyncpg.Pool):
        raise ConfigurationError("dsn_or_pool must be a DSN string or an asyncpg.Pool")
    elif dsn_or_pool.get_max_size() < min_size:
        raise ConfigurationError(
            f"the pool allows {dsn_or_pool.get_max_size()} connection(s); saga needs at "
            f"least {min_size}{why}"
        )


def describe_dsn(dsn: str) -> str:
    """Where a DSN points (host, port, database: never the user or the password); for a
    DSN saga cannot read, why (validate_dsn refuses those before any connection)."""
    try:
        return read_dsn(dsn).describe()
    except ConfigurationError as exc:
        return f"the database of a DSN saga cannot read ({exc})"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def channel(schema: str, suffix: str) -> str:
    """A NOTIFY channel name of the schema: ``<schema>_<suffix>`` when that fits in
    Postgres' 63-byte identifiers, else a fixed-length name derived from the schema."""
    name = f"{schema}_{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]
    return f"saga_{digest}_{suffix}"


@cache
def _raw_queries() -> dict[str, str]:
    text = (resources.files("saga") / "sql" / "queries.sql").read_text("utf-8")
    parts = _NAME_LINE.split(text)
    named = {
        name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }
    # A fragment (a condition several queries share) replaces its placeholder in them.
    for name in [n for n in named if n.startswith("fragment_")]:
        fragment = _without_comments(named.pop(name))
        placeholder = "__" + name.removeprefix("fragment_") + "__"
        named = {n: sql.replace(placeholder, fragment) for n, sql in named.items()}
    named["claim_prioritized"] = _prioritized(named["claim"], named["claim_prioritized_candidates"])
    # Graph items' writes and signals in a group commit's lead skip the runs another
    # transaction holds (written again alone, waiting: see saga._group).
    assert named["graph_lock"].endswith("FOR UPDATE")
    named["graph_lock_skip"] = named["graph_lock"] + " SKIP LOCKED"
    run_lock = "FROM __schema__.runs WHERE id = $1\n    FOR UPDATE\n), target AS ("
    assert named["send_signal"].count(run_lock) == 1
    named["send_signal_skip"] = named["send_signal"].replace(
        run_lock, run_lock.replace("FOR UPDATE", "FOR UPDATE SKIP LOCKED")
    )
    for claim in ("claim", "claim_prioritized"):
        named[f"transition_{claim}"] = _with_claim(
            named[claim], named["transition_batch"], named["transition_claim_rows"]
        )
    return named


def _without_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.startswith("--"))


def _with_claim(claim: str, batch: str, rows: str) -> str:
    """One statement that writes a batch of transitions and claims runs for the slots
    they free (one commit, where two statements would cost two): ``claim``'s CTEs
    ($1-$12), then ``batch``'s ($13 on), then ``rows``. The claim skips the batch's own
    runs: one statement must not update a row twice."""
    claim_ctes = claim[: claim.rindex("SELECT * FROM claimed")].rstrip()
    claim_ctes = claim_ctes.replace(
        "WHERE r.due_at <= now()", "WHERE r.due_at <= now() AND r.id <> ALL($13::uuid[])"
    )
    shift = int(max(re.findall(r"\$(\d+)", claim), key=int))
    ctes = batch[batch.index("WITH briefly AS") + len("WITH ") : batch.rindex("\nSELECT upd.id")]
    body = ctes + "\n" + rows
    body = re.sub(r"\$(\d+)", lambda m: f"${int(m[1]) + shift}", body)
    return f"{claim_ctes}, {body.replace('), ev AS (', '), transition_ev AS (')}"


def _prioritized(claim: str, candidates: str) -> str:
    """``claim`` with its first CTE (candidates in due order) replaced by the CTEs of
    ``candidates`` (higher priorities first): one claim statement, two orders, and
    orchestrators without priorities keep the shorter one (it plans faster)."""
    start, end = claim.index("WITH candidates AS ("), claim.index("), closing AS (")
    with_ctes = candidates[candidates.index("WITH urgent AS (") :]
    return claim[:start] + with_ctes + ", closing AS (" + claim[end + len("), closing AS (") :]


def queries(schema: str) -> dict[str, str]:
    """The named queries, for one (validated) schema."""
    quoted = quote_ident(validate_schema(schema))
    return {name: sql.replace("__schema__", quoted) for name, sql in _raw_queries().items()}


_PLACEHOLDER = re.compile(r"__([a-z]+(?:_[a-z]+)*)__")


def query(name: str, schema: str, /, **values: str) -> str:
    """The named query ``name`` for one (validated) schema, its other placeholders
    filled: ``part=...`` for ``__part__``, and so on (each value a quoted identifier or
    a literal the caller built, never user input). One pass: a value is never read
    again for placeholders (a schema may be named ``__part__``)."""
    values["schema"] = quote_ident(validate_schema(schema))

    def value(match: re.Match[str]) -> str:
        if match[1] not in values:  # a programming error: never sent half-filled
            raise RuntimeError(f"query {name} needs a value for {match[0]}")
        return values[match[1]]

    return _PLACEHOLDER.sub(value, _raw_queries()[name])


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str  # with __schema__ where the schema goes
    checksum: str  # sha256 of the file: a recorded migration must never change


@cache
def migrations() -> tuple[Migration, ...]:
    folder = resources.files("saga") / "sql" / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            data = entry.read_bytes()
            checksum = hashlib.sha256(data).hexdigest()
            found.append(Migration(int(match[1]), match[2], data.decode("utf-8"), checksum))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"saga migrations are not numbered 1..n: {versions}")
    return tuple(found)


def latest_migration() -> int:
    return len(migrations())


def schema_sql(schema: str) -> str:
    """``sql/schema.sql``, the schema as a reader should see it, for one schema."""
    text = (resources.files("saga") / "sql" / "schema.sql").read_text("utf-8")
    return text.replace("__schema__", quote_ident(validate_schema(schema)))


_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # Raised on a connection broken in the middle of an operation (server gone).
    asyncpg.InternalClientError,
    OSError,
)


#: What a database that cannot be reached now raises (down, restarting, shutting down,
#: out of connection slots, a connection broken mid-statement), as opposed to one that
#: refused a statement.
_UNREACHABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def unreachable(exc: DatabaseError) -> bool:
    """Whether ``exc`` says the database cannot be reached now (its cause: see above)."""
    return isinstance(exc.__cause__, _UNREACHABLE)


#: What a server answers at connection time to a setting asyncpg passed it from the DSN's
#: query (``?statement_timeout=abc``, ``?connect_timeout=5``, which libpq reads but
#: asyncpg does not): an option of the DSN it refused, not an outage.
_REFUSED_SETTINGS = (
    asyncpg.UndefinedObjectError,
    asyncpg.InvalidParameterValueError,
    asyncpg.CantChangeRuntimeParamError,
)

#: What asyncpg's DSN parser raises for what it cannot read, besides its
#: ClientConfigurationError (int() of a port, an empty host in a list, ...): the text is
#: not repeated, it may hold the password.
_DSN_PARSE_ERRORS = (ValueError, TypeError, IndexError, AttributeError)


class translate_errors:  # a function to its callers: ``with translate_errors(...)``
    """Turn driver and connection errors into DatabaseError, keeping them as the cause.

    A plain context manager (``with``; ``async with`` works too, beside other async
    ones): the step's hot path enters one per write, and a generator-based one cost
    1.5 µs against 0.2."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        if isinstance(exc, asyncpg.ClientConfigurationError):  # a DSN option asyncpg refused
            raise ConfigurationError(f"{self._what} failed: {exc}") from exc
        if isinstance(exc, _DRIVER_ERRORS):
            raise DatabaseError(f"{self._what} failed: {type(exc).__name__}: {exc}") from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(kind, exc, tb)


@asynccontextmanager
async def listening(
    conn: Executor, channels: Sequence[str], callback: Callable[..., None]
) -> AsyncIterator[None]:
    """LISTEN on ``channels`` (``callback`` hears them) while the block runs.

    However the block ends (a cancel in the middle of a LISTEN included), the connection
    goes back to its pool listening to nothing: asyncpg warns about a connection released
    with a listener, and saga's pools do not UNLISTEN on release (see ``_keep_session``).
    When a LISTEN or an UNLISTEN was cut short (a cancel, an error, 2 s), the server may
    still hold it: the connection is closed instead of being reused."""
    added = 0
    try:
        for name in channels:
            await conn.add_listener(name, callback)
            added += 1
        yield
    finally:
        clean = added == len(channels)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2) as late:
            for name in channels:  # (asyncpg forgets the callback before its UNLISTEN)
                try:
                    await conn.remove_listener(name, callback)
                except Exception:  # the connection broke: closing it below is all to do
                    clean = False
        if conn.is_closed():
            # asyncpg keeps the callbacks of a connection that closed under them (the
            # server ended it), and warns when it goes back to its pool.
            listeners = getattr(conn, "_listeners", {})
            for name in channels:
                listeners.pop(name, None)
        elif late.cancelled_caught or not clean:
            conn.terminate()  # (a pool's connection: released by this, not usable after)


async def _keep_session(_conn: Any) -> None:
    """Pool reset for saga's own pools: nothing to undo.

    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL``) is a round trip and a transaction on every release, which doubled the commits
    per step. saga's sessions keep no server-side state: no cursors, no settings, no
    session advisory locks but the LISTEN session's presence mark (see _store_peers), and
    the listener removes its LISTENs and that mark explicitly. asyncpg still rolls back
    any open transaction before this runs.
    """


#: How long a session of a pool saga owns may sit idle inside a transaction (see
#: open_pool): longer than a busy but healthy process ever leaves one (its event loop
#: blocked that long, its leases, 30 s by default, would have expired too).
IDLE_IN_TRANSACTION = "60s"


async def open_pool(dsn: str, max_size: int, *, generic: bool = False) -> asyncpg.Pool:
    """A pool saga owns. ``min_size=0``: asyncpg would otherwise log a traceback for each
    attempt to restore its connection floor while the database is away.

    ``generic``: its sessions plan prepared statements once (``plan_cache_mode =
    force_generic_plan``), for an orchestrator's statements on given runs (see
    ``Store.hot``). On the day-partitioned runs, Postgres would otherwise plan them at
    every execution (custom plans: their costs depend on a LIMIT or a run id), and
    planning over every partition cost two thirds of a claim's database time. Every
    pool saga owns runs with ``jit = off``."""
    # No JIT: saga's statements are short, and the few that read a whole day (a prune's)
    # are costed high enough for Postgres to spend a second compiling them. A process
    # that stalls inside one of its transactions (a frozen VM or container) would hold
    # that transaction's row locks for as long as it stalls: a session idle in a
    # transaction for IDLE_IN_TRANSACTION is ended by Postgres (saga's own transactions
    # are a few statements, run back to back).
    settings = {"jit": "off", "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION}
    if generic:
        settings["plan_cache_mode"] = "force_generic_plan"
    where = f"connecting to {describe_dsn(dsn)}"
    try:
        async with translate_errors(where):
            pool: asyncpg.Pool = await asyncpg.create_pool(
                dsn, min_size=0, max_size=max_size, reset=_keep_session, server_settings=settings
            )
            if not generic:  # (opened next to a general pool, which reached the server)
                try:  # connect now, so that an unreachable server is named as such
                    await pool.release(await pool.acquire())
                except BaseException:
                    await close_pool(pool)
                    raise
    except DatabaseError as exc:
        if isinstance(exc.__cause__, _REFUSED_SETTINGS):  # the DSN's, saga's are valid
            raise ConfigurationError(
                f"{where} failed: the server refused an option of the DSN: {exc.__cause__}"
            ) from exc.__cause__
        raise
    except _DSN_PARSE_ERRORS as exc:  # what validate_dsn cannot see: PGPORT=abc, ...
        raise ConfigurationError(
            f"{where} failed: asyncpg cannot read the DSN or the PG* variables "
            f"({type(exc).__name__})"
        ) from exc
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close a pool saga owns, within 5 s whatever happens (then terminate it)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5) as scope:
        await pool.close()
    if scope.cancelled_caught:
        pool.terminate()
