"""The web dashboard: an ASGI app the application mounts behind its own authentication.

::

    from saga.web import Operator, dashboard

    async def authorize(request: starlette.requests.Request) -> Operator | None:
        ...  # the app's own authentication: None -> 401, can_act=False -> read only

    app.mount("/saga", dashboard(client, authorize=authorize))

Needs the ``web`` extra (``pip install 'saga[web]'``): Starlette and Jinja2, and uvicorn
for ``saga dashboard``. Pages are rendered on the server; the browser never queries the
database: one hub per dashboard app LISTENs and watches the history's sequence, and tells
open pages (server-sent events) when to fetch themselves again.
"""

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "saga.web needs the web extra (Starlette and Jinja2): pip install 'saga[web]'"
    ) from exc

from saga.web._app import DashboardApp, dashboard
from saga.web._auth import Operator

__all__ = ["DashboardApp", "Operator", "dashboard"]
