"""The console's routes on a FastAPI app: the JSON API, the pages and the static files
(uPlot vendored under `static/vendor/`, with its licence), under one prefix."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from ondo.console.api import build_api
from ondo.console.pages import build_pages
from ondo.console.service import ConsoleService

PREFIX = "/console"
STATIC = Path(__file__).parent / "static"


def mount_console(app: FastAPI, service: ConsoleService, prefix: str = PREFIX) -> None:
    app.mount(prefix + "/static", StaticFiles(directory=str(STATIC)), name="console-static")
    app.include_router(build_api(service), prefix=prefix)
    app.include_router(build_pages(service, prefix), prefix=prefix)


def build_offline_app(service: ConsoleService) -> FastAPI:
    """`ondo console --db`: the console alone over a stored database."""
    from ondo.server.errors import install_error_handlers

    app = FastAPI(title="ondo console", summary="Review a stored ondo database")
    install_error_handlers(app)
    mount_console(app, service)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/")

    return app
