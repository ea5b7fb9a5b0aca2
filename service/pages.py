"""The service's pages: the API's Swagger page at ``/`` and the web page at ``/ui``.

Both are static files in ``service/ui/`` (bentofile.yaml packs them), served as they are.
The web page is plain HTML, CSS and JavaScript with nothing fetched from elsewhere, so it
works where the service has no internet; it calls only the public routes (``/predict``,
``/explain``), the contract any other client has. ``/`` replaces BentoML's template page
(tracking script, badges, banner) with Swagger UI alone, from the copy BentoML serves.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

UI_DIR = Path(__file__).parent / "ui"
# Path → file in UI_DIR. Only these are served: nothing else in the folder is reachable.
PAGE_FILES = {
    "/": "api.html",
    "/ui": "index.html",
    "/ui/ui.js": "ui.js",
    "/ui/ui.css": "ui.css",
}
# The web page loads only its own files and shows images it was given or made (data:,
# blob:): a browser blocks anything else, so the page cannot come to depend on a CDN.
UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _file_endpoint(name: str):
    path = UI_DIR / name
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if name != "api.html":  # Swagger UI runs an inline script, which the policy forbids
        headers["Content-Security-Policy"] = UI_POLICY

    async def endpoint(_: Request) -> Response:
        return FileResponse(path, headers=headers)

    return endpoint


async def _ui_with_slash(_: Request) -> Response:
    return RedirectResponse("../ui", status_code=308)


def page_routes() -> list[BaseRoute]:
    """The pages' routes, for the service's Starlette app."""
    routes: list[BaseRoute] = [
        Route(path, _file_endpoint(name), methods=["GET", "HEAD"])
        for path, name in PAGE_FILES.items()
    ]
    return [*routes, Route("/ui/", _ui_with_slash, methods=["GET", "HEAD"])]
