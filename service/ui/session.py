"""Browser auth for the web pages: the API key is exchanged once for a signed session cookie, and a
single report can be opened by a short-lived signed link (for a CI log).

Nothing secret travels in a cookie or a link: they carry the team, a random CSRF token (sessions) or
the job id (links) and a timestamp, signed with HMAC by ``itsdangerous`` under ``ui_secret``
(generated once into the var dir when not configured, so that links outlive a restart and every
gateway process on one var dir agrees). The cookie is HttpOnly, SameSite=Strict and Secure over
https; the POST forms (login, logout) also carry a CSRF token, checked against the cookie.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from service.errors import Problem
from service.settings import Settings

SESSION_COOKIE = "adversa_session"
LOGIN_COOKIE = "adversa_login"  # the CSRF token of the login form, before there is a session
SECRET_FILE = "ui-secret"
OPEN_TEAM = "public"  # the team of every caller when the service has no API keys


@dataclass(frozen=True)
class Session:
    team: str
    csrf: str  # "" in open mode: there is nothing to forge


class LoginRequired(Exception):  # noqa: N818 - a redirect, not an error
    """No valid session: the page redirects to the login form, then back to ``next``."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def ui_secret(settings: Settings) -> str:
    """``settings.ui_secret``, else the var dir's ``ui-secret`` (created 0600 on first use; the first
    of several processes to create it wins and the others read it)."""
    if settings.ui_secret:
        return settings.ui_secret
    path = Path(settings.var_dir) / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def _signer(request: Request, purpose: str) -> URLSafeTimedSerializer:
    state = request.app.state
    secret = getattr(state, "ui_secret", None)
    if secret is None:
        secret = state.ui_secret = ui_secret(state.settings)
    return URLSafeTimedSerializer(secret, salt=f"adversa-{purpose}")


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def open_mode(request: Request) -> bool:
    return not _settings(request).api_keys


def session_of(request: Request) -> Session | None:
    """The caller's session: from the cookie when the service has keys (None if absent, forged,
    expired, or its team no longer has a key), the open team otherwise."""
    settings = _settings(request)
    if not settings.api_keys:
        return Session(team=OPEN_TEAM, csrf="")
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        data: Any = _signer(request, "session").loads(cookie, max_age=settings.ui_session_ttl_s)
    except BadSignature:
        return None
    if not isinstance(data, dict) or data.get("team") not in settings.api_keys.values():
        return None
    return Session(team=str(data["team"]), csrf=str(data.get("csrf", "")))


def require_session(request: Request) -> Session:
    """A page's dependency: the session, or a redirect to the login form."""
    session = session_of(request)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return session


def new_session(request: Request, team: str) -> str:
    """The cookie value of a fresh session of ``team``."""
    return _signer(request, "session").dumps({"team": team, "csrf": secrets.token_urlsafe(24)})


def team_of_key(settings: Settings, key: str) -> str | None:
    """The team of ``key``, compared in constant time against every configured key."""
    found = None
    for known, team in settings.api_keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            found = team
    return found


def same_token(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


def cookie_options(request: Request, max_age: int) -> dict[str, Any]:
    return {"max_age": max_age, "httponly": True, "samesite": "strict", "path": "/ui",
            "secure": request.url.scheme == "https"}


# --- signed report links ---------------------------------------------------------------------


def report_token(request: Request, job_id: str, team: str) -> str:
    return _signer(request, "report-link").dumps({"job": job_id, "team": team})


def team_of_report_token(request: Request, job_id: str, token: str) -> str:
    """The team a report link was made for; 403 naming ``token`` when it is forged, expired or for
    another report."""
    try:
        data: Any = _signer(request, "report-link").loads(token, max_age=_settings(request).report_link_ttl_s)
    except SignatureExpired:
        raise Problem(403, "token: this report link has expired; ask for a new one "
                           "(GET /v1/audits/{id}/report-link)", field="token", code="link-expired") from None
    except BadSignature:
        raise Problem(403, "token: expected a link made by GET /v1/audits/{id}/report-link, got a token "
                           "that does not verify", field="token", code="invalid-link") from None
    if not isinstance(data, dict) or data.get("job") != job_id or not isinstance(data.get("team"), str):
        raise Problem(403, "token: this link opens another report", field="token", code="invalid-link")
    return str(data["team"])
