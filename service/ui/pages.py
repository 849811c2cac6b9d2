"""The web pages under ``/ui``: server-rendered (Jinja2), no script. A team's models with their latest
verdict and robust accuracy, each model's history across versions (a matplotlib chart), the job list,
and each audit's report, served inline. Auth: ``session`` (a cookie made from the API key once, or
nothing at all when the service has no keys), or a signed link for a single report.

Routes here only read: the history database (``HistoryStore``), the registry and the queue, through
the same functions the JSON routes use.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Annotated, Any, cast
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from contracts.specs import JobState
from models.manifest import CardIndex
from service.deps import JobIdPath, QueueDep, RegistryDep, StoreDep, TeamDep
from service.errors import Problem, invalid
from service.queueing import view
from service.routes.history import HistoryDep, JobKind, _database, list_jobs, recorded_view
from service.routes.jobs import _owned, get_artifact
from service.ui import summary
from service.ui.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginRequired,
    Session,
    cookie_options,
    new_session,
    open_mode,
    report_token,
    require_session,
    same_token,
    session_of,
    team_of_key,
    team_of_report_token,
)

PAGE_SIZE = 50
# Pages: nothing from elsewhere, no script at all, forms post only here, never framed.
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# A report is self-contained: inline styles and data: images, nothing else.
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"

templates = Jinja2Templates(directory=str(files("service.ui") / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)
links = APIRouter(prefix="/v1/audits", tags=["audits"])
SessionDep = Annotated[Session, Depends(require_session)]


def _page(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    session = session_of(request)
    response = templates.TemplateResponse(request, template, {
        "session": session, "open_mode": open_mode(request), **context}, status_code=status_code)
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _local(target: str | None) -> str:
    """``target`` if it is a path under /ui of this site (never another host), else the models page."""
    parts = urlsplit(target or "")
    if target and not parts.scheme and not parts.netloc and target.startswith("/ui") and "\\" not in target:
        return target
    return "/ui/models"


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/models", status_code=303)


@router.get("/login")
def login_form(request: Request, next: Annotated[str | None, Query(max_length=2048)] = None) -> Response:
    if open_mode(request) or session_of(request) is not None:
        return RedirectResponse(_local(next), status_code=303)
    return _login_page(request, next, None, 200)


def _login_page(request: Request, next_path: str | None, error: str | None, status: int) -> Response:
    import secrets

    token = secrets.token_urlsafe(24)
    response = _page(request, "login.html", {"next": _local(next_path), "csrf": token, "error": error,
                                             "title": "Sign in"},
                     status_code=status)
    response.set_cookie(LOGIN_COOKIE, token, **cookie_options(request, 600))
    return response


@router.post("/login")
def login(request: Request, key: Annotated[str, Form(max_length=1024)],
          csrf: Annotated[str, Form(max_length=256)],
          next: Annotated[str | None, Form(max_length=2048)] = None) -> Response:
    """Trade an API key for a session cookie (HttpOnly, SameSite=Strict); the key itself is not kept."""
    settings = request.app.state.settings
    if open_mode(request):
        return RedirectResponse(_local(next), status_code=303)
    if not same_token(request.cookies.get(LOGIN_COOKIE, ""), csrf):
        return _login_page(request, next, "The form expired or came from another site: sign in again.", 403)
    team = team_of_key(settings, key.strip())
    if team is None:
        return _login_page(request, next, "Unknown API key: expected a key configured in ADVERSA_API_KEYS.",
                           401)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, new_session(request, team),
                        **cookie_options(request, settings.ui_session_ttl_s))
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, csrf: Annotated[str, Form(max_length=256)]) -> Response:
    if not open_mode(request) and not same_token(session.csrf, csrf):
        raise Problem(403, "csrf: expected the token of this session's logout form", field="csrf",
                      code="csrf")
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


@router.get("/models")
def models_page(request: Request, session: SessionDep, index: RegistryDep, history: HistoryDep) -> Response:
    rows = []
    with _database():
        for card in _visible(index, session.team):
            audits = history.audits(session.team, card.name)
            latest = audits[0] if audits else None
            rows.append({"card": card, "latest": latest, "audits": len(audits),
                         "headline": summary.headline(latest) if latest else None})
    return _page(request, "models.html", {"rows": rows, "title": "Models"})


def _visible(index: CardIndex, team: str) -> list[Any]:
    cards = [index.card(name) for name in index.names()]
    own_first = sorted((c for c in cards if c is not None), key=lambda c: (c.team is None, c.name))
    return [c for c in own_first if c.team is None or c.team == team]


@router.get("/models/{name}")
def model_page(request: Request, name: str, session: SessionDep, index: RegistryDep,
               history: HistoryDep) -> Response:
    if "@" in name:
        raise invalid("name", f"expected a model name without @version (the page covers every version), "
                              f"got {name!r}")
    card = index.card(name)
    with _database():
        audits = history.audits(session.team, name)
    if not audits and (card is None or (card.team is not None and card.team != session.team)):
        raise Problem(404, f"name: expected the name of a model you can see (/ui/models), got {name!r}",
                      field="name", code="unknown-model")
    charts = summary.history_charts(name, audits)
    rows = [{**audit, "headline": summary.headline(audit)} for audit in audits]
    return _page(request, "model.html", {"name": name, "card": card, "audits": rows, "charts": charts,
                                         "title": name})


@router.get("/jobs")
def jobs_page(request: Request, session: SessionDep, queues: QueueDep, history: HistoryDep,
              cursor: Annotated[str | None, Query(max_length=512)] = None,
              kind: Annotated[str | None, Query(max_length=32)] = None,
              status: Annotated[str | None, Query(max_length=32)] = None) -> Response:
    kinds = list(JobKind.__args__)  # type: ignore[attr-defined]
    states = [s.value for s in JobState]
    if kind and kind not in kinds:
        raise invalid("kind", f"expected one of {kinds}, got {kind!r}")
    if status and status not in states:
        raise invalid("status", f"expected one of {states}, got {status!r}")
    page = list_jobs(session.team, queues, history, kind=cast(JobKind | None, kind or None),
                     status=JobState(status) if status else None, cursor=cursor, limit=PAGE_SIZE)
    query = "".join(f"&{k}={quote(v)}" for k, v in (("kind", kind), ("status", status)) if v)
    return _page(request, "jobs.html", {
        "jobs": page.jobs, "next_cursor": page.next_cursor, "first_page": cursor is None,
        "kinds": kinds, "states": states, "kind": kind or "", "status": status or "", "query": query,
        "title": "Jobs"})


@router.get("/reports/{job_id}", name="ui_report")
def report_page(request: Request, job_id: JobIdPath, queues: QueueDep, store: StoreDep, history: HistoryDep,
                token: Annotated[str | None, Query(max_length=1024)] = None) -> Response:
    """An audit's ``report.html``, shown in the browser (inline). With ``token`` (a signed link) no
    session is needed: the link opens this one report until it expires."""
    team = team_of_report_token(request, job_id, token) if token else require_session(request).team
    response = get_artifact(job_id, "report.html", queues, store, history, team)
    response.headers["Content-Disposition"] = 'inline; filename="report.html"'
    response.headers["Content-Security-Policy"] = REPORT_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"  # the link's token stays out of other logs
    response.headers["Cache-Control"] = "private, no-store"
    return response


class ReportLink(BaseModel):
    url: str = Field(description="opens the audit's report in a browser, no key needed, until it expires")
    expires_at: str = Field(description="ISO 8601, UTC")


@links.get("/{job_id}/report-link", response_model=ReportLink)
def report_link(request: Request, job_id: JobIdPath, team: TeamDep, queues: QueueDep,
                history: HistoryDep) -> ReportLink:
    """A short-lived signed link to one succeeded audit's report (``ADVERSA_REPORT_LINK_TTL_S``), for
    a CI log to print: anyone with the link can read that report, and nothing else, until then."""
    job = recorded_view(queues, history, job_id, team) or view(_owned(queues, job_id, team))
    if job.kind != "audit":
        raise Problem(404, f"id: expected the id of one of your audits, got a {job.kind} job", field="id",
                      code="unknown-job")
    if job.status != JobState.succeeded:
        raise Problem(409, f"job is {job.status.value}; a report exists once it succeeded",
                      code="job-not-finished")
    token = report_token(request, job_id, team)
    ttl = request.app.state.settings.report_link_ttl_s
    expires = (datetime.now(UTC) + timedelta(seconds=ttl)).strftime("%Y-%m-%dT%H:%M:%SZ")
    url = request.url_for("ui_report", job_id=job_id).include_query_params(token=token)
    return ReportLink(url=str(url), expires_at=expires)


def install(app: FastAPI) -> None:
    """Serve the pages (and the report-link route) on ``app``."""

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/ui/login?next={quote(exc.next_path, safe='/')}", status_code=303)

    app.include_router(router)
    app.include_router(links)
