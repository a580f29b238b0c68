"""``saga dashboard``: serve the dashboard on its own, with uvicorn.

Without ``--token-env`` it listens on a loopback address only and prints, once, a URL
holding a random token: visiting it sets an HttpOnly, SameSite=Strict cookie and
redirects to the same page without the token. With ``--token-env VAR`` the token is the
value of that environment variable (sent as the cookie, ``?token=`` once, or an
``Authorization: Bearer`` header), and any host may be used. A public host without a
token is refused (exit 2): the dashboard has no open mode.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import importlib
import ipaddress
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO
from urllib.parse import quote, unquote

import anyio
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

import saga
from saga._dsn import command_dsn
from saga._errors import ConfigurationError
from saga.web._app import DashboardApp, dashboard
from saga.web._auth import Operator, SecurityHeaders

EXIT_USAGE = 2
COOKIE = "saga_dashboard_token"


def cookie_name(token: str) -> str:
    """The cookie holding ``token``: named after it, since a browser keeps the cookies of
    one host together whatever the port, and two dashboards on one machine (8080, 8081)
    under one name would each sign the other's visitor out."""
    return f"{COOKIE}_{hashlib.sha256(token.encode()).hexdigest()[:16]}"


def build_parser(prog: str = "saga dashboard") -> argparse.ArgumentParser:
    """The options of ``saga dashboard``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the saga web dashboard (needs the web extra: pip install "
        "'saga[web]'). Without --token-env it listens on loopback only and prints a URL "
        "with a one-time random token.",
    )
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $SAGA_DSN)")
    parser.add_argument("--schema", help="schema of saga's tables (default: $SAGA_SCHEMA or saga)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port (default: 8080)")
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        help="take the access token from this environment variable (required for a "
        "non-loopback --host)",
    )
    parser.add_argument("--read-only", action="store_true", help="look, but do not act")
    parser.add_argument(
        "--operator",
        default="token",
        help="the name recorded in history for actions of token holders (default: token)",
    )
    parser.add_argument("--title", default="saga", help="the dashboard's title")
    parser.add_argument(
        "--target",
        metavar="MODULE:OBJECT",
        help="sagas to register (a saga.Saga or a list of them): signals sent from the "
        "dashboard are validated against their waits' models",
    )
    return parser


def load_sagas(target: str) -> list[saga.Saga[Any]]:
    """The sagas ``MODULE:OBJECT`` names (a Saga or a list/tuple of them); UsageError."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"invalid --target {target!r}: expected MODULE:OBJECT")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder's modules
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load --target {target!r}: {exc}") from None
    if isinstance(obj, saga.Saga):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(s, saga.Saga) for s in obj):
        return list(obj)
    raise UsageError(f"--target {target} is not a saga.Saga or a list of them")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UsageError(Exception):
    pass


def _check_operator(name: str) -> None:
    """``--operator``: a name the dashboard's guard accepts (Operator's own rule)."""
    try:
        Operator(name)
    except saga.ConfigurationError as exc:
        raise UsageError(f"invalid --operator {name!r}: {exc}") from None


def access_token(host: str, token_env: str | None, environ: dict[str, str]) -> str:
    """The token the dashboard asks for; UsageError for a public host without one."""
    if token_env is None:
        if not is_loopback(host):
            raise UsageError(
                f"refusing to serve the dashboard on {host!r} without authentication: pass "
                "--token-env VAR (an environment variable holding the access token), or "
                "listen on a loopback address such as 127.0.0.1"
            )
        return secrets.token_urlsafe(24)
    token = environ.get(token_env, "")
    if len(token) < 16 or not _COOKIE_SAFE.fullmatch(token):
        raise UsageError(
            f"--token-env {token_env}: the environment variable must hold a token of at "
            "least 16 characters, printable ASCII without spaces, quotes, commas, "
            "semicolons or backslashes (it is sent back as a cookie)"
        )
    return token


#: What a cookie's value may hold unquoted (RFC 6265's cookie-octet).
_COOKIE_SAFE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+")


def token_app(
    client: saga.Client, token: str, *, operator: str, read_only: bool, title: str = "saga"
) -> _TokenLanding:
    """The dashboard behind a token: cookie, ``Authorization: Bearer`` or ``?token=``.
    A bad operator name or title is a ConfigurationError now, not at the first request."""
    holder = Operator(operator, can_act=not read_only)
    cookie = cookie_name(token)

    async def authorize(request: Request) -> Operator | None:
        given = request.cookies.get(cookie) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return holder
        return None

    return _TokenLanding(dashboard(client, authorize=authorize, title=title), token)


class _TokenLanding:
    """``?token=...`` once: set the cookie and redirect to the URL without the token."""

    def __init__(self, app: DashboardApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and b"token=" in scope.get("query_string", b""):
            # Read as a URL, not as a form: a "+" of the token (base64) is a "+".
            parts = [p for p in scope["query_string"].decode("latin-1").split("&") if p]
            named = [(unquote(p.partition("=")[0]), p) for p in parts]
            given = [unquote(p.partition("=")[2]) for k, p in named if k == "token"]
            if given and hmac.compare_digest(given[0].encode(), self.token.encode()):
                rest = "&".join(p for k, p in named if k != "token")
                # The full path (ASGI: root_path included); never "//host/...", which
                # a browser would follow to another site.
                path = "/" + scope["path"].lstrip("/")
                response = RedirectResponse(path + ("?" + rest if rest else ""), 303)
                response.set_cookie(
                    cookie_name(self.token), self.token, httponly=True, samesite="strict", path="/"
                )
                await SecurityHeaders(response)(scope, receive, send)  # as every response
                return
        await self.app(scope, receive, send)

    def close_streams(self) -> None:
        self.app.close_streams()


def main(
    argv: Sequence[str] | None = None,
    *,
    dsn: str | None = None,
    schema: str | None = None,
    sagas: Sequence[saga.Saga[Any]] = (),
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``saga dashboard [options]``: serve until interrupted; the exit code (2: usage).
    ``dsn`` and ``schema`` are defaults for ``--dsn``/``--schema`` (the ``saga``
    command's own); ``sagas`` are registered with the dashboard's client, as
    ``--target`` does."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        dsn = command_dsn(args.dsn if args.dsn is not None else dsn)
    except ConfigurationError as exc:
        print(f"saga dashboard: {exc}", file=err)
        return EXIT_USAGE
    if args.schema is not None:  # --schema "" is a bad name, not the default
        schema = args.schema
    else:
        schema = schema or os.environ.get("SAGA_SCHEMA") or "saga"
    if not dsn:
        print("saga dashboard: no database: pass --dsn or set SAGA_DSN", file=err)
        return EXIT_USAGE
    try:
        _check_operator(args.operator)
        token = access_token(args.host, args.token_env, dict(os.environ))
        sagas = [*sagas, *(load_sagas(args.target) if args.target else [])]
    except UsageError as exc:
        print(f"saga dashboard: {exc}", file=err)
        return EXIT_USAGE
    try:
        anyio.run(_serve, args, dsn, schema, sagas, token, out)
    except UsageError as exc:
        print(f"saga dashboard: {exc}", file=err)
        return EXIT_USAGE
    except saga.SagaError as exc:
        print(f"saga dashboard: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve(
    args: argparse.Namespace,
    dsn: str,
    schema: str,
    sagas: list[saga.Saga[Any]],
    token: str,
    out: TextIO,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly: open event streams get
    ``_GRACE`` seconds to close, the client's connections are closed, exit 0.

    Like the other operator commands, it never creates or migrates a schema: an
    unmigrated one is a ConfigurationError when the client opens (exit 1). The arguments
    are checked before any connection: a bad one is a UsageError (exit 2)."""
    try:
        client = saga.Client(dsn, schema=schema, sagas=sagas, migrate=False)
        app = token_app(
            client, token, operator=args.operator, read_only=args.read_only, title=args.title
        )
    except saga.ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    async with client:
        listening = _listen(args.host, args.port)  # before the URL is printed
        port = listening.getsockname()[1]  # --port 0: the one the system chose
        server = _Server(app, args.host, port)
        host = f"[{args.host}]" if ":" in args.host else args.host
        if args.token_env is None:
            print(f"saga dashboard: http://{host}:{port}/?token={quote(token, safe='')}", file=out)
        else:
            print(
                f"saga dashboard: http://{host}:{port}/ (token: ${args.token_env})",
                file=out,
            )
        out.flush()
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        app.close_streams()
                        server.should_exit = True

                tg.start_soon(stop_on_signal)
                with listening:
                    await server.serve(sockets=[listening])
                tg.cancel_scope.cancel()


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket; a port in use (or a host not here) is an error
    saying so, before any URL is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise saga.ConfigurationError(f"cannot listen on {host}:{port}: {reason}") from None


#: Seconds open connections (event streams) get to close at shutdown.
_GRACE = 2.0


def _Server(app: ASGIApp, host: str, port: int) -> Any:
    """A uvicorn server that leaves signals to the command (uvicorn's own handling
    re-raises the signal after shutdown: exit 130 or a kill by SIGTERM)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off",
        timeout_graceful_shutdown=int(_GRACE),
    )  # fmt: skip
    return Server(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
