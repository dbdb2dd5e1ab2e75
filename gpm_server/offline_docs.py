"""/docs and /redoc that work offline: the Swagger UI and ReDoc assets are served by the service
itself (from the `fastapi-offline` package's bundled copies) instead of a CDN, so the API pages
render on air-gapped clusters too. Without that package, FastAPI's CDN pages are kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs-static"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")


def asset_dir() -> Path | None:
    """The directory holding the bundled Swagger UI / ReDoc files, or None if not installed."""
    spec = importlib.util.find_spec("fastapi_offline")  # found, not imported
    if spec is None or spec.origin is None:
        return None
    static = Path(spec.origin).parent / "static"
    return static if all((static / name).is_file() for name in ASSETS) else None


def docs_kwargs() -> dict[str, None]:
    """`FastAPI(...)` arguments: turn off the CDN pages when local assets exist."""
    return {"docs_url": None, "redoc_url": None} if asset_dir() is not None else {}


def install_offline_docs(app: FastAPI) -> bool:
    """Serve /docs and /redoc from local assets; returns False (CDN pages stay) without them."""
    static = asset_dir()
    if static is None:
        return False
    app.mount(STATIC_URL, StaticFiles(directory=static), name="docs-static")
    title = f"{app.title} - docs"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )

    return True
