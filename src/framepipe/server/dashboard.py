"""The dashboard: one page at ``/`` and its static files under ``/static/``.

Plain HTML, CSS and JavaScript shipped inside the package (``server/static/``), so nothing is
built or fetched from elsewhere to run it. The page itself holds no data and needs no token;
it asks for the token once (kept in the tab's ``sessionStorage``; the link ``/#token=...``
that ``framepipe serve`` prints fills it in, the fragment never reaching a server or its logs)
and then calls the API with ``Authorization: Bearer`` and the WebSocket with the token as a
subprotocol, so every byte of state still goes through the token check of the API.

What it shows: the completed segments of each live app (orders, visits) with thumbnails of
their stored frames and a viewer stepping through them (``static/segments.js``), plots of each
source's frames per second and stage latency with its restarts marked, its segments' latency
and the job pipelines' step durations (``static/plots.js``, drawn on canvases), executions with
their steps and a progress bar each, updated live over ``/ws`` (reconnecting with backoff; a
``lagged`` notice or a closed socket brings a fresh snapshot), sources with their health state
and latest frame, processors with capacity and health, the recent events, and the panels the
apps served here add (:mod:`framepipe.server.panels`). The layout is a single column on a
phone screen.
"""

from __future__ import annotations

from pathlib import Path

from framepipe.errors import MissingDependencyError

try:
    from fastapi import FastAPI
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.responses import Response
    from starlette.types import Scope
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the dashboard") from exc

__all__ = ["STATIC_DIR", "mount_dashboard"]

STATIC_DIR = Path(__file__).parent / "static"
"""The page and its script and style sheet, served as they are."""

# Everything the page loads comes from this app: no inline script, no other origin. Frames are
# shown through blob: URLs (fetched with the token); the WebSocket is on the same host.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self' ws: wss:; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""The headers of the page and of every file under ``/static/`` (``/static/index.html`` is the
page too: without them any site could frame it, and its script would run without the policy)."""


class _DashboardFiles(StaticFiles):
    """The dashboard's files, each sent with :data:`_PAGE_HEADERS`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_PAGE_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard page at ``GET /`` and its files at ``/static/...`` on ``app``, all
    with the same headers (:data:`_PAGE_HEADERS`: the content security policy, which also
    forbids framing them, ``nosniff``, no referrer).

    Neither needs the token: the page is the same for everyone and asks for the token before
    it reads anything from the API."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():  # a broken install, not a user error: say where it looked
        raise FileNotFoundError(f"the dashboard page is missing: {page}")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        """The dashboard page."""
        return FileResponse(page, media_type="text/html", headers=_PAGE_HEADERS)

    app.mount("/static", _DashboardFiles(directory=STATIC_DIR), name="static")
