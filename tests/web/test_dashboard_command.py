"""``saga dashboard``: no open mode on a public address, and the token landing."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest

from saga.web._command import UsageError, access_token, cookie_name, load_sagas, main, token_app

TOKEN = "t" * 32


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_a_public_host_without_a_token_is_refused(host: str) -> None:
    """Listening beyond loopback without --token-env exits 2 with a message saying
    what to do, before any connection or socket is opened."""
    err = io.StringIO()
    code = main(["--dsn", "postgresql://nowhere.invalid/x", "--host", host], err=err)
    assert code == 2
    assert "--token-env" in err.getvalue()
    assert "refusing" in err.getvalue()


def test_a_token_variable_must_hold_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """--token-env naming an unset or short variable exits 2 too."""
    monkeypatch.setenv("DASH_TOKEN", "short")
    err = io.StringIO()
    argv = ["--dsn", "postgresql://x.invalid/x", "--host", "0.0.0.0", "--token-env", "DASH_TOKEN"]
    assert main(argv, err=err) == 2
    assert "DASH_TOKEN" in err.getvalue()


def test_loopback_gets_a_random_token_and_a_public_host_the_given_one() -> None:
    """On loopback each start has a fresh random token; with --token-env the token is
    the variable's value, on any host."""
    first = access_token("127.0.0.1", None, {})
    assert len(first) >= 24
    assert first != access_token("::1", None, {})
    assert access_token("0.0.0.0", "T", {"T": TOKEN}) == TOKEN


async def test_the_token_url_sets_a_cookie_and_drops_the_token(open_client: Any) -> None:
    """Visiting ?token=... with the right token sets an HttpOnly SameSite=Strict cookie
    and redirects to the URL without it; the cookie (or a Bearer header) then signs in
    as the operator named by --operator; anything else is 401."""
    client = await open_client()
    app = token_app(client, TOKEN, operator="ops", read_only=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        assert (await http.get("/")).status_code == 401
        assert (await http.get("/?token=wrong")).status_code == 401
        landing = await http.get(f"/runs?status=failed&token={TOKEN}")
        assert landing.status_code == 303
        assert landing.headers["location"] == "/runs?status=failed"
        cookie = landing.headers["set-cookie"]
        assert f"{cookie_name(TOKEN)}={TOKEN}" in cookie
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        page = await http.get("/runs?status=failed")
        assert page.status_code == 200
        assert "ops" in page.text
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        bearer = await http.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200


@pytest.mark.parametrize(
    "token",
    [
        "токен-доступа-1234567890",  # not ASCII: no cookie can carry it
        "a token with spaces 123",
        "trailing-newline-1234567\n",
        'quote"semicolon;1234567890',
        "back\\slash,comma-1234567890",
    ],
)
def test_a_token_a_cookie_cannot_carry_is_refused_at_start(token: str) -> None:
    """README (saga dashboard): the token URL sets a cookie holding the token; a token
    that a cookie cannot carry as it is (outside printable ASCII, spaces, quotes,
    commas, semicolons, backslashes) would let nobody sign in, so --token-env refuses it
    at start, saying why, instead of serving a dashboard nobody can open."""
    with pytest.raises(UsageError, match="printable ASCII"):
        access_token("0.0.0.0", "T", {"T": token})


def test_a_generated_token_is_accepted() -> None:
    """Tokens as people make them (openssl rand -base64, secrets.token_urlsafe, hex)
    are accepted by --token-env."""
    for token in ("q1w2e3R4+T5y6/U7i8o9P0==", "Zm9vYmFyLWJhei1xdXV4LTEyMzQ", "0123456789abcdef"):
        assert access_token("0.0.0.0", "T", {"T": token}) == token


async def test_the_token_landing_never_redirects_to_another_site(open_client: Any) -> None:
    """A token URL whose path starts with two slashes (//evil.example/?token=...)
    redirects to a path of this site (/evil.example/), never to the protocol-relative
    address //evil.example/, which a browser would follow to another host."""
    app = token_app(await open_client(), TOKEN, operator="ops", read_only=False)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "//evil.example/",
        "raw_path": b"//evil.example/",
        "root_path": "",
        "query_string": f"token={TOKEN}".encode(),
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8080),
    }
    await app(scope, receive, send)
    start = sent[0]
    assert start["status"] == 303
    location = dict(start["headers"])[b"location"].decode()
    assert location == "/evil.example/"


async def test_read_only_token_holders_cannot_act(open_client: Any) -> None:
    """--read-only: token holders may look (200) but every POST is 403."""
    client = await open_client()
    app = token_app(client, TOKEN, operator="ops", read_only=True)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        assert (await http.get("/runs", headers=headers)).status_code == 200
        response = await http.post("/runs/bulk", headers=headers, data={"action": "cancel"})
        assert response.status_code == 403


def test_target_names_the_sagas_to_register() -> None:
    """--target MODULE:OBJECT loads a saga or a list of them; anything else is a usage
    error (exit 2) before any connection."""
    assert [s.name for s in load_sagas("tests._wait_sagas:SAGAS")] == [
        "approval",
        "open_ended",
        "napping",
    ]
    assert [s.name for s in load_sagas("tests._wait_sagas:approval")] == ["approval"]
    for bad in ("tests._wait_sagas", "tests._wait_sagas:nothing", "no_such_module:x", "io:open"):
        with pytest.raises(UsageError):
            load_sagas(bad)
    err = io.StringIO()
    assert main(["--dsn", "postgresql://x.invalid/x", "--target", "io:open"], err=err) == 2
    assert "--target" in err.getvalue()
