"""The steering playground: static files under /ui (no build step, nothing fetched at run time).

The page talks to the same server's public API (/v1/models, /v1/chat/completions, /tokenize) with the key
typed into it, so it needs no routes or privileges of its own.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

PREFIX = "/ui"
STATIC_DIR = Path(__file__).resolve().parent.parent / "ui"


def install(app: FastAPI) -> None:
    """Mount the page; `/ui` redirects to `/ui/` so the page's relative asset paths resolve."""

    @app.get(PREFIX, include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/", status_code=307)

    app.mount(PREFIX + "/", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
