"""Reading a DSN the way asyncpg will, before any connection.

asyncpg parses a DSN only when it connects, and a DSN it cannot read there raises a
bare ``ValueError`` or ``IndexError`` (a port that is no number, an unbalanced ``[``, an
empty host in a list), while a port beyond 65535 is silently wrapped by the socket
layer (99999 connects to 34463). :func:`read_dsn` follows asyncpg's reading of the host
part and the query (its ``_parse_connect_dsn_and_args``) and refuses what it could not
read, or would read wrongly, with a :class:`ConfigurationError` naming what is wrong.
Messages never repeat the user-info part of a DSN (its password): only digits of a
port, and the names of query fields, are quoted back.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass

from saga._errors import ConfigurationError

_IPV6 = re.compile(r"(?:\[([^\]]+)\])(?::([0-9]+))?")  # asyncpg's, with re.match
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_EXAMPLE = "postgresql://user:password@host:5432/database"
#: What a URI scheme looks like (RFC 3986), up to 20 characters: safe to name in an error.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,19}")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a DSN points: its hosts (or socket folders, none: the default) and their
    ports (one per host, or none without a host; None: ``PGPORT``, else 5432)."""

    database: str | None
    hosts: tuple[str, ...]
    ports: tuple[int | None, ...]

    def describe(self) -> str:
        """``the database 'db' at host, port 5432``: never the user or the password."""
        database = repr(self.database) if self.database else "the default"
        if not self.hosts:
            ports = ",".join(_port(p) for p in self.ports) or _port(None)
            return f"the database {database} at the default host, port {ports}"
        places = set(self.ports)
        if len(places) == 1:
            port = _port(places.pop())
            return f"the database {database} at {','.join(self.hosts)}, port {port}"
        where = ", ".join(
            f"{h} port {_port(p)}" for h, p in zip(self.hosts, self.ports, strict=True)
        )
        return f"the database {database} at {where}"


def _port(port: int | None) -> str:
    return str(port) if port is not None else os.environ.get("PGPORT") or "5432"


def _refuse(why: str) -> ConfigurationError:
    return ConfigurationError(f"invalid DSN: {why}")


def _check_port(text: str, where: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _refuse(f"the port {where} is not a number")
    if not 1 <= int(text) <= 65535:
        raise _refuse(f"the port {text} {where} is outside 1-65535")
    return int(text)


def _hosts(spec: str, where: str, *, unquote: bool) -> tuple[list[str], list[int | None]]:
    """A comma-separated host list (``host``, ``host:port``, ``[v6]:port``, ``/socket``)."""
    hosts: list[str] = []
    ports: list[int | None] = []
    for item in spec.split(","):
        if not item:
            raise _refuse(f"an empty host in the host list {where}")
        if item[0] == "/":
            addr, port = item, ""
        elif item[0] == "[":
            match = _IPV6.match(item)
            if match is None:
                raise _refuse(f"an IPv6 host {where} lacks its closing ']'")
            addr, port = match[1], match[2] or ""
        else:
            addr, _, port = item.partition(":")
        hosts.append(urllib.parse.unquote(addr) if unquote else addr)
        port = urllib.parse.unquote(port) if unquote else port
        ports.append(_check_port(port, where) if port else None)
    return hosts, ports


def _urllib_reason(exc: ValueError) -> str:
    if "Invalid IPv6 URL" in str(exc):
        return "a '[' without its ']', or the reverse"
    if "does not appear to be" in str(exc):
        return "a host in brackets that is not an IP address"
    return "characters that Unicode NFKC normalization changes"


def _query(text: str) -> dict[str, str]:
    if not text:
        return {}
    try:
        fields = urllib.parse.parse_qs(text, strict_parsing=True)
    except ValueError:
        raise _refuse("the query (after '?') has a field without '=' or an empty one") from None
    return {name: values[-1] for name, values in fields.items()}  # asyncpg keeps the last


def _places(netloc: str, query: dict[str, str]) -> tuple[list[str], list[int | None]]:
    """The hosts and ports asyncpg connects to (none: its defaults), checked."""
    # asyncpg splits user info at the first '@' (urllib at the last).
    spec = netloc.partition("@")[2] if "@" in netloc else netloc
    hosts, ports = _hosts(spec, "in the host part", unquote=True) if spec else ([], [])
    query_ports: list[int | None] = []
    if query.get("port"):
        query_ports = [_check_port(p, "in port=") for p in query["port"].split(",")]
    if query.get("host"):
        query_hosts, host_ports = _hosts(query["host"], "in host=", unquote=False)
        if not hosts:  # asyncpg reads host= (and port=) only without a host in the URI
            hosts, ports = query_hosts, query_ports or host_ports
    if not hosts:
        ports = query_ports
    if len(ports) > 1 and hosts and len(ports) != len(hosts):
        raise _refuse(f"{len(ports)} ports for {len(hosts)} hosts")
    if len(ports) == 1 and len(hosts) > 1:
        ports = ports * len(hosts)
    return hosts, ports


def read_dsn(dsn: object) -> Target:
    """Where ``dsn`` points, or a ConfigurationError saying why asyncpg could not read
    it (or would read it wrongly)."""
    if not isinstance(dsn, str):
        raise ConfigurationError(f"the DSN must be a str, got {type(dsn).__name__}")
    scheme = dsn.partition("://")[0].lower() if "://" in dsn else ""
    if scheme not in ("postgresql", "postgres"):
        # Only a scheme is named: the rest of a DSN may be a password (u:secret@db/app).
        shown = f"the scheme {scheme!r}" if _SCHEME.fullmatch(scheme) else "no scheme"
        raise ConfigurationError(
            f"the DSN must be a postgresql:// URI, e.g. {_EXAMPLE}, got {shown}"
        )
    try:
        url = urllib.parse.urlparse(dsn)
    except ValueError as exc:  # its text may hold the password: not repeated
        raise _refuse(f"its host part cannot be read ({_urllib_reason(exc)})") from None
    query = _query(url.query)
    hosts, ports = _places(url.netloc, query)
    sslmode = query.get("sslmode")
    if sslmode is not None and sslmode.replace("_", "-") not in _SSLMODES:
        raise _refuse(f"sslmode must be one of {', '.join(_SSLMODES)}")
    path = urllib.parse.unquote(url.path[1:] if url.path.startswith("/") else url.path)
    database = path or query.get("dbname") or query.get("database")
    return Target(database, tuple(hosts), tuple(ports))


def command_dsn(given: str | None) -> str | None:
    """The DSN a command runs on: ``--dsn`` when given, else ``SAGA_DSN`` (empty: not
    set); None: neither. An empty ``--dsn`` is refused, never read as "use SAGA_DSN":
    it is a shell variable that was not set (``--dsn "$STAGING_DSN"``), and the
    environment's database may be another one."""
    if given is None:
        return os.environ.get("SAGA_DSN") or None
    if not given.strip():
        raise ConfigurationError(
            "--dsn is empty (a shell variable that was not set?): pass a DSN, or leave "
            "--dsn out to use SAGA_DSN"
        )
    return given
