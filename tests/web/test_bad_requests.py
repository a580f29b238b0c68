"""Bad settings and hostile requests.

``dashboard()`` checks the type of every flag and setting: ``show_payloads="false"``
must not show payloads. Whatever a request holds (a form body of any bytes, any number
of fields, any size or content type; any query string, path or header), the dashboard
answers it with a page and a 4xx saying why, never a 500 or an exception.

Requests go straight to the ASGI app with a raw scope, so that bytes no HTTP client
would send (invalid percent escapes, invalid UTF-8, non-ASCII cookies) reach it as a
server would pass them on. The host app (Starlette) re-raises an unhandled exception
after its 500: ``call`` fails the test on either.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request

import saga
from saga.web import Operator, dashboard
from saga.web._site import MAX_FORM_BYTES
from tests._wait_sagas import approval
from tests.web.conftest import csrf, mounted

ALICE = (b"x-user", b"alice")
FORM = (b"content-type", b"application/x-www-form-urlencoded")
#: Inner hypothesis tests run in a worker thread, each example one request.
#: The most fields a form may have (saga.web._site.MAX_FORM_FIELDS).
MAX_FIELDS = 200
HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def call(
    app: Starlette,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (ALICE,),
    body: bytes | Sequence[bytes] = b"",
) -> tuple[int, str]:
    """One request (``body`` as one chunk or several); its status and page. An
    exception out of the app, or a 5xx, fails the test."""
    chunks = [body] if isinstance(body, bytes) else list(body)
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    status: int = sent[0]["status"]
    page = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert status < 500, (method, path, query, status, page[-2000:])
    return status, page


async def _app(client: saga.Client) -> tuple[Starlette, str]:
    """The dashboard mounted at /saga, and alice's CSRF token."""
    app = mounted(client)
    status, page = await call(app, "GET", "/saga/runs")
    assert status == 200
    return app, csrf(page)


def in_thread(check: Callable[[], None]) -> Any:
    """Run a hypothesis test (sync) in a worker thread, whose examples call back into
    the event loop with ``anyio.from_thread.run``."""
    return anyio.to_thread.run_sync(check)


# -- dashboard()'s settings ---------------------------------------------------------------


async def _anyone(request: Request) -> Operator:
    return Operator("x")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("show_payloads", "false"),
        ("show_payloads", "no"),
        ("show_payloads", ""),
        ("show_payloads", 1),
        ("show_payloads", 0),
        ("show_payloads", None),
        ("show_payloads", [True]),
        ("bulk_limit", True),
        ("bulk_limit", "10"),
        ("bulk_limit", 1.5),
        ("title", None),
        ("title", 42),
        ("title", ""),
        ("title", "t" * 201),
        ("title", "\ud800"),
        ("redact", "no"),
        ("secret", 12345),
        ("secret", bytearray(32)),
    ],
)
async def test_every_flag_and_setting_is_checked_by_type(
    open_client: Any, option: str, value: Any
) -> None:
    """A flag that is not a bool (``show_payloads="false"`` would show every input and
    result: a non-empty str is truthy) and a setting of the wrong type or out of bounds
    raise ConfigurationError naming the argument, before anything is served."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match=option):
        dashboard(client, authorize=_anyone, **{option: value})


async def test_any_str_or_bytes_secret_of_16_bytes_keys_the_tokens(open_client: Any) -> None:
    """A str secret is its UTF-8 bytes, whatever it holds (a lone surrogate from a
    mis-decoded environment variable included): no UnicodeEncodeError."""
    client = await open_client()
    for secret in ("\ud800" * 8, "s" * 16, b"\xff" * 16):
        dashboard(client, authorize=_anyone, secret=secret)


@pytest.mark.parametrize(
    ("name", "can_act"),
    [
        *[("", True), ("n" * 201, True), ("a\x00b", True), ("\udcff", True), (None, True)],
        *[("ops", "false"), ("ops", 1), ("ops", None)],
    ],
)
def test_an_operator_is_checked_when_made(name: Any, can_act: Any) -> None:
    """Operator's name must be one an action can record (non-empty, at most 200
    characters, no NUL, valid Unicode) and can_act a bool (``can_act="false"`` would
    let a read-only operator act): anything else is a ConfigurationError at once, the
    rule the guard relies on for what authorize() returns."""
    with pytest.raises(saga.ConfigurationError):
        Operator(name, can_act=can_act)


# -- form bodies ----------------------------------------------------------------------------


async def test_every_malformed_form_is_a_4xx_with_the_reason(open_client: Any) -> None:
    """More than 200 fields (400), a body over 1 MiB in one chunk or many (413), a body
    that is not UTF-8 (400), a body that is not urlencoded (415): each answers with the
    reason on the page, and nothing is acted on."""
    app, token = await _app(await open_client())
    many = "&".join(f"f{i}=1" for i in range(MAX_FIELDS))
    huge = b"note=" + b"x" * MAX_FORM_BYTES
    cases: list[tuple[bytes | list[bytes], tuple[bytes, bytes], int, str]] = [
        (f"csrf={token}&{many}".encode(), FORM, 400, "too many fields"),
        (huge, FORM, 413, "too large"),
        ([huge[i : i + 65536] for i in range(0, len(huge), 65536)], FORM, 413, "too large"),
        (f"csrf={token}&note=\xff".encode("latin-1"), FORM, 400, "not UTF-8"),
        (b'{"csrf": "x"}', (b"content-type", b"application/json"), 415, "urlencoded"),
        (b"--x\r\n", (b"content-type", b"multipart/form-data; boundary=x"), 415, "urlencoded"),
    ]
    for body, kind, status, reason in cases:
        got, page = await call(app, "POST", "/saga/runs/bulk", headers=[ALICE, kind], body=body)
        assert (got, reason in page) == (status, True), (body[:80], page[-500:])


async def test_200_fields_is_the_bound(open_client: Any) -> None:
    """Any number of fields: up to 200 the form is read (here: no bulk action, 400
    saying so); beyond, 400 "too many fields". Never a 500."""
    app, token = await _app(await open_client())

    async def post(count: int) -> tuple[int, str]:
        fields = "".join(f"&f{i}=1" for i in range(count))
        return await call(
            app,
            "POST",
            "/saga/runs/bulk",
            headers=[ALICE, FORM],
            body=f"csrf={token}{fields}".encode(),
        )

    @HOSTILE
    @given(count=st.integers(min_value=0, max_value=3 * MAX_FIELDS))
    def check(count: int) -> None:
        status, page = anyio.from_thread.run(post, count)
        assert status == 400
        if count + 1 > MAX_FIELDS:
            assert "too many fields" in page
        else:
            assert "bulk action must be cancel or retry" in page

    await in_thread(check)


#: Pieces of hostile form bodies: the dashboard's field names and values, separators,
#: broken percent escapes, escapes of NUL, of invalid UTF-8 and of a lone surrogate.
PIECES = st.sampled_from(
    [
        "&", "&&", "=", "==", ";", "+", "%", "%2", "%zz", "%ff", "%C3", "%C3%28", "%00",
        "%ED%A0%80", "%F4%90%80%80", "csrf=", "action=cancel", "action=retry", "confirm=yes",
        "expect=", "expect=-1", "expect=99999999999999999999", "status=", "status=failed",
        "saga=", "key=", "after=", "before=", "0001-01-01T00:00+14:00", "9999-12-31",
        "note=", "name=", "name=decision", "payload=", "[", "{", "}", '"', "\x00", "é",
    ]
)  # fmt: skip
TEXT_BODIES = st.lists(PIECES | st.text(max_size=12), max_size=30).map("".join)
TARGETS = st.sampled_from(
    ["/runs/bulk", "/runs/{run}/cancel", "/runs/{run}/retry", "/runs/{run}/resolve",
     "/runs/{run}/skip", "/runs/{run}/signal", "/runs/{run}/nope", "/schedules/nightly/pause"]
)  # fmt: skip
KINDS = st.sampled_from(
    [b"application/x-www-form-urlencoded", b"APPLICATION/X-WWW-FORM-URLENCODED; charset=x",
     b"text/plain", b"", b"multipart/form-data", b"\xff\x00"]
)  # fmt: skip


async def test_no_form_body_is_a_server_error(orchestrator: Any) -> None:
    """Any body (random bytes, or text built from the dashboard's own fields, broken
    percent escapes and invalid UTF-8, after a valid CSRF token or with a non-ASCII
    one), any content type, posted to any action: a 4xx page or a redirect, never a
    500."""
    orch = await orchestrator(approval)
    app, token = await _app(orch)

    async def post(target: str, kind: bytes, body: bytes) -> None:
        path = "/saga" + target.format(run=uuid.uuid4())
        await call(app, "POST", path, headers=[ALICE, (b"content-type", kind)], body=body)

    @HOSTILE
    @given(
        target=TARGETS,
        kind=KINDS,
        prefix=st.sampled_from([f"csrf={token}&", "csrf=\u00e9&", "csrf=%C3%A9&", ""]),
        text=TEXT_BODIES,
        raw=st.none() | st.binary(max_size=500),
    )
    def check(target: str, kind: bytes, prefix: str, text: str, raw: bytes | None) -> None:
        body = raw if raw is not None else (prefix + text).encode("utf-8", "surrogatepass")
        anyio.from_thread.run(post, target, kind, body)

    await in_thread(check)


async def test_signal_payloads_too_deep_or_too_large_are_400(orchestrator: Any) -> None:
    """A signal's payload nested past json's own limit (RecursionError) or above the
    client's max_payload_bytes (PayloadTooLargeError) answers 400 saying so; the run
    still waits."""
    orch = await orchestrator(approval, max_payload_bytes=200)
    handle = await orch.start(approval, {"n": 1})
    with anyio.fail_after(10):
        while True:
            if (await orch.info(handle.id)).status is saga.RunStatus.WAITING:
                break
            await anyio.sleep(0.05)
    app, token = await _app(orch)
    deep = "[" * 100_000
    big = '{"approved": true, "by": "' + "b" * 300 + '"}'
    for payload, reason in ((deep, "nested too deeply"), (big, "above the limit")):
        body = f"csrf={token}&name=decision&payload={payload}".encode()
        status, page = await call(
            app, "POST", f"/saga/runs/{handle.id}/signal", headers=[ALICE, FORM], body=body
        )
        assert (status, reason in page) == (400, True), page[-500:]
    assert (await orch.info(handle.id)).status is saga.RunStatus.WAITING


# -- query strings, paths, headers ------------------------------------------------------------

QUERIES = st.lists(PIECES | st.text(max_size=12), max_size=30).map(
    lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
) | st.binary(max_size=300)
PAGES = st.sampled_from(["/", "/runs", "/attention", "/traffic", "/runs/{run}", "/static/x"])


async def test_no_query_path_or_header_is_a_server_error(open_client: Any) -> None:
    """Any query string (bytes, broken escapes, hostile filters and cursors), any path
    segment where a run id or schedule name goes, any cookie (a flash cookie that is not
    ASCII, once a TypeError in the MAC check), Origin or Sec-Fetch-Site header: a page
    or a 4xx, never a 500."""
    app, token = await _app(await open_client())

    async def get(path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await call(app, "GET", "/saga" + path, query=query, headers=[ALICE, *headers])

    async def post(path: str, headers: list[tuple[bytes, bytes]]) -> None:
        body = f"csrf={token}".encode()
        await call(app, "POST", "/saga" + path, headers=[ALICE, FORM, *headers], body=body)

    header = st.tuples(
        st.sampled_from([b"cookie", b"origin", b"sec-fetch-site", b"host", b"content-length"]),
        st.binary(max_size=60)
        | st.text(max_size=40).map(lambda t: ("saga_flash=" + t).encode("utf-8", "replace"))
        | st.text(max_size=40).map(lambda t: ("saga_flash=AA." + t).encode("utf-8", "replace")),
    )

    @HOSTILE
    @given(
        page=PAGES,
        segment=st.text(max_size=40).filter(lambda s: "/" not in s),
        query=QUERIES,
        headers=st.lists(header, max_size=3),
    )
    def check(page: str, segment: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        anyio.from_thread.run(get, page.format(run=segment or "x"), query, headers)
        target = f"/schedules/{segment or 'x'}/pause"
        anyio.from_thread.run(post, target, headers)

    await in_thread(check)
