"""The ``adversa`` command: ``serve``, ``worker``, ``models``, ``audit``.

Torch-free: ``audit`` runs in CI images that have only the client's dependencies.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from contracts.gate import GateError, GateLine, evaluate_gate, parse_eps, parse_gate
from contracts.intervals import text as interval_text
from contracts.junit import junit_error, junit_xml

app = typer.Typer(help="Adversa: adversarial-robustness service.", no_args_is_help=True)
console = Console()


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes to start")] = 1,
    log_level: str = "info",
) -> None:
    """Run the gateway, one worker per --workers, and an embedded Redis unless REDIS_URL is set."""
    from service.serve import serve as run
    from service.settings import Settings

    _logging(log_level)
    run(Settings(host=host, port=port, workers=workers))


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="exit when the queues are empty")] = False,
    name: Annotated[str | None, typer.Option(help="worker name")] = None,
    die_with_parent: Annotated[bool, typer.Option(hidden=True)] = False,
    log_level: str = "info",
) -> None:
    """Run one worker (no fork per job, models kept warm) on the queues named in settings."""
    # The gateway's one import of workers/ (tests/unit/test_layering.py names it): this command
    # launches the worker process, torch and all, so it imports the worker here, when it runs.
    from workers import main as launcher

    _logging(log_level)
    if die_with_parent:
        launcher.die_with_parent()
    launcher.run_worker(launcher.WorkerSettings(), burst=burst, name=name)


models_app = typer.Typer(help="Models: the local registry, and uploads to the service.",
                         no_args_is_help=True)
datasets_app = typer.Typer(help="Evaluation data sets on the service.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
UrlOption = Annotated[str, typer.Option(envvar="ADVERSA_URL", metavar="URL",
                                        help="the gateway, e.g. http://127.0.0.1:8000")]


@models_app.command("list")
def models_list() -> None:
    """List the models in the registry: hosted ones and this machine's var directory, or the S3
    store's registry with ADVERSA_BLOB_STORE=s3."""
    from contracts.settings import CommonSettings
    from models.registry_store import open_registries
    from models.store import open_store

    settings = CommonSettings()
    index = open_registries(settings, open_store(settings)).models
    table = Table("name", "version", "architecture", "clean accuracy")
    for name in index.names():
        card = index.card(name)
        if card is not None:
            accuracy = card.metrics.get("clean_accuracy")
            table.add_row(card.name, str(card.version), card.architecture,
                          f"{accuracy:.4f}" if accuracy is not None else "-")
    console.print(table)


def _headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _post_files(client: httpx.Client, url: str, data: dict[str, str], files: dict[str, Any]) -> httpx.Response:
    """POST multipart with an Idempotency-Key; retry connection errors and 5xx with the same key."""
    headers = {**_headers(), "Idempotency-Key": str(uuid.uuid4())}
    problem = ""
    for attempt in range(POST_RETRIES + 1):
        try:
            response = client.post(url, data=data, files=files, headers=headers)
        except httpx.TransportError as exc:
            problem = f"cannot reach {url}: {exc!r}"
        else:
            if not _retryable(response):
                return response
            problem = _problem(response)
        if attempt < POST_RETRIES:
            console.print(f"[yellow]{escape(problem)}; retrying ({attempt + 1}/{POST_RETRIES})[/yellow]")
            time.sleep(2.0 * 2**attempt)
    raise AuditAbort(f"{problem} (gave up after {POST_RETRIES + 1} tries)")


@models_app.command("push")
def models_push(
    url: UrlOption,
    card: Annotated[Path, typer.Option(metavar="FILE", help="the model card as JSON: name, input_shape, "
                                       "classes, bounds, normalization, architecture (safetensors)")],
    file: Annotated[Path, typer.Argument(metavar="MODEL", help="model.onnx, or weights.safetensors")],
    wait: Annotated[bool, typer.Option(help="wait for the registration job to end")] = True,
    timeout: Annotated[float, typer.Option(min=0, metavar="S", help="seconds to wait")] = 1800,
) -> None:
    """Register a new version of your model on the service (ONNX or safetensors, never pickles).

    Exit code 0: published (or queued with --no-wait); 2: refused or failed. The API key is read
    from ADVERSA_API_KEY."""
    try:
        card_text = card.read_text()
        blob = file.read_bytes()
    except OSError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    field = "weights" if file.suffix.lower() == ".safetensors" else "model"
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            response = _post_files(client, f"{base}/v1/models", {"card": card_text},
                                   {field: (file.name, blob, "application/octet-stream")})
            if response.status_code != 202:
                raise AuditAbort(_problem(response))
            job = _job_json(response)
            console.print(f"registration job {job['id']} queued ({base}/v1/jobs/{job['id']})")
            if not wait:
                raise typer.Exit(0)
            job = _wait(client, base, job, _headers(), timeout, 1.0, console, time.sleep, time.monotonic)
    except AuditAbort as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if job.get("status") != "succeeded":
        error = job.get("error") or {}
        console.print(f"[red]registration {job.get('status')}:[/red] "
                      f"{escape(str(error.get('code')))}: {escape(str(error.get('message')))}")
        raise typer.Exit(2)
    published = (job.get("result") or {}).get("card") or {}
    console.print(f"published [bold]{escape(str(published.get('name')))}@{published.get('version')}[/bold] "
                  f"(chunk size {published.get('batch_size')}, gradients "
                  f"{'yes' if published.get('gradients') else 'no'})")


@datasets_app.command("push")
def datasets_push(
    url: UrlOption,
    name: Annotated[str, typer.Option(metavar="NAME", help="data set name (kebab-case)")],
    file: Annotated[Path, typer.Argument(metavar="DATA", help=".npz (x, y), or .zip/.tar of class folders")],
    classes: Annotated[str | None, typer.Option(metavar="JSON", help="class names, a JSON list")] = None,
    split: Annotated[str, typer.Option(metavar="SPLIT", help="split name")] = "all",
    description: Annotated[str, typer.Option(help="one line on where the data comes from")] = "",
) -> None:
    """Upload an evaluation set (a new version of NAME); jobs then name it as NAME@VERSION:SPLIT."""
    spec: dict[str, Any] = {"name": name, "split": split, "description": description}
    if classes is not None:
        try:
            spec["classes"] = json.loads(classes)
        except json.JSONDecodeError as exc:
            console.print(f"[red]error:[/red] --classes: expected a JSON list: {escape(str(exc))}")
            raise typer.Exit(2) from None
    try:
        blob = file.read_bytes()
    except OSError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            response = _post_files(client, f"{base}/v1/datasets", {"spec": json.dumps(spec)},
                                   {"data": (file.name, blob, "application/octet-stream")})
    except AuditAbort as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if response.status_code not in (200, 201):
        console.print(f"[red]error:[/red] {escape(_problem(response))}")
        raise typer.Exit(2)
    card = response.json()
    console.print(f"stored [bold]{escape(str(card.get('name')))}@{card.get('version')}[/bold]: "
                  f"{escape(json.dumps(card.get('splits')))}, input shape {card.get('input_shape')}")


API_KEY_ENV = "ADVERSA_API_KEY"
TERMINAL = ("succeeded", "failed", "canceled")
POST_RETRIES = 3  # retries after the first try; the Idempotency-Key makes them safe
POLL_ERRORS = 10  # consecutive failed polls before giving up
DATASET_LIMIT = 500


class Suite(StrEnum):
    quick = "quick"
    standard = "standard"
    autoattack = "autoattack"
    minimal = "minimal"


class AuditAbort(Exception):
    """Ends ``adversa audit`` with exit code 2; ``job`` is the last job JSON seen, if any."""

    def __init__(self, message: str, job: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.job = job


def _load_array_inputs(path: Path, offset: int, limit: int | None) -> dict[str, Any]:
    """A ``.npy`` (images) or ``.npz`` (``x``, optional ``y``) file as inline inputs."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            x, y = loaded, None
        else:
            with loaded as archive:
                if "x" not in archive.files:
                    raise AuditAbort(f"expected an array named x in {path}, got {sorted(archive.files)}")
                x = archive["x"]
                y = archive["y"] if "y" in archive.files else None
    except (OSError, ValueError, EOFError) as exc:
        raise AuditAbort(f"expected a readable .npy or .npz file at {path}: {exc}") from None
    if x.ndim < 3:
        raise AuditAbort(f"expected images (N, C, H, W) or (N, H, W[, C]) in {path}, got shape {x.shape}")
    if y is not None and (y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu"):
        raise AuditAbort(f"expected y as {x.shape[0]} integer labels in {path}, "
                         f"got shape {y.shape} dtype {y.dtype}")
    if offset >= x.shape[0]:
        raise AuditAbort(f"expected --offset below the {x.shape[0]} samples of {path}, got {offset}")
    stop = None if limit is None else offset + limit
    x = np.ascontiguousarray(x[offset:stop])
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    inputs: dict[str, Any] = {"array": base64.b64encode(buffer.getvalue()).decode("ascii")}
    if y is not None:
        inputs["labels"] = [int(label) for label in y[offset:stop]]
    return inputs


def _inputs(data: str, offset: int, limit: int | None) -> dict[str, Any]:
    path = Path(data)
    if path.is_file():
        return _load_array_inputs(path, offset, limit)
    if ":" in data:
        return {"dataset": data, "offset": offset, "limit": limit or DATASET_LIMIT}
    raise AuditAbort(f"expected --data to be a .npy/.npz file or a hosted data set such as "
                     f"fashion-mnist:test, got {data!r} (no such file)")


def _eps_grid(options: Sequence[str]) -> dict[str, list[float]]:
    """``["linf=1/255,8/255", "l2=0.5"]`` -> ``{"linf": [1/255, 8/255], "l2": [0.5]}``."""
    grid: dict[str, list[float]] = {}
    for option in options:
        norm, equals, values = (part.strip() for part in option.partition("="))
        if not equals or norm not in ("linf", "l2") or not values:
            raise AuditAbort(f"expected --eps like linf=1/255,8/255,0.1 or l2=0.5, got {option!r}")
        try:
            grid.setdefault(norm, []).extend(parse_eps(v) for v in values.split(","))
        except ValueError as exc:
            raise AuditAbort(f"--eps {option!r}: {exc}") from None
    return grid


def _attacks(path: Path) -> list[Any]:
    """The attack specs of ``--attacks-file``: a JSON list, or an object with an ``attacks`` list."""
    try:
        specs = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AuditAbort(f"expected a readable JSON file at --attacks-file {path}: {exc}") from None
    if isinstance(specs, dict):
        specs = specs.get("attacks")
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise AuditAbort(f"expected --attacks-file {path} to hold a non-empty list of attack objects "
                         f"(or {{\"attacks\": [...]}})")
    return specs


def _problem(response: httpx.Response) -> str:
    """``HTTP 422: <detail>`` from a problem+json answer (or the start of any other body)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return f"HTTP {response.status_code}: {body['detail']}"
    return f"HTTP {response.status_code}: {response.text[:500] or response.reason_phrase}"


def _retryable(response: httpx.Response) -> bool:
    if response.status_code >= 500:
        return True
    if response.status_code == 409:  # the first try's enqueue is still in progress
        try:
            body = response.json()
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("code") == "idempotency-in-progress"
    return False


def _job_json(response: httpx.Response) -> dict[str, Any]:
    try:
        job = response.json()
    except ValueError:
        job = None
    if not isinstance(job, dict) or not isinstance(job.get("id"), str) or "status" not in job:
        raise AuditAbort(f"expected a job object with id and status, got HTTP {response.status_code}: "
                         f"{response.text[:300]}")
    return job


def _submit(client: httpx.Client, base: str, body: dict[str, Any], headers: dict[str, str],
            console: Console, retry_delay: float, sleep: Callable[[float], None]) -> dict[str, Any]:
    """POST the audit; retry connection errors and 5xx with the same Idempotency-Key."""
    headers = {**headers, "Idempotency-Key": str(uuid.uuid4())}
    problem = ""
    for attempt in range(POST_RETRIES + 1):
        try:
            response = client.post(f"{base}/v1/audits", json=body, headers=headers)
        except httpx.TransportError as exc:
            problem = f"cannot reach {base}: {exc!r}"
        else:
            if response.status_code in (200, 201, 202):
                return _job_json(response)
            if not _retryable(response):
                raise AuditAbort(_problem(response))
            problem = _problem(response)
        if attempt < POST_RETRIES:
            console.print(f"[yellow]{escape(problem)}; retrying ({attempt + 1}/{POST_RETRIES})[/yellow]")
            sleep(retry_delay * 2**attempt)
    raise AuditAbort(f"{problem} (gave up after {POST_RETRIES + 1} tries)")


def _stage_text(job: Mapping[str, Any]) -> str:
    stage = job.get("stage")
    text = str(job.get("status", "?"))
    if isinstance(stage, dict) and stage:
        text += " " + ", ".join(f"{key} {value}" for key, value in stage.items())
    return escape(text)


def _wait(client: httpx.Client, base: str, job: dict[str, Any], headers: dict[str, str],
          timeout: float, poll: float, console: Console, sleep: Callable[[float], None],
          clock: Callable[[], float]) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job ends; AuditAbort on timeout or a refused poll."""
    deadline = clock() + timeout
    url = f"{base}/v1/jobs/{job['id']}"
    errors = 0
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(_stage_text(job), total=1.0)
        progress.update(task, completed=float(job.get("progress") or 0))
        while job.get("status") not in TERMINAL:
            remaining = deadline - clock()
            if remaining <= 0:
                raise AuditAbort(f"timed out after {timeout:g} s: job {job['id']} is still "
                                 f"{job.get('status')} (it keeps running; DELETE {url} cancels it)", job)
            sleep(min(poll, remaining))
            try:
                response = client.get(url, headers=headers)
            except httpx.TransportError as exc:
                problem = f"cannot reach {base}: {exc!r}"
            else:
                if response.status_code == 200:
                    job, errors = _job_json(response), 0
                    progress.update(task, description=_stage_text(job),
                                    completed=float(job.get("progress") or 0))
                    continue
                if response.status_code < 500:
                    raise AuditAbort(f"polling job {job['id']}: {_problem(response)}", job)
                problem = _problem(response)
            errors += 1
            if errors >= POLL_ERRORS:
                raise AuditAbort(f"polling job {job['id']}: {problem} ({errors} times in a row)", job)
        if job.get("status") == "succeeded":
            progress.update(task, completed=1.0)
    return job


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _difference(line: Mapping[str, Any]) -> str:
    """A regression line's difference, marked ``*`` when it is larger than the noise."""
    difference = line.get("difference")
    if not isinstance(difference, int | float):
        return "-"
    return f"{difference:+.4f}{' *' if line.get('significant') else ''}"


def _print_summary(result: Mapping[str, Any], gate: Mapping[str, Any] | None, report_url: str,
                   console: Console) -> None:
    title = f"audit of {result.get('model', '?')} (suite {result.get('suite', '?')}, n={result.get('n', '?')})"
    console.print(f"[bold]{escape(title)}[/bold]")
    table = Table("metric", "value", "95% interval")
    bands = result.get("intervals") or {}
    table.add_row("clean accuracy", _fmt(result.get("clean_accuracy")),
                  interval_text(bands.get("clean_accuracy")))
    for key, value in (result.get("robust_accuracy") or {}).items():
        table.add_row(escape(f"robust accuracy @ {key}"), _fmt(value),
                      interval_text((bands.get("robust_accuracy") or {}).get(key)))
    for attack, entry in (result.get("minimal") or {}).items():
        for norm in ("l2", "linf"):
            if isinstance(entry, dict) and entry.get(f"median_{norm}") is not None:
                table.add_row(escape(f"{attack}: median {norm}"), _fmt(entry[f"median_{norm}"]))
    detector = result.get("detector") or {}
    for metric, attack in (("detect_reject_accuracy", "oblivious"),
                           ("adaptive_detect_reject_accuracy", "adaptive")):
        for key, value in (detector.get(metric) or {}).items():
            table.add_row(escape(f"detect/reject accuracy @ {key} ({attack} attack)"), _fmt(value),
                          interval_text((bands.get(metric) or {}).get(key)))
    for run in result.get("transfer") or []:
        table.add_row(escape(f"transfer from {run.get('surrogate')} @ {run.get('eps_label')}"),
                      _fmt(run.get("success_rate")),
                      interval_text((bands.get("transfer_success_rate") or {}).get(run.get("surrogate"))))
    masking = result.get("masking_checks") or {}
    status = masking.get("status", "-")
    table.add_row("masking checks", f"[green]{status}[/green]" if status == "pass" else
                  f"[yellow]{escape(str(status))}[/yellow]")
    console.print(table)
    for check in masking.get("checks") or []:
        if check.get("status") != "pass":
            console.print(f"[yellow]{escape(str(check.get('status')))}[/yellow] "
                          f"{escape(str(check.get('name')))}: {escape(str(check.get('evidence')))}")
    if isinstance(baseline := result.get("baseline"), Mapping):
        console.print(f"baseline: audit {escape(str(baseline.get('audit')))} of "
                      f"{escape(str(baseline.get('model')))} ({escape(str(baseline.get('created_at')))})")
    if gate and gate.get("lines"):
        compared = any(line.get("baseline") is not None for line in gate["lines"])
        lines = Table("gate line", "measured", *(("baseline", "difference") if compared else ()), "result",
                      "detail")
        for line in gate["lines"]:
            verdict = "[green]PASS[/green]" if line.get("passed") else "[red]FAIL[/red]"
            extra = (_fmt(line.get("baseline_value")), _difference(line)) if compared else ()
            lines.add_row(escape(str(line.get("expression"))), _fmt(line.get("value")), *extra, verdict,
                          escape(str(line.get("detail", ""))))
        console.print(lines)
        colour = "green" if gate.get("verdict") == "pass" else "red"
        console.print(f"gate verdict: [{colour}]{escape(str(gate.get('verdict')).upper())}[/{colour}]")
    console.print(f"report: {escape(report_url)}", soft_wrap=True)


def _write(path: Path | None, data: bytes) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _report_link(client: httpx.Client, base: str, job_id: str,
                 headers: dict[str, str]) -> dict[str, str] | None:
    """A signed link to the audit's report for the CI log (``GET /v1/audits/{id}/report-link``);
    None when the server has none to give (an older server) or does not answer."""
    try:
        response = client.get(f"{base}/v1/audits/{job_id}/report-link", headers=headers)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if isinstance(body, dict) and isinstance(body.get("url"), str) and isinstance(body.get("expires_at"), str):
        return {"url": body["url"], "expires_at": body["expires_at"]}
    return None


def run_audit(client: httpx.Client, *, url: str, model: str, data: str, console: Console,
              offset: int = 0, limit: int | None = None, suite: str | None = None,
              attacks_file: Path | None = None, eps: Sequence[str] = (), gate: Sequence[str] = (),
              surrogates: Sequence[str] = (), seed: int | None = None, junit: Path | None = None,
              json_out: Path | None = None, timeout: float = 3600, poll: float = 2, baseline: str | None = None,
              retry_delay: float = 1.0, sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.monotonic) -> int:
    """Start an audit, follow it, print and write its report. Exit code: 0 the gate passed (or
    there was none), 1 it failed, 2 anything else went wrong (then ``junit`` holds an error case).
    The bearer key comes from ``ADVERSA_API_KEY`` only, never from an argument."""
    base = url.rstrip("/")
    suite_name = f"adversa audit {model}"
    headers = {"Accept": "application/json"}
    if key := os.environ.get(API_KEY_ENV):
        headers["Authorization"] = f"Bearer {key}"
    job: Mapping[str, Any] | None = None
    try:
        try:
            lines: list[GateLine] = parse_gate(list(gate))
        except GateError as exc:
            raise AuditAbort(f"--gate: {exc}") from None
        if attacks_file is not None and suite is not None:
            raise AuditAbort("expected --suite or --attacks-file, got both")
        body: dict[str, Any] = {"model": model, "inputs": _inputs(data, offset, limit)}
        if attacks_file is not None:
            body["attacks"] = _attacks(attacks_file)
        else:
            body["suite"] = suite or Suite.standard.value
        if eps:
            body["eps"] = _eps_grid(eps)
        body["thresholds"] = [line.expression for line in lines]
        body["surrogates"] = list(surrogates)
        if baseline is not None:
            body["baseline"] = baseline
        if seed is not None:
            body["seed"] = seed
        job = _submit(client, base, body, headers, console, retry_delay, sleep)
        console.print(f"audit job {escape(job['id'])} accepted: {escape(base)}/v1/jobs/{escape(job['id'])}",
                      soft_wrap=True)
        job = _wait(client, base, job, headers, timeout, poll, console, sleep, clock)
        if job.get("status") != "succeeded":
            error = job.get("error") or {}
            raise AuditAbort(f"job {job['id']} {job.get('status')}: "
                             f"{error.get('code', '-')}: {error.get('message', 'no error recorded')}", job)
        result = job.get("result")
        if not isinstance(result, dict):
            raise AuditAbort(f"job {job['id']} succeeded without a result", job)
    except AuditAbort as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        job = exc.job or job
        try:
            if job is not None:
                _write(json_out, json.dumps(job, indent=2).encode())
            _write(junit, junit_error(str(exc), suite_name, model=model))
        except OSError as write_error:
            console.print(f"[red]error:[/red] cannot write the report: {escape(str(write_error))}")
        return 2

    report = result.get("gate")
    if report is None and lines:  # an older server: judge here, never pass unjudged lines
        report = evaluate_gate(lines, result)
        result = {**result, "gate": report}
    report_url = f"{base}/v1/jobs/{job['id']}/artifacts/report.html"
    _print_summary(result, report, report_url, console)
    if link := _report_link(client, base, str(job["id"]), headers):
        console.print(f"report in a browser, no key needed (until {escape(link['expires_at'])}): "
                      f"{escape(link['url'])}", soft_wrap=True)
    try:
        _write(json_out, json.dumps(job, indent=2).encode())
        _write(junit, junit_xml(result, suite_name, extra_properties={"job": job["id"], "report": report_url}))
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot write the report: {escape(str(exc))}")
        return 2
    return 0 if report is None or report.get("verdict") == "pass" else 1


@app.command()
def audit(
    url: Annotated[str, typer.Option(
        envvar="ADVERSA_URL", metavar="URL", help="the gateway, e.g. http://127.0.0.1:8000")],
    model: Annotated[str, typer.Option(metavar="NAME", help="the model to audit: name or name@version")],
    data: Annotated[str, typer.Option(
        metavar="FILE|DATASET",
        help="a .npy (float32 NCHW in [0, 1] or uint8 NHWC) or .npz (x, optional labels y) file, "
             "or a hosted data set such as fashion-mnist:test")],
    offset: Annotated[int, typer.Option(min=0, metavar="N", help="first sample")] = 0,
    limit: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="samples (default: 500 of a data set, all of a file)")] = None,
    suite: Annotated[Suite | None, typer.Option(help="attack battery (default: standard)")] = None,
    attacks_file: Annotated[Path | None, typer.Option(
        metavar="FILE", help="JSON list of attack specs, instead of --suite")] = None,
    eps: Annotated[list[str] | None, typer.Option(
        metavar="NORM=EPS,...",
        help="eps grid of a norm, e.g. linf=1/255,8/255,0.1 (repeat for l2=...)")] = None,
    gate: Annotated[list[str] | None, typer.Option(
        metavar="EXPR", help="threshold, e.g. 'robust_accuracy@linf:8/255 >= 0.4' (repeatable)")] = None,
    surrogate: Annotated[list[str] | None, typer.Option(
        metavar="NAME", help="surrogate model for transfer attacks (repeatable)")] = None,
    baseline: Annotated[str | None, typer.Option(
        metavar="AUDIT-ID|NAME@VERSION",
        help="what `baseline` means in --gate lines ('robust_accuracy@linf:8/255 >= baseline - 0.01'): an "
             "earlier audit id, or a model version whose latest audit on the same data, suite and eps grid "
             "is used")] = None,
    junit: Annotated[Path | None, typer.Option(metavar="FILE", help="write a JUnit XML report here")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE", help="write the job JSON here")] = None,
    timeout: Annotated[float, typer.Option(min=0, metavar="S", help="seconds to wait for the job")] = 3600,
    poll: Annotated[float, typer.Option(min=0.1, metavar="S", help="seconds between polls")] = 2,
    seed: Annotated[int | None, typer.Option(
        metavar="N", help="seed of the job (default: chosen by the server)")] = None,
) -> None:
    """Audit a model's robustness on the service and gate on thresholds (for CI).

    Exit code 0: the gate passed (or none was given); 1: it failed; 2: an error.

    The API key is read from the environment variable ADVERSA_API_KEY."""
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0)) as client:
        code = run_audit(client, url=url, model=model, data=data, console=console, offset=offset,
                         limit=limit, suite=suite.value if suite else None, attacks_file=attacks_file,
                         eps=eps or (), gate=gate or (), surrogates=surrogate or (), seed=seed,
                         junit=junit, json_out=json_out, timeout=timeout, poll=poll, baseline=baseline)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
