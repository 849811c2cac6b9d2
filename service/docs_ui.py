"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) that work without internet.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they are blank on a machine that
reaches none (CI runners, air-gapped clusters). The same pages are built here with FastAPI's
``get_swagger_ui_html`` / ``get_redoc_html``, pointing at the assets that the ``fastapi-offline``
package ships (Swagger UI's bundle and stylesheet, ReDoc's standalone bundle), served from
``/docs/assets``. Nothing on either page is fetched from another host: no CDN, no Google fonts, no
online validator badge, and a Content-Security-Policy that allows only this origin stops what the
bundles would still ask for (ReDoc's sidebar always tries Redocly's logo from their CDN and hides it
when it does not load).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
# Both pages run one inline script or inject inline styles; ReDoc's search runs in a blob worker.
POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
          "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def assets_dir() -> Path:
    """The folder of the installed ``fastapi-offline`` package's Swagger UI and ReDoc files."""
    return Path(str(files("fastapi_offline") / "static"))


def _router(title: str, openapi_url: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @router.get(DOCS_URL)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = base(request)
        return _own_origin_only(get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            # Swagger UI would otherwise show a badge image from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        ))

    @router.get(OAUTH2_REDIRECT_URL)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get(REDOC_URL)
    def redoc(request: Request) -> HTMLResponse:
        root = base(request)
        return _own_origin_only(get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        ))

    return router


def _own_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = POLICY
    return page


def install(app: FastAPI) -> None:
    """Serve the documentation pages and their assets on ``app`` (built with ``docs_url=None`` and
    ``redoc_url=None``, so that FastAPI's CDN pages are not there too)."""
    assert app.docs_url is None and app.redoc_url is None, "FastAPI's CDN pages would shadow these"
    assert app.openapi_url is not None
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    app.include_router(_router(app.title, app.openapi_url))
