"""`GET /dashboard`: the drift and load dashboard, a static page served from the package.

Auth: the page and its scripts hold no data, so they are open like /docs; everything it shows
comes from `GET /telemetry/runs` and `GET /telemetry/drift` (API key when one is set: the page
asks for it and keeps it in the tab's sessionStorage) and from `GET /metrics/summary` (open, as
/metrics is). The assets (the page, its script, uPlot) ship inside the package and the page's
Content-Security-Policy allows no other origin, so it works on an air-gapped cluster.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "dashboard_static"
STATIC_URL = "/dashboard/static"

# 'unsafe-inline' styles: uPlot positions its legend and cursor with inline style attributes.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter()


@cache
def _page() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_page(), headers=HEADERS)


def install_dashboard(app: FastAPI) -> None:
    """Add the page and mount its assets (`/dashboard/static/...`)."""
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="dashboard-static")
