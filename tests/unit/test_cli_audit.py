"""``adversa audit`` against a stub gateway served over real HTTP (uvicorn in a thread). The audits
the stub answers with are real merge output (``tests.unit.real_audits``): a quick Linf audit of a
tiny model on 16 inputs, and the same model on inputs next to its decision boundary (weak)."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import socket
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console
from typer.testing import CliRunner

from contracts.gate import evaluate_gate, parse_gate
from contracts.intervals import text as interval_text
from service.cli import app as cli_app
from service.cli import run_audit

from .real_audits import real_audit, weak_audit

KEY = "s3cret"
PROBLEM = "application/problem+json"


def _result(model: str) -> dict[str, Any]:
    """What the audit of ``model`` answers: ``weak-cnn`` the weak audit, every other the quick one."""
    audit = weak_audit() if model == "weak-cnn" else real_audit("quick", "linf")
    return copy.deepcopy(audit.result)


@dataclass
class Stub:
    """The gateway's audit and job routes, canned by model name: ``fmnist-cnn`` passes its gate,
    ``weak-cnn`` fails it, ``unknown-cnn`` is refused (422), ``crashy-cnn`` and ``canceled-cnn``
    end failed / canceled, ``slow-cnn`` never ends, ``flaky-cnn`` answers 503 to its first POST."""

    posts: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    flaked: set[str] = field(default_factory=set)

    def view(self, job_id: str) -> dict[str, Any]:
        job = self.jobs[job_id]
        base = {"id": job_id, "kind": "audit", "model": job["model"], "result": None, "error": None}
        polls, model = job["polls"], job["model"]
        if polls == 0:
            return {**base, "status": "queued", "progress": 0.0, "stage": None}
        if polls == 1 or model == "slow-cnn":
            return {**base, "status": "running", "progress": 0.5,
                    "stage": {"phase": "pgd linf:8/255", "chunk": 1, "chunks": 2}}
        if model == "crashy-cnn":
            return {**base, "status": "failed", "progress": 0.5, "stage": None,
                    "error": {"code": "worker-crashed", "message": "the worker died (out of memory)"}}
        if model == "canceled-cnn":
            return {**base, "status": "canceled", "progress": 0.5, "stage": None}
        result = _result(model)
        thresholds = job["body"].get("thresholds") or []
        result["gate"] = evaluate_gate(parse_gate(thresholds), result) if thresholds else None
        return {**base, "status": "succeeded", "progress": 1.0, "stage": None, "result": result}


STUB = Stub()
api = FastAPI()


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"type": "about:blank", "title": "Error", "status": status, "detail": detail},
                        status_code=status, media_type=PROBLEM)


@api.post("/v1/audits")
async def create_audit(request: Request) -> JSONResponse:
    body = await request.json()
    key = request.headers.get("idempotency-key", "")
    STUB.posts.append({"headers": dict(request.headers), "body": body})
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return _problem(401, "expected a valid bearer API key")
    model = body["model"]
    if model == "flaky-cnn" and key not in STUB.flaked:
        STUB.flaked.add(key)
        return _problem(503, "the queue is not reachable; retry")
    if model == "unknown-cnn":
        return _problem(422, "model: expected one of fmnist-cnn, fmnist-resnet18, got 'unknown-cnn'")
    if key in STUB.by_key:
        return JSONResponse(STUB.view(STUB.by_key[key]), status_code=202)
    job_id = uuid.uuid4().hex
    STUB.jobs[job_id] = {"model": model, "body": body, "polls": 0}
    STUB.by_key[key] = job_id
    return JSONResponse(STUB.view(job_id), status_code=202)


@api.get("/v1/jobs/{job_id}")
def get_job(job_id: str, request: Request) -> JSONResponse:
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return _problem(401, "expected a valid bearer API key")
    if job_id not in STUB.jobs:
        return _problem(404, f"expected the id of one of your jobs, got {job_id!r}")
    STUB.jobs[job_id]["polls"] += 1
    return JSONResponse(STUB.view(job_id))


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the stub server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    monkeypatch.setenv("ADVERSA_API_KEY", KEY)
    STUB.posts.clear()
    STUB.jobs.clear()
    STUB.by_key.clear()
    STUB.flaked.clear()
    yield STUB


@dataclass
class Run:
    code: int
    output: str
    junit: Path
    json_out: Path

    def suite(self) -> ET.Element:
        suite = ET.parse(self.junit).getroot().find("testsuite")
        assert suite is not None
        return suite


def audit(base_url: str, tmp_path: Path, model: str = "fmnist-cnn", **options: Any) -> Run:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    junit, json_out = tmp_path / "out" / "audit.xml", tmp_path / "out" / "audit.json"
    options = {"data": "fashion-mnist:test", "poll": 0.01, "timeout": 30, "retry_delay": 0.0, **options}
    with httpx.Client(timeout=10) as client:
        code = run_audit(client, url=base_url + "/", model=model, console=console, junit=junit,
                         json_out=json_out, **options)
    return Run(code, out.getvalue(), junit, json_out)


GATE = ["clean_accuracy >= 0.9", "robust_accuracy@linf:0.02 >= 0.4"]


def test_a_passing_gate_exits_0_and_writes_both_reports(base_url: str, tmp_path: Path, stub: Stub) -> None:
    run = audit(base_url, tmp_path, gate=GATE, eps=["linf=1/255,8/255", "l2=0.5"], seed=7)
    assert run.code == 0, run.output
    (post,) = stub.posts
    assert post["headers"]["authorization"] == f"Bearer {KEY}"
    assert post["body"] == {
        "model": "fmnist-cnn", "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 500},
        "suite": "standard", "eps": {"linf": [1 / 255, 8 / 255], "l2": [0.5]}, "thresholds": GATE,
        "surrogates": [], "seed": 7}
    job = json.loads(run.json_out.read_text())
    assert job["status"] == "succeeded"
    assert job["result"]["gate"]["verdict"] == "pass"
    suite = run.suite()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")
    assert [c.get("name") for c in suite.iter("testcase")] == GATE
    # the summary: numbers with their intervals, masking warnings with their evidence, gate lines,
    # the report's address
    result = job["result"]
    robust, band = result["robust_accuracy"]["linf:0.02"], result["intervals"]["robust_accuracy"]["linf:0.02"]
    assert robust >= 0.4
    assert re.search(rf"robust accuracy @ linf:0\.02\s*│\s*{robust:.4f}\s*│\s*{re.escape(interval_text(band))}",
                     run.output), run.output
    (warned,) = [c for c in result["masking_checks"]["checks"] if c["status"] == "warn"]
    assert f"{warned['name']}: {warned['evidence'][:60]}" in run.output.replace("\n", " ")
    assert "PASS" in run.output and "FAIL" not in run.output
    assert f"{base_url}/v1/jobs/{job['id']}/artifacts/report.html" in run.output


def test_a_failing_gate_exits_1(base_url: str, tmp_path: Path, stub: Stub) -> None:
    bound = "robust_accuracy@linf:0.1.lower >= 0.5"
    run = audit(base_url, tmp_path, model="weak-cnn", gate=[*GATE, bound])
    assert run.code == 1, run.output
    suite = run.suite()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    failures = {c.get("name"): c.find("failure") for c in suite.iter("testcase")}
    weak = weak_audit().result
    band = weak["intervals"]["robust_accuracy"]["linf:0.02"]
    assert weak["robust_accuracy"]["linf:0.02"] == 0.0 and band["n"] == 16
    robust = failures["robust_accuracy@linf:0.02 >= 0.4"]
    assert robust is not None
    assert robust.get("message") == f"measured 0 ({interval_text(band)}), expected >= 0.4"
    lower = failures[bound]
    assert lower is not None and (lower.get("message") or "").startswith("measured lower bound 0 (estimate 0;")
    assert failures["clean_accuracy >= 0.9"] is None
    assert "FAIL" in run.output and "gate verdict: FAIL" in run.output
    assert json.loads(run.json_out.read_text())["result"]["gate"]["verdict"] == "fail"


def test_no_gate_lines_exits_0_with_one_case(base_url: str, tmp_path: Path, stub: Stub) -> None:
    run = audit(base_url, tmp_path, model="weak-cnn")
    assert run.code == 0, run.output
    assert [c.get("name") for c in run.suite().iter("testcase")] == ["audit completed"]
    assert stub.posts[0]["body"]["thresholds"] == []


def test_a_refused_request_exits_2_with_the_problem_detail(base_url: str, tmp_path: Path,
                                                            stub: Stub) -> None:
    run = audit(base_url, tmp_path, model="unknown-cnn", gate=GATE)
    assert run.code == 2
    assert "HTTP 422: model: expected one of fmnist-cnn, fmnist-resnet18, got 'unknown-cnn'" in run.output
    assert len(stub.posts) == 1  # a 4xx is not retried
    suite = run.suite()
    assert (suite.get("tests"), suite.get("errors")) == ("1", "1")
    error = suite.find("testcase/error")
    assert error is not None and "HTTP 422" in error.get("message", "")
    assert not run.json_out.exists()


def test_the_key_comes_from_the_environment(base_url: str, tmp_path: Path, stub: Stub,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADVERSA_API_KEY")
    run = audit(base_url, tmp_path)
    assert run.code == 2
    assert "authorization" not in stub.posts[0]["headers"]
    assert "HTTP 401: expected a valid bearer API key" in run.output


@pytest.mark.parametrize(("model", "status", "message"), [
    ("crashy-cnn", "failed", "worker-crashed: the worker died (out of memory)"),
    ("canceled-cnn", "canceled", "no error recorded"),
])
def test_a_job_that_does_not_succeed_exits_2(base_url: str, tmp_path: Path, stub: Stub, model: str,
                                              status: str, message: str) -> None:
    run = audit(base_url, tmp_path, model=model, gate=GATE)
    assert run.code == 2
    assert f"{status}: " in run.output and message in run.output
    assert json.loads(run.json_out.read_text())["status"] == status
    error = run.suite().find("testcase/error")
    assert error is not None and message in error.get("message", "")


def test_a_5xx_is_retried_with_the_same_idempotency_key(base_url: str, tmp_path: Path, stub: Stub) -> None:
    run = audit(base_url, tmp_path, model="flaky-cnn", gate=GATE)
    assert run.code == 0, run.output
    first, second = stub.posts
    assert first["headers"]["idempotency-key"] == second["headers"]["idempotency-key"]
    uuid.UUID(first["headers"]["idempotency-key"])
    assert len(stub.jobs) == 1
    assert "HTTP 503" in run.output and "retrying (1/3)" in run.output


def test_each_invocation_has_its_own_idempotency_key(base_url: str, tmp_path: Path, stub: Stub) -> None:
    audit(base_url, tmp_path)
    audit(base_url, tmp_path)
    assert len({post["headers"]["idempotency-key"] for post in stub.posts}) == 2
    assert len(stub.jobs) == 2


def test_a_connection_error_is_retried_then_exits_2(tmp_path: Path, stub: Stub) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
        run = audit(url, tmp_path)
    assert run.code == 2
    assert "retrying (3/3)" in run.output and "gave up after 4 tries" in run.output
    assert run.suite().find("testcase/error") is not None


def test_a_bad_gate_line_exits_2_before_any_request(base_url: str, tmp_path: Path, stub: Stub) -> None:
    run = audit(base_url, tmp_path, gate=["clean_accuracy >= 0.9", "robust_accuracy@linf >= 0.4"])
    assert run.code == 2
    assert stub.posts == []
    assert "gate line 1: robust_accuracy needs an eps after the norm (linf:<eps>)" in run.output
    error = run.suite().find("testcase/error")
    assert error is not None and "gate line 1" in error.get("message", "")


@pytest.mark.parametrize(("options", "message"), [
    ({"data": "no-such-file.npy"}, "expected --data to be a .npy/.npz file or a hosted data set"),
    ({"eps": ["linf:8/255"]}, "expected --eps like linf=1/255,8/255,0.1"),
    ({"eps": ["linf=0"]}, "expected eps > 0, got '0'"),
    ({"suite": "quick", "attacks_file": Path("specs.json")}, "expected --suite or --attacks-file, got both"),
])
def test_bad_options_exit_2_before_any_request(base_url: str, tmp_path: Path, stub: Stub,
                                               options: dict[str, Any], message: str) -> None:
    run = audit(base_url, tmp_path, **options)
    assert run.code == 2
    assert message in run.output
    assert stub.posts == []


def test_a_timeout_exits_2(base_url: str, tmp_path: Path, stub: Stub) -> None:
    run = audit(base_url, tmp_path, model="slow-cnn", timeout=0.3, poll=0.02)
    assert run.code == 2
    assert "timed out after 0.3 s" in run.output and "is still running" in run.output
    assert json.loads(run.json_out.read_text())["status"] == "running"
    assert run.suite().find("testcase/error") is not None


def test_an_npz_file_is_sent_inline(base_url: str, tmp_path: Path, stub: Stub) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)
    y = np.array([9, 2, 1, 1, 6])
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    run = audit(base_url, tmp_path, data=str(tmp_path / "batch.npz"), offset=1, limit=3)
    assert run.code == 0, run.output
    inputs = stub.posts[0]["body"]["inputs"]
    assert inputs["labels"] == [2, 1, 1]
    sent = np.load(io.BytesIO(base64.b64decode(inputs["array"])), allow_pickle=False)
    np.testing.assert_array_equal(sent, x[1:4])


def test_an_npy_file_without_labels_and_a_custom_attack_list(base_url: str, tmp_path: Path,
                                                             stub: Stub) -> None:
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "batch.npy", x)
    attacks = [{"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 20}]
    (tmp_path / "specs.json").write_text(json.dumps(attacks))
    run = audit(base_url, tmp_path, data=str(tmp_path / "batch.npy"), attacks_file=tmp_path / "specs.json",
                surrogates=["fmnist-resnet18"])
    assert run.code == 0, run.output
    body = stub.posts[0]["body"]
    assert "labels" not in body["inputs"] and "suite" not in body
    assert body["attacks"] == attacks and body["surrogates"] == ["fmnist-resnet18"]
    np.testing.assert_array_equal(np.load(io.BytesIO(base64.b64decode(body["inputs"]["array"]))), x)


@pytest.mark.parametrize(("content", "message"), [
    (b"not an array", "expected a readable .npy or .npz file"),
    (None, "expected an array named x"),
])
def test_an_unreadable_file_exits_2(base_url: str, tmp_path: Path, stub: Stub, content: bytes | None,
                                    message: str) -> None:
    path = tmp_path / "batch.npz"
    if content is None:
        np.savez(path, images=np.zeros((2, 28, 28), np.uint8))
    else:
        path.write_bytes(content)
    run = audit(base_url, tmp_path, data=str(path))
    assert run.code == 2
    assert message in run.output
    assert stub.posts == []


def test_the_typer_command(base_url: str, tmp_path: Path, stub: Stub) -> None:
    junit, json_out = tmp_path / "audit.xml", tmp_path / "audit.json"
    args = ["audit", "--url", base_url, "--model", "fmnist-cnn", "--data", "fashion-mnist:test",
            "--limit", "100", "--suite", "quick", "--eps", "linf=8/255", "--gate", GATE[0], "--gate", GATE[1],
            "--junit", str(junit), "--json", str(json_out), "--poll", "0.1", "--seed", "3"]
    result = CliRunner().invoke(cli_app, args, env={"ADVERSA_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    (post,) = stub.posts
    assert post["headers"]["authorization"] == f"Bearer {KEY}"
    assert post["body"]["suite"] == "quick" and post["body"]["inputs"]["limit"] == 100
    assert post["body"]["thresholds"] == GATE and post["body"]["seed"] == 3
    assert json.loads(json_out.read_text())["result"]["gate"]["verdict"] == "pass"
    assert ET.parse(junit).getroot().get("tests") == "2"

    bad = CliRunner().invoke(cli_app, [*args[:-6], "--gate", "robust_accuracy >= 0.4"],
                             env={"ADVERSA_API_KEY": KEY})
    assert bad.exit_code == 2
    assert "robust_accuracy needs @<norm>:<eps>" in bad.output
    assert len(stub.posts) == 1
