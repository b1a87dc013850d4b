"""The dashboard at `/ui/`: static files shipped inside the package, served by the app itself.

No CDN and no build step, so it works offline and cannot drift from a bundle built elsewhere. The
page holds no data of its own: it calls the same `/v1` API as curl, with the token the user types
(kept in the tab's session storage), so auth and read protection are the API's. A strict Content
Security Policy allows nothing but this origin: the page cannot load or send anything elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_DIR = Path(__file__).resolve().parents[2] / "ui" / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Assets change with the package; revalidating keeps an upgraded server's page consistent.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_ui(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", DashboardFiles(directory=UI_DIR, html=True), name="ui")
