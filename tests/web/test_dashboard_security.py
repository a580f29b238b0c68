"""The dashboard's guard: authorization on every route, read-only operators, CSRF and
cross-site checks, and the security headers of every response."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

import saga
from saga.web import Operator, dashboard
from saga.web._auth import CSP
from tests._sagas import small_saga
from tests.web.conftest import ALICE, RITA, Browser, csrf

ROUTES = [
    ("GET", "/saga/"),
    ("GET", "/saga/runs"),
    ("GET", "/saga/runs?status=bogus"),
    ("GET", f"/saga/runs/{uuid.UUID(int=1)}"),
    ("GET", "/saga/attention"),
    ("GET", "/saga/events"),
    ("GET", "/saga/static/dashboard.css"),
    ("GET", "/saga/static/dashboard.js"),
    ("GET", "/saga/no/such/page"),
    ("POST", f"/saga/runs/{uuid.UUID(int=1)}/cancel"),
    ("POST", "/saga/runs/bulk"),
]


async def test_every_route_answers_401_without_an_operator(
    open_client: Any, browse: Browser
) -> None:
    """Without an operator (authorize returns None) every route, static files and the
    event stream included, answers 401, with the security headers."""
    http = await browse(await open_client())
    for method, path in ROUTES:
        response = await http.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["content-security-policy"] == CSP


async def test_every_response_carries_the_security_headers(
    open_client: Any, browse: Browser
) -> None:
    """Pages, errors and static files all send the strict CSP, nosniff and a
    same-origin referrer policy."""
    http = await browse(await open_client())
    for path in ("/saga/", "/saga/runs", "/saga/runs/x", "/saga/static/dashboard.css"):
        response = await http.get(path, headers=ALICE)
        assert response.headers["content-security-policy"] == CSP, path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    assert "default-src 'none'" in CSP
    assert "frame-ancestors 'none'" in CSP


async def test_pages_hold_no_inline_script_or_style(open_client: Any, browse: Browser) -> None:
    """The pages' only script is the static file and no element has a style attribute:
    the CSP blocks inline code, so the pages must not need any."""
    http = await browse(await open_client())
    for path in ("/saga/", "/saga/runs", "/saga/attention"):
        html = (await http.get(path, headers=ALICE)).text
        assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [], path
        assert " style=" not in html, path
        assert " on" + "click=" not in html, path


async def test_static_assets_are_served_from_the_package(open_client: Any, browse: Browser) -> None:
    """The CSS and JS ship inside the package and are served with their types; other
    names are 404."""
    http = await browse(await open_client())
    css = await http.get("/saga/static/dashboard.css", headers=ALICE)
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    js = await http.get("/saga/static/dashboard.js", headers=ALICE)
    assert "EventSource" in js.text
    assert (await http.get("/saga/static/../_app.py", headers=ALICE)).status_code == 404


async def test_read_only_operators_see_no_actions_and_posts_are_403(
    open_client: Any, browse: Browser
) -> None:
    """An operator with can_act=False gets no action forms, and a POST answers 403 and
    changes nothing (even with a valid CSRF token)."""
    s = small_saga("ro", ["s1"])
    client = await open_client(s)
    handle = await client.start(s, {})
    http = await browse(client)
    page = (await http.get(f"/saga/runs/{handle.id}", headers=RITA)).text
    assert 'data-testid="action-cancel"' not in page
    token = csrf((await http.get(f"/saga/runs/{handle.id}", headers=ALICE)).text)
    response = await http.post(f"/saga/runs/{handle.id}/cancel", data={"csrf": token}, headers=RITA)
    assert response.status_code == 403
    assert not (await client.info(handle.id)).cancel_requested


@pytest.mark.parametrize(
    ("headers", "form"),
    [
        ({}, {}),  # no token
        ({}, {"csrf": "0" * 64}),  # a wrong token
        ({"Origin": "https://evil.example"}, None),  # cross-site origin, valid token
        ({"Sec-Fetch-Site": "cross-site"}, None),  # the browser says cross-site
        ({"Sec-Fetch-Site": "same-site"}, None),  # a sibling subdomain is not us
    ],
)
async def test_forged_posts_are_403_and_change_nothing(
    open_client: Any, browse: Browser, headers: dict[str, str], form: dict[str, str] | None
) -> None:
    """A POST without alice's CSRF token, or that the browser marks as cross-site, is
    refused with 403 and the run is untouched."""
    s = small_saga("csrf", ["s1"])
    client = await open_client(s)
    handle = await client.start(s, {})
    http = await browse(client)
    if form is None:
        form = {"csrf": csrf((await http.get(f"/saga/runs/{handle.id}", headers=ALICE)).text)}
    response = await http.post(
        f"/saga/runs/{handle.id}/cancel", data=form, headers={**ALICE, **headers}
    )
    assert response.status_code == 403
    assert not (await client.info(handle.id)).cancel_requested


async def test_csrf_tokens_are_bound_to_the_operator(open_client: Any, browse: Browser) -> None:
    """Another operator's token does not pass: tokens are HMACs of the operator's
    name with the app's secret."""

    async def mallory_or_alice(request: Any) -> Operator | None:
        return Operator(request.headers.get("x-user", "nobody"))

    s = small_saga("bound", ["s1"])
    client = await open_client(s)
    handle = await client.start(s, {})
    http = await browse(client, authorize=mallory_or_alice)
    token = csrf((await http.get(f"/saga/runs/{handle.id}", headers={"X-User": "mallory"})).text)
    response = await http.post(
        f"/saga/runs/{handle.id}/cancel", data={"csrf": token}, headers=ALICE
    )
    assert response.status_code == 403


@pytest.mark.parametrize("authorize", [None, "yes", 42])
async def test_authorize_is_required(open_client: Any, authorize: Any) -> None:
    """There is no open mode: dashboard() without a callable authorize raises
    ConfigurationError saying what to pass."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match="authorize"):
        dashboard(client, authorize=authorize)
    with pytest.raises(saga.ConfigurationError, match="authorize"):
        dashboard(client)


async def test_bad_settings_are_refused(open_client: Any) -> None:
    """bulk_limit out of range, a redact that is not callable, or a short secret are
    configuration errors."""

    async def anyone(request: Any) -> Operator:
        return Operator("x")

    client = await open_client()
    for options in ({"bulk_limit": 0}, {"redact": "no"}, {"secret": "short"}):
        with pytest.raises(saga.ConfigurationError):
            dashboard(client, authorize=anyone, **options)


async def test_a_plain_authorize_function_signs_operators_in(
    open_client: Any, browse: Browser
) -> None:
    """``authorize`` may be a plain function as well as an async one: its Operator is
    signed in (the page answers 200), and its None is 401, never a 500."""

    def plain(request: Any) -> Operator | None:
        name = request.headers.get("x-user")
        return Operator(name) if name else None

    s = small_saga("plain_authorize", ["s1"])
    client = await open_client(s)
    handle = await client.start(s, {})
    http = await browse(client, authorize=plain)
    assert (await http.get(f"/saga/runs/{handle.id}", headers=ALICE)).status_code == 200
    assert (await http.get(f"/saga/runs/{handle.id}")).status_code == 401
