"""Regression gates through HTTP, Redis, a real worker and the history database (SQLite and
PostgreSQL): the adversarially trained model re-audited against its own version passes, the
undefended model gated on the adversarially trained one's audit (``adversa audit --baseline``)
fails, with both numbers in the result, the JUnit report and the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.conftest import REPO
from tests.integration.conftest import start_service, wait

LINES = ["robust_accuracy@linf:0.1 >= baseline - 0.01", "clean_accuracy >= baseline"]
# what `adversa audit --data fashion-mnist:test --limit 16 --suite quick --eps linf=0.1 --seed 0` sends
AUDIT = {"suite": "quick", "eps": {"linf": [0.1]}, "seed": 0,
         "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 16}}


@pytest.fixture
def service(redis_url: str, history_url: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    Redis.from_url(redis_url).flushdb()
    monkeypatch.setenv("ADVERSA_HISTORY_URL", history_url)
    running = start_service(redis_url, tmp_path / "var", worker_name="baseline-worker")
    try:
        yield running.client
    finally:
        running.stop()
        Redis.from_url(redis_url).flushdb()


def audited(service: httpx.Client, **body: object) -> dict[str, object]:
    response = service.post("/v1/audits", json={**AUDIT, **body})
    assert response.status_code == 202, response.text
    job = wait(service, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job  # type: ignore[no-any-return]


def test_a_regression_gate_fails_weakened_and_passes_unchanged(service: httpx.Client, tmp_path: Path) -> None:
    # PGD with 2 steps: the trained model's survivors are what the masking checks re-attack, at 5x
    # the steps and 3 restarts; few steps keep that short on a busy machine
    robust_audit = audited(service, model="fmnist-cnn-pgd-at", steps=2)
    robust = robust_audit["result"]["robust_accuracy"]["linf:0.1"]  # type: ignore[index]
    assert robust > 0.3  # adversarially trained: what the undefended model is held to

    args = [sys.executable, "-m", "service.cli", "audit", "--url", str(service.base_url),
            "--model", "fmnist-cnn", "--data", "fashion-mnist:test", "--limit", "16", "--suite", "quick",
            "--eps", "linf=0.1", "--seed", "0", "--poll", "0.5", "--timeout", "600",
            "--baseline", str(robust_audit["id"]), "--junit", str(tmp_path / "out.xml"),
            "--json", str(tmp_path / "out.json")]
    for expression in LINES:
        args += ["--gate", expression]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"baseline: audit {robust_audit['id']} of fmnist-cnn-pgd-at@1" in done.stdout
    weak_audit = json.loads((tmp_path / "out.json").read_text())
    weaker = weak_audit["result"]["gate"]["lines"][0]
    assert not weaker["passed"] and weaker["baseline_value"] == robust
    assert weaker["value"] < robust and weaker["difference"] == pytest.approx(weaker["value"] - robust)
    assert weaker["significant"] is True  # an undefended CNN at Linf 0.1: nothing survives
    junit = ET.parse(tmp_path / "out.xml").getroot()
    case = junit.find(f".//testcase[@name='{LINES[0]}']")
    assert case is not None and case.find("failure") is not None
    shown = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(shown["value"] or "nan") == weaker["value"]
    assert float(shown["baseline_value"] or "nan") == robust

    # the same model, data, suite, grid and seed against its own latest audit: nothing regressed
    again = audited(service, model="fmnist-cnn", baseline="fmnist-cnn@1", thresholds=LINES)
    result = again["result"]
    assert result["baseline"]["audit"] == weak_audit["id"]  # type: ignore[index]
    gate = result["gate"]  # type: ignore[index]
    assert gate["verdict"] == "pass", gate
    assert [(line["difference"], line["significant"]) for line in gate["lines"]] == [(0.0, False)] * 2
