"""``/docs`` (Swagger UI) and ``/redoc`` from files the service ships: no CDN, no internet.

FastAPI's default pages load their JavaScript and CSS from jsDelivr, their favicon from
fastapi.tiangolo.com and ReDoc's fonts from Google, so on a hospital network without internet
access they stay blank. These are FastAPI's documented self-hosting recipe
(``docs_url=None``, ``redoc_url=None``, ``get_swagger_ui_html``/``get_redoc_html`` with local
URLs) over the upstream npm files vendored in ``app/api/static/`` (see ``VERSIONS.txt`` there and
``scripts/vendor-docs-assets.sh``), plus what else those pages would fetch from outside:

- Swagger UI's online validator badge (shown by its standalone layout for a spec URL that is
  not localhost) loads an image from validator.swagger.io, sending the spec's URL there:
  ``validatorUrl`` is off, so no layout or parameter change can bring it back;
- ReDoc's Redocly logo (cdn.redoc.ly): removed from the vendored bundle; Google fonts: off.

A Content-Security-Policy on both pages keeps every fetch on the service's own origin, so a
future asset version that reaches out is stopped by the browser (and fails the browser test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/docs-static"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# 'unsafe-inline': FastAPI's pages start Swagger UI from an inline script and both UIs inject
# inline styles; blob: is ReDoc's search worker. Nothing leaves 'self'.
DOCS_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    )
)


def _with_csp(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI, its OAuth2 redirect page and ReDoc from ``STATIC_DIR``.

    The app must be built with ``docs_url=None, redoc_url=None`` so FastAPI adds no CDN pages.
    """
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="docs-static")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets = f"{root}{STATIC_PATH}/swagger-ui"
        return _with_csp(
            get_swagger_ui_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=f"{root}{oauth2_redirect_url}" if oauth2_redirect_url else None,
                init_oauth=app.swagger_ui_init_oauth,
                swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets}/swagger-ui.css",
                swagger_favicon_url=f"{assets}/favicon-32x32.png",
                swagger_ui_parameters={
                    **(app.swagger_ui_parameters or {}),
                    **SWAGGER_UI_PARAMETERS,
                },
            )
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return _with_csp(get_swagger_ui_oauth2_redirect_html())

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _with_csp(
            get_redoc_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{STATIC_PATH}/redoc/redoc.standalone.js",
                redoc_favicon_url=f"{root}{STATIC_PATH}/swagger-ui/favicon-32x32.png",
                with_google_fonts=False,
            )
        )

    app.add_route(DOCS_PATH, swagger_ui, include_in_schema=False)
    if oauth2_redirect_url:
        app.add_route(oauth2_redirect_url, swagger_ui_redirect, include_in_schema=False)
    app.add_route(REDOC_PATH, redoc, include_in_schema=False)
