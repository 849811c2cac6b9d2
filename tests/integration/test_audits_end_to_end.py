"""Audits end to end: HTTP -> chunk jobs on a real worker -> merge -> verdict, report and the CI
command ``adversa audit`` with its exit codes, JUnit and JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import REPO
from tests.integration.conftest import wait

GRID = {"linf": [0.02, 0.1, 0.3]}


def test_quick_audit_with_a_gate_report_and_artifacts(service: httpx.Client) -> None:
    response = service.post("/v1/audits", json={
        "model": "fmnist-cnn", "suite": "quick", "eps": GRID, "steps": 10, "chunk_size": 24, "seed": 0,
        "adaptive_steps": 10, "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 48},
        "thresholds": ["clean_accuracy >= 0.8", "robust_accuracy@linf:0.1 >= 0.5", "masking_checks == pass",
                       "adaptive_detect_reject_accuracy@linf:0.1 <= 1"]})
    assert response.status_code == 202, response.text
    audit_id = response.json()["id"]
    job = wait(service, audit_id)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "audit" and job["progress"] == 1.0
    result = job["result"]
    assert result["model"] == "fmnist-cnn@1" and result["n"] == 48 and result["suite"] == "quick"
    assert result["clean_accuracy"] >= 0.8
    curve = result["curves"]["linf"]
    assert curve["labels"] == ["0.02", "0.1", "0.3"] and set(curve["attacks"]) == {"fgsm", "pgd"}
    assert curve["worst_case"][1] <= 0.1  # an undefended CNN falls at Linf 0.1
    assert result["robust_accuracy"]["linf:0.1"] == curve["worst_case"][1]
    assert sum(row["n"] for row in result["per_class"]) == 48
    checks = {c["name"]: c for c in result["masking_checks"]["checks"]}
    assert checks["unbounded-attack-succeeds"]["status"] == "pass"
    assert checks["gradients-not-vanishing"]["status"] == "pass"
    gate = result["gate"]
    assert gate["verdict"] == "fail"
    assert [line["passed"] for line in gate["lines"]][:2] == [True, False]
    assert result["detector"] is not None  # the hosted fmnist-cnn has a calibrated detector
    # Detect-and-reject under the suite's (oblivious) examples and under the adaptive attack on model
    # and detector (10 steps per eps here, with the chunks' time counted apart).
    oblivious = result["detector"]["detect_reject_accuracy"]
    adaptive = result["detector"]["adaptive_detect_reject_accuracy"]
    assert list(adaptive) == list(oblivious) == ["linf:0.02", "linf:0.1", "linf:0.3"]
    assert all(0 <= adaptive[k] <= oblivious[k] <= 1 for k in oblivious)
    assert result["detector"]["adaptive"]["steps"] == 10 and result["counters"]["seconds_adaptive"] > 0
    assert result["intervals"]["adaptive_detect_reject_accuracy"]["linf:0.1"]["n"] == 48
    assert gate["lines"][3]["passed"] and gate["lines"][3]["estimate"] == adaptive["linf:0.1"]

    assert set(result["artifacts"]) == {"report.html", "samples.csv", "audit.json"}
    page = service.get(f"/v1/jobs/{audit_id}/artifacts/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "fmnist-cnn@1" in page.text and page.text.count("<img") >= 3
    assert "detect-and-reject accuracy (adaptive)" in page.text and "Oblivious" in page.text
    rows = list(csv.DictReader(io.StringIO(service.get(f"/v1/jobs/{audit_id}/artifacts/samples.csv").text)))
    assert len(rows) == 48 and {"linf_min_eps", "linf_attack"} <= set(rows[0])
    assert json.loads(service.get(f"/v1/jobs/{audit_id}/artifacts/audit.json").text)["n"] == 48


def _cli(service: httpx.Client, tmp_path: Path, *gate: str) -> tuple[int, str, Any, ET.Element]:
    args = [sys.executable, "-m", "service.cli", "audit", "--url", str(service.base_url),
            "--model", "fmnist-cnn", "--data", "fashion-mnist:test", "--limit", "24", "--suite", "quick",
            "--eps", "linf=0.02,0.1", "--seed", "1", "--poll", "0.5", "--timeout", "300",
            "--junit", str(tmp_path / "out.xml"), "--json", str(tmp_path / "out.json")]
    for line in gate:
        args += ["--gate", line]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    junit = ET.parse(tmp_path / "out.xml").getroot()
    return done.returncode, done.stdout + done.stderr, json.loads((tmp_path / "out.json").read_text()), junit


def test_the_ci_command_gates_with_exit_codes(service: httpx.Client, tmp_path: Path) -> None:
    code, output, job, junit = _cli(service, tmp_path, "clean_accuracy >= 0.5")
    assert code == 0, output
    assert job["status"] == "succeeded" and job["result"]["gate"]["verdict"] == "pass"
    assert junit.get("failures") == "0" and junit.get("tests") == "1"
    assert "report.html" in output

    code, output, job, junit = _cli(service, tmp_path, "clean_accuracy >= 0.5",
                                    "robust_accuracy@linf:0.1 >= 0.9")
    assert code == 1, output
    assert job["result"]["gate"]["verdict"] == "fail"
    assert junit.get("failures") == "1" and junit.get("tests") == "2"

    code, output, _, junit = _cli(service, tmp_path, "robust_accuracy@linf:0.05 >= 0.9")  # not in the grid
    assert code == 2, output
    assert junit.get("errors") == "1"
