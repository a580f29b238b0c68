"""`saga dashboard` as a real process: on loopback it prints a URL with a one-time
token, serves pages to whoever visited that URL (a cookie) and 401 to everyone else,
and stops cleanly on SIGINT; `saga dashboard` on a public address without a token
refuses to start."""

from __future__ import annotations

import contextlib
import re
import signal
import socket

import anyio
import httpx

from tests import _harness
from tests.conftest import Children


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_the_command_serves_behind_a_printed_token(children: Children, dsn: str) -> None:
    """The printed URL carries the token; visiting it sets the cookie and lands on the
    overview (200); without it every page is 401; SIGINT stops the server cleanly, even
    with an event stream open: the stream ends, exit 0, no traceback or warning."""
    port = _free_port()
    child = children.python(
        "-m", "saga", "--dsn", dsn, "dashboard", "--port", str(port),
        name="dashboard", ready="saga dashboard: http://",
    )  # fmt: skip
    await child.wait_ready()
    url = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", child.output)
    assert url, child.output
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{base}/")).status_code == 401
        assert (await http.get(f"{base}/runs?token=wrong")).status_code == 401
        landed = await http.get(url[1], follow_redirects=True)
        assert landed.status_code == 200
        assert "token" not in str(landed.url)
        assert (await http.get(f"{base}/runs")).status_code == 200
        async with http.stream("GET", f"{base}/events") as events:
            assert events.status_code == 200
            child.send(signal.SIGINT)  # with a page's event stream open
            # The server closes the stream as it shuts down (after a grace period).
            with anyio.fail_after(15), contextlib.suppress(httpx.RemoteProtocolError):
                async for _ in events.aiter_bytes():
                    pass
    code = await child.wait()
    assert code == 0, (code, child.output)
    for noise in ("Traceback", "Exception ignored", "Warning"):
        assert noise not in child.output


async def test_a_public_address_without_a_token_refuses_to_start(dsn: str) -> None:
    """`saga --dsn X dashboard --host 0.0.0.0` exits 2 at once, saying to pass
    --token-env or to listen on loopback; nothing listens."""
    done = await _harness.run(
        "-m", "saga", "--dsn", dsn, "dashboard", "--host", "0.0.0.0", timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "--token-env" in done.stderr
