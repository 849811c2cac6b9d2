"""The client distribution (``contracts/`` + ``client/``) installed alone in its own venv, without
torch, driving a real gateway and worker only through its ``adversa-client`` command.

The venv is built once per content of ``contracts/`` and ``client/`` (kept under
``var/client-venv/<hash>``), with this interpreter's pip and the package index it is configured
with: a rerun with unchanged sources reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from tests.conftest import REPO
from tests.integration.conftest import JOB_TIMEOUT_S, Running, start_service

SOURCES = ("contracts", "client")
MAX_VENV_MB = 60
SAMPLES = REPO / "docs" / "samples"


def _sources_digest() -> str:
    digest = hashlib.sha256(sys.version.encode())
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*")):
            parts = set(path.relative_to(REPO).parts)
            if path.is_file() and not parts & {"__pycache__", "build"} and not any(
                    part.endswith(".egg-info") for part in parts):
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _size_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass(frozen=True)
class ClientVenv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def command(self) -> Path:
        return self.root / "bin" / "adversa-client"


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    """A venv without system site packages, with only ``pip install ./contracts ./client`` in it
    (no pip or setuptools of its own: this interpreter's pip installs into it)."""
    root = REPO / "var" / "client-venv" / _sources_digest()
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        # build from a copy: a build leaves egg-info and build/ beside the sources
        copy = tmp_path_factory.mktemp("client-src")
        for top in SOURCES:
            shutil.copytree(REPO / top, copy / top, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "build"))
        subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
                        "--quiet", str(copy / "contracts"), str(copy / "client")], check=True)
        done.write_text("ok\n")
    return ClientVenv(root)


@pytest.fixture(scope="module")
def running(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    Redis.from_url(redis_url).flushdb()
    service = start_service(redis_url, tmp_path_factory.mktemp("var"), worker_name="client-dist-worker")
    try:
        yield service
    finally:
        service.stop()
        Redis.from_url(redis_url).flushdb()


class Cli:
    """``adversa-client`` as a subprocess of the client venv, pointed at the test service."""

    def __init__(self, venv: ClientVenv, url: str) -> None:
        self.venv = venv
        # nothing of the server's environment: no PYTHONPATH, no repository on the path
        self.env = {"PATH": f"{venv.root / 'bin'}:/usr/bin:/bin", "ADVERSA_URL": url,
                    "HOME": os.environ.get("HOME", "/tmp"), "COLUMNS": "200"}

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv.command), *args], env=self.env, cwd=cwd or REPO,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60, check=False)

    def ok(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        done = self(*args, cwd=cwd)
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args).stdout)


@pytest.fixture(scope="module")
def cli(client_venv: ClientVenv, running: Running) -> Cli:
    return Cli(client_venv, str(running.client.base_url).rstrip("/"))


def _wait_canceled(cli: Cli, job_id: str) -> None:
    """``jobs wait`` until the job ends; it must end canceled (exit 2 names the state)."""
    ended = cli("jobs", "wait", job_id, "--timeout", str(JOB_TIMEOUT_S), "--poll", "0.5")
    assert ended.returncode == 2 and f"job {job_id} canceled" in ended.stderr, ended.stderr


def test_the_client_venv_has_no_torch_and_stays_small(client_venv: ClientVenv) -> None:
    probe = subprocess.run(
        [str(client_venv.python), "-c", "import sys, adversa_client.cli, contracts.specs, contracts.junit;"
         "print(sys.prefix);"
         "import importlib.util as u; print([m for m in ('torch', 'numpy', 'service', 'workers', 'models')"
         " if u.find_spec(m)])"],
        capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"}, check=True)
    prefix, importable = probe.stdout.splitlines()
    assert Path(prefix) == client_venv.root
    assert importable == "[]", f"the client venv can import {importable}"
    size_mb = _size_bytes(client_venv.root) / 2**20
    assert size_mb < MAX_VENV_MB, f"client venv is {size_mb:.1f} MB, goal < {MAX_VENV_MB} MB"


def test_version(cli: Cli) -> None:
    assert re.fullmatch(r"adversa-client \d+\.\d+\.\d+\n", cli.ok("--version").stdout)


def test_models_list_and_show(cli: Cli) -> None:
    models = {m["name"]: m for m in cli.json("models", "list", "--json")}
    assert models["fmnist-cnn"]["input_shape"] == [1, 28, 28] and models["fmnist-cnn"]["hosted"]
    card = cli.json("models", "show", "fmnist-cnn")
    assert card["name"] == "fmnist-cnn" and len(card["classes"]) == 10
    table = cli.ok("models", "list").stdout
    assert "fmnist-cnn" in table
    missing = cli("models", "show", "no-such-model")
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr, missing.stderr


def test_attack_on_sample_images_then_jobs_verbs(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    done = cli.ok("attack", "--model", "fmnist-cnn", "--attack", "fgsm", "--eps", "0.1",
                  "--image", str(SAMPLES / "ankle-boot.png"), "--image", str(SAMPLES / "pullover.png"),
                  "--labels", "9,2", "--seed", "0", "--out", str(out), "--json", str(tmp_path / "job.json"),
                  "--progress-interval", "0")
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["status"] == "succeeded" and job["result"]["scores"]["n"] == 2
    # not a terminal: progress comes as lines, the last one the job's end
    lines = re.findall(rf"job {job['id']}: (\w+) (\d+)%", done.stderr)
    assert lines and lines[-1] == ("succeeded", "100"), done.stderr
    assert "robust accuracy" in done.stdout
    assert {p.name for p in out.iterdir()} == set(job["result"]["artifacts"])
    assert (out / "adversarial.npy").read_bytes().startswith(b"\x93NUMPY")

    listed = cli.json("jobs", "list", "--kind", "attack", "--json")
    assert job["id"] in [entry["id"] for entry in listed]
    shown = cli.json("jobs", "show", job["id"])
    assert shown["result"]["scores"] == job["result"]["scores"]
    again = tmp_path / "again"
    cli.ok("jobs", "download", job["id"], "grid.png", "--out", str(again))
    assert [p.name for p in again.iterdir()] == ["grid.png"]
    assert (again / "grid.png").read_bytes() == (out / "grid.png").read_bytes()


def test_bad_input_is_a_clear_error_not_a_traceback(cli: Cli) -> None:
    refused = cli("attack", "--model", "fmnist-cnn", "--attack", "pgd", "--eps", "-1",
                  "--data", "fashion-mnist:test", "--limit", "2")
    assert refused.returncode == 2 and "eps" in refused.stderr and "Traceback" not in refused.stderr
    unknown = cli("attack", "--model", "fmnist-cnn", "--attack", "fgsm", "--eps", "0.1",
                  "--data", "no-such-set:test", "--limit", "2")
    assert unknown.returncode == 2 and "HTTP 4" in unknown.stderr, unknown.stderr


def test_audit_gate_junit_and_report(cli: Cli, tmp_path: Path) -> None:
    junit = tmp_path / "adversa.xml"
    done = cli("audit", "--model", "fmnist-cnn", "--data", "fashion-mnist:test", "--limit", "16",
               "--suite", "quick", "--eps", "linf=0.3", "--steps", "5", "--seed", "0",
               "--gate", "clean_accuracy >= 0.5", "--gate", "robust_accuracy@linf:0.3 >= 0.99",
               "--junit", str(junit), "--json", str(tmp_path / "audit.json"), "--progress-interval", "5")
    assert done.returncode == 1, f"{done.stdout}\n{done.stderr}"  # the second line fails
    assert "gate verdict: FAIL" in done.stdout
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    failing = [name for name, case in cases.items() if case.find("failure") is not None]
    assert len(failing) == 1 and "robust_accuracy" in str(failing[0]), ET.tostring(ET.parse(junit).getroot())
    audit_id = json.loads((tmp_path / "audit.json").read_text())["id"]
    page = tmp_path / "report.html"
    cli.ok("report", audit_id, "--save", str(page))
    assert page.read_text().lstrip().lower().startswith("<!doctype html")


def test_timeout_cancels_the_job_unless_keep_running(cli: Cli) -> None:
    long_attack = ("attack", "--model", "fmnist-cnn", "--attack", "pgd", "--eps", "0.01", "--steps", "1000",
                   "--data", "fashion-mnist:test", "--limit", "2000", "--batch-size", "8")
    kept = cli(*long_attack, "--timeout", "0.5", "--keep-running")
    assert kept.returncode == 2 and "left running" in kept.stderr, kept.stderr
    kept_id = re.search(r"attack job (\w+)", kept.stdout)
    assert kept_id, kept.stdout
    assert cli.json("jobs", "show", kept_id[1])["status"] in ("queued", "running")

    canceled = cli(*long_attack, "--timeout", "0.5")
    assert canceled.returncode == 2 and "canceled it" in canceled.stderr, canceled.stderr
    canceled_id = re.search(r"attack job (\w+)", canceled.stdout)
    assert canceled_id, canceled.stdout
    _wait_canceled(cli, canceled_id[1])

    assert "canceled" in cli.ok("jobs", "cancel", kept_id[1]).stdout  # at once, or at its next chunk
    _wait_canceled(cli, kept_id[1])
