"""The web pages (/ui) through the in-process gateway on a real Redis and a real history database:
login (key -> cookie, CSRF), the models page, a model's history chart, the job list and its pages, a
report inline, signed report links."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from itsdangerous import URLSafeTimedSerializer
from redis import Redis

from history.store import HistoryStore
from service.app import create_app
from service.settings import Settings
from service.ui.pages import PAGE_SIZE
from tests.history_db import DATABASES, database
from tests.ui_support import START, audit_result, fill, record_audit

KEYS = {"key-a": "team-a", "key-b": "team-b"}
ATTACK = {"model": "fmnist-cnn", "attack": {"name": "fgsm", "eps": 0.1},
          "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 4}, "seed": 0}


@pytest.fixture
def keyed(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """SQLite; PostgreSQL where a test asks (``indirect`` parametrisation), for the pages that query."""
    with database(getattr(request, "param", "sqlite"), tmp_path) as url:
        yield settings.model_copy(update={"api_keys": KEYS, "history_url": url})


@pytest.fixture
def client(keyed: Settings, redis: Redis) -> Iterator[TestClient]:
    with TestClient(create_app(keyed), raise_server_exceptions=False, follow_redirects=False) as test_client:
        history = HistoryStore(keyed.history_database_url)
        fill(history, test_client.app.state.store, "team-a", PAGE_SIZE + 8, versions=3)  # type: ignore[attr-defined]
        record_audit(history, test_client.app.state.store, "secretaudit", "team-b", "fmnist-cnn", 9,  # type: ignore[attr-defined]
                     START)
        history.close()
        yield test_client


def login(client: TestClient, key: str = "key-a", next_path: str = "/ui/models") -> Any:
    form = client.get("/ui/login", params={"next": next_path})
    assert form.status_code == 200, form.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    return client.post("/ui/login", data={"key": key, "csrf": csrf.group(1), "next": next_path})


def problem(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body.get("field") == field, body
    return body


def test_pages_need_a_login_that_trades_the_key_for_a_signed_cookie(client: TestClient) -> None:
    for path in ("/ui/models", "/ui/jobs?status=failed", "/ui/models/fmnist-cnn", "/ui/reports/teama00000"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login?next=/ui/"), path
    assert client.get("/ui").headers["location"] == "/ui/models"
    wrong = login(client, key="key-z")
    assert wrong.status_code == 401 and "Unknown API key" in wrong.text
    assert "adversa_session" not in client.cookies
    # A form posted from elsewhere (no login cookie, or another token) is refused.
    forged = TestClient(client.app, follow_redirects=False).post(
        "/ui/login", data={"key": "key-a", "csrf": "guess", "next": "/ui/models"})
    assert forged.status_code == 403 and "adversa_session" not in forged.cookies
    answer = login(client, next_path="/ui/jobs")
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "key-a" not in cookie
    assert client.get("/ui/jobs").status_code == 200
    # Never redirected to another site after login.
    assert client.get("/ui/login", params={"next": "https://evil.example/"}).headers["location"] == "/ui/models"
    fresh = TestClient(client.app, follow_redirects=False)
    assert login(fresh, next_path="//evil.example/ui").headers["location"] == "/ui/models"


def test_a_forged_or_stale_cookie_is_no_session(client: TestClient, keyed: Settings) -> None:
    assert login(client).status_code == 303
    value = client.cookies["adversa_session"]
    client.cookies.set("adversa_session", value[:-2] + ("AA" if not value.endswith("AA") else "BB"), path="/ui")
    assert client.get("/ui/models").status_code == 303
    # Signed by the service but for a team that no longer has a key: no session either.
    secret = (keyed.var_dir / "ui-secret").read_text().strip()
    gone = URLSafeTimedSerializer(secret, salt="adversa-session").dumps({"team": "team-gone", "csrf": "x"})
    client.cookies.set("adversa_session", gone, path="/ui")
    assert client.get("/ui/models").status_code == 303


def test_logout_needs_the_sessions_csrf_token(client: TestClient) -> None:
    login(client)
    page = client.get("/ui/models").text
    token = re.search(r'action="/ui/logout"><input type="hidden" name="csrf" value="([^"]+)"', page)
    assert token
    problem(client.post("/ui/logout", data={"csrf": "not-it"}), 403, "csrf")
    problem(client.post("/ui/logout", data={}), 422, "csrf")
    assert client.get("/ui/models").status_code == 200  # still signed in
    out = client.post("/ui/logout", data={"csrf": token.group(1)})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert client.get("/ui/models").status_code == 303


@pytest.mark.parametrize("keyed", DATABASES, indirect=True)
def test_the_models_page_shows_the_latest_verdict_and_robust_accuracy(client: TestClient) -> None:
    login(client)
    page = client.get("/ui/models")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no script
    assert "<script" not in page.text
    row = re.search(r'<tr>\s*<td><a href="/ui/models/fmnist-cnn">fmnist-cnn</a></td>(.*?)</tr>', page.text,
                    re.S)
    assert row, page.text
    # The newest audit is of version 3: its clean accuracy and its robust accuracy at the gate's eps.
    newest = audit_result("fmnist-cnn", 3)
    assert "v3 · quick" in row.group(1) and "✔ pass" in row.group(1)
    assert f"{newest['robust_accuracy']['linf:0.1']:.1%}" in row.group(1) and "@ linf:0.1" in row.group(1)
    assert f"{newest['clean_accuracy']:.1%}" in row.group(1)
    assert "team-b" not in page.text and "secretaudit" not in page.text


@pytest.mark.parametrize("keyed", DATABASES, indirect=True)
def test_a_models_history_plots_every_version(client: TestClient) -> None:
    login(client)
    page = client.get("/ui/models/fmnist-cnn")
    assert page.status_code == 200, page.text
    svg = re.findall(r"<svg.*?</svg>", page.text, re.S)
    assert len(svg) == 1  # one norm
    assert len(re.findall(r'<g id="history-linf-series-\d+">', svg[0])) == 3
    for version in (1, 2, 3):
        assert f">v{version} (quick, n={audit_result('fmnist-cnn', version)['n']})</text>" in svg[0]
    assert "v9" not in svg[0]  # team-b's audit
    assert len(re.findall(r'href="/ui/reports/teama\d+"', page.text)) == 3
    problem(client.get("/ui/models/fmnist-cnn@2"), 422, "name")
    problem(client.get("/ui/models/no-such-model"), 404, "name")


@pytest.mark.parametrize("keyed", DATABASES, indirect=True)
def test_the_job_list_pages_with_the_history_cursor(client: TestClient) -> None:
    login(client)
    queued = client.post("/v1/attacks", json=ATTACK, headers={"Authorization": "Bearer key-a"})
    assert queued.status_code == 202, queued.text
    first = client.get("/ui/jobs")
    assert first.status_code == 200
    rows = re.findall(r'<span class="id" title="([^"]+)">', first.text)
    assert len(rows) == PAGE_SIZE and rows[0] == queued.json()["id"]
    assert '<span class="badge queued">queued</span>' in first.text
    assert '<progress max="1" value="0.0">' in first.text
    older = re.search(r'href="/ui/jobs\?cursor=([^"]+)">older', first.text)
    assert older
    second = client.get(f"/ui/jobs?cursor={older.group(1)}")
    more = re.findall(r'<span class="id" title="([^"]+)">', second.text)
    assert len(more) == PAGE_SIZE + 8 + 1 - PAGE_SIZE and not set(more) & set(rows)
    assert "older" not in second.text and "newest" in second.text
    failed = client.get("/ui/jobs", params={"status": "failed"}).text
    assert failed.count('<span class="badge failed">') == 4 and "out of memory" in failed
    audits = client.get("/ui/jobs", params={"kind": "audit"}).text
    assert len(re.findall(r'href="/ui/reports/(teama\d+)">report', audits)) == 3
    problem(client.get("/ui/jobs", params={"status": "done"}), 422, "status")
    problem(client.get("/ui/jobs", params={"kind": "bake"}), 422, "kind")
    problem(client.get("/ui/jobs", params={"cursor": "nonsense"}), 422, "cursor")


def test_a_report_is_served_inline(client: TestClient) -> None:
    login(client)
    report = client.get("/ui/reports/teama00000")
    assert report.status_code == 200, report.text
    assert report.headers["content-disposition"].startswith("inline")
    assert report.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in report.headers["content-security-policy"]
    assert "Robustness audit — fmnist-cnn@1" in report.text
    problem(client.get("/ui/reports/secretaudit"), 404, "id")  # team-b's
    problem(client.get("/ui/reports/teama00001"), 404, "name")  # an attack: no report


def test_a_signed_link_opens_one_report_without_a_key(client: TestClient, keyed: Settings) -> None:
    bearer = {"Authorization": "Bearer key-a"}
    answer = client.get("/v1/audits/teama00000/report-link", headers=bearer)
    assert answer.status_code == 200, answer.text
    url = answer.json()["url"]
    assert re.fullmatch(r"http://testserver/ui/reports/teama00000\?token=[\w.-]+", url)
    assert answer.json()["expires_at"].endswith("Z")
    stranger = TestClient(client.app, follow_redirects=False)
    opened = stranger.get(url)
    assert opened.status_code == 200 and "Robustness audit" in opened.text
    assert opened.headers["content-disposition"].startswith("inline")
    assert opened.headers["referrer-policy"] == "no-referrer"
    token = url.split("token=")[1]
    assert stranger.get("/ui/models").status_code == 303  # the link opens nothing else
    problem(stranger.get(f"/ui/reports/teama00018?token={token}"), 403, "token")  # another report
    problem(stranger.get(f"/ui/reports/teama00000?token={token[:-3]}xyz"), 403, "token")
    # Expired: signed an hour ago, links last report_link_ttl_s (a day by default; here 60 s).
    client.app.state.settings = keyed.model_copy(update={"report_link_ttl_s": 60})  # type: ignore[attr-defined]
    secret = (keyed.var_dir / "ui-secret").read_text().strip()
    old = URLSafeTimedSerializer(secret, salt="adversa-report-link")
    old_token = _signed_at(old, {"job": "teama00000", "team": "team-a"}, time.time() - 3600)
    body = problem(stranger.get(f"/ui/reports/teama00000?token={old_token}"), 403, "token")
    assert body["code"] == "link-expired"
    # Links are made for the caller's own succeeded audits only.
    problem(client.get("/v1/audits/secretaudit/report-link", headers=bearer), 404, "id")
    problem(client.get("/v1/audits/teama00001/report-link", headers=bearer), 404, "id")
    assert client.get("/v1/audits/teama00000/report-link").status_code == 401


def _signed_at(serializer: URLSafeTimedSerializer, payload: dict[str, str], when: float) -> str:
    signer = serializer.make_signer(serializer.salt)
    signer.get_timestamp = lambda: int(when)  # type: ignore[method-assign]
    return signer.sign(serializer.dump_payload(payload)).decode()


def test_open_mode_needs_no_login(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url, TestClient(
            create_app(settings.model_copy(update={"history_url": url})), follow_redirects=False) as client:
        fill(HistoryStore(url), client.app.state.store, "public", 3, versions=1)  # type: ignore[attr-defined]
        page = client.get("/ui/models")
        assert page.status_code == 200 and "Sign out" not in page.text
        assert "fmnist-cnn" in page.text and "✔ pass" in page.text
        assert client.get("/ui/login").headers["location"] == "/ui/models"
        assert client.get("/ui/reports/public00000").status_code == 200


def test_the_cli_prints_a_signed_link(client: TestClient) -> None:
    from service.cli import _report_link

    bearer = {"Authorization": "Bearer key-a"}
    link = _report_link(client, "http://testserver", "teama00000", bearer)
    assert link is not None and "/ui/reports/teama00000?token=" in link["url"]
    assert TestClient(client.app).get(link["url"]).status_code == 200
    assert _report_link(client, "http://testserver", "teama00001", bearer) is None  # not an audit
