"""The ``adversa-client`` command, built on the SDK: models, datasets, attack, jobs, audit, report.

Exit codes: 0 done (an audit: its gate passed or there was none), 1 an audit's gate failed, 2 any
error (refused request, failed or canceled job, timeout). The API key is read from the environment
(``ADVERSA_API_KEY``), never from a flag; the service from ``--url`` or ``ADVERSA_URL``.

While a job runs, a terminal shows a progress bar; anything else (a CI log) gets one line per state
change and otherwise one every ``--progress-interval`` seconds. ``--timeout`` cancels the job when it
runs out, unless ``--keep-running``.
"""

from __future__ import annotations

import base64
import json
import time
import webbrowser
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from adversa_client._version import __version__
from adversa_client.sdk import AdversaError, Client, JobTimeout, inline_images
from contracts.intervals import text as _interval
from contracts.junit import junit_error, junit_xml
from contracts.specs import JobView

API_KEY_ENV = "ADVERSA_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
DATASET_LIMIT = 500

app = typer.Typer(name="adversa-client", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adversa client: attack, audit and inspect models on an Adversa service.")
models_app = typer.Typer(help="The models you may use; register your own.", no_args_is_help=True)
datasets_app = typer.Typer(help="Evaluation data sets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Your jobs: list, show, cancel, download artifacts.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


class Failed(Exception):
    """Ends the command with ``code`` after printing the message."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Options:
    url: str
    api_key: str | None

    @contextmanager
    def client(self) -> Iterator[Client]:
        try:
            with Client(self.url, self.api_key) as client:
                yield client
        except AdversaError as exc:
            raise Failed(str(exc)) from None


def _options(ctx: typer.Context) -> Options:
    assert isinstance(ctx.obj, Options), "the app callback sets the options"
    return ctx.obj


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adversa-client {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="ADVERSA_URL", metavar="URL",
                                     help="the service")] = DEFAULT_URL,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Adversa client. The API key comes from the environment variable ADVERSA_API_KEY."""
    import os

    ctx.obj = Options(url=url, api_key=os.environ.get(API_KEY_ENV) or None)


# --- following a job ------------------------------------------------------------------------------

WaitOption = Annotated[bool, typer.Option(help="wait for the job to end")]
TimeoutOption = Annotated[float, typer.Option(min=0, metavar="S",
                                              help="seconds to wait; then the job is canceled")]
KeepOption = Annotated[bool, typer.Option(help="on --timeout, leave the job running")]
PollOption = Annotated[float, typer.Option(min=0.1, metavar="S", help="seconds between polls")]
IntervalOption = Annotated[float, typer.Option(
    min=0, metavar="S", help="without a terminal: seconds between progress lines")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]


def _stage(job: JobView) -> str:
    text = f"{job.status} {job.progress:.0%}"
    if job.stage:
        text += " (" + ", ".join(f"{key} {value}" for key, value in job.stage.items()) + ")"
    return text


class ProgressLines:
    """Progress of one job: a bar on a terminal; else a line on each state change and at most one
    every ``interval`` seconds in between (a CI log stays short and still shows life)."""

    def __init__(self, job_id: str, interval: float, tty: bool) -> None:
        self.job_id = job_id
        self.interval = interval
        self.tty = tty
        self.last_status = ""
        self.last_line = -float("inf")
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.started = time.monotonic()

    def __enter__(self) -> ProgressLines:
        if self.tty:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=errors)
            self.bar.__enter__()
            self.task = self.bar.add_task(f"job {self.job_id}", total=1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def __call__(self, job: JobView) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=escape(f"job {job.id}: {_stage(job)}"),
                            completed=job.progress)
            return
        now = time.monotonic()
        if job.status != self.last_status or now - self.last_line >= self.interval:
            self.last_status, self.last_line = job.status, now
            errors.print(f"job {escape(job.id)}: {escape(_stage(job))} after {now - self.started:.0f} s",
                         soft_wrap=True)


def follow(client: Client, job: JobView, *, timeout: float, poll: float, interval: float,
           keep_running: bool) -> JobView:
    """Wait for ``job`` with progress; on timeout cancel it (unless ``keep_running``) and fail."""
    tty = errors.is_terminal
    try:
        with ProgressLines(job.id, interval, tty) as progress:
            return client.jobs.wait(job.id, timeout=timeout, poll=poll, on_progress=progress)
    except JobTimeout as exc:
        if keep_running:
            raise Failed(f"{exc} (left running: adversa-client jobs cancel {job.id})") from None
        try:
            canceled = client.jobs.cancel(job.id)
        except AdversaError as cancel_error:
            raise Failed(f"{exc}; canceling it failed: {cancel_error}") from None
        if canceled.status == "canceled":
            raise Failed(f"{exc}; canceled it") from None
        raise Failed(f"{exc}; canceled it (it stops at its next chunk)") from None


def _check_ended(job: JobView) -> None:
    if job.status != "succeeded":
        error = job.error
        detail = f"{error.code}: {error.message}" if error else "no error recorded"
        raise Failed(f"job {job.id} {job.status}: {detail}")


def _run(code_of: Any) -> None:
    """Run a command body, mapping ``Failed`` and SDK errors to a message and an exit code."""
    try:
        code = code_of()
    except Failed as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.code) from None
    except AdversaError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code or 0)


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


# --- inputs ----------------------------------------------------------------------------------------


def _array_file(path: Path, offset: int, limit: int | None) -> dict[str, Any]:
    """A ``.npy`` file as it is (no numpy needed), or sliced / an ``.npz`` (``x``, optional ``y``)
    through numpy (``pip install 'adversa-client[arrays]'``)."""
    if path.suffix.lower() == ".npy" and offset == 0 and limit is None:
        return {"array": base64.b64encode(path.read_bytes()).decode("ascii")}
    try:
        import io

        import numpy as np
    except ImportError:
        raise Failed(f"reading {path} with --offset/--limit or as .npz needs numpy: "
                     "pip install 'adversa-client[arrays]'") from None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            x, y = loaded, None
        else:
            with loaded as archive:
                if "x" not in archive.files:
                    raise Failed(f"expected an array named x in {path}, got {sorted(archive.files)}")
                x = archive["x"]
                y = archive["y"] if "y" in archive.files else None
    except (OSError, ValueError, EOFError) as exc:
        raise Failed(f"expected a readable .npy or .npz file at {path}: {exc}") from None
    stop = None if limit is None else offset + limit
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(x[offset:stop]), allow_pickle=False)
    inputs: dict[str, Any] = {"array": base64.b64encode(buffer.getvalue()).decode("ascii")}
    if y is not None:
        inputs["labels"] = [int(label) for label in y[offset:stop]]
    return inputs


def _inputs(data: str | None, images: Sequence[Path], labels: str | None, offset: int,
            limit: int | None) -> dict[str, Any]:
    """``--data`` (a data set such as fashion-mnist:test, or a .npy/.npz file) or ``--image`` files."""
    label_list = _labels(labels)
    if images:
        if data is not None:
            raise Failed("expected --data or --image, got both")
        return inline_images(images, label_list)
    if data is None:
        raise Failed("expected --data (a data set such as fashion-mnist:test, or a .npy/.npz file) "
                     "or --image FILE")
    path = Path(data)
    if path.is_file():
        inputs = _array_file(path, offset, limit)
        if label_list is not None:
            inputs["labels"] = label_list
        return inputs
    if ":" in data:
        if label_list is not None:
            raise Failed("--labels: a data set brings its own labels")
        return {"dataset": data, "offset": offset, "limit": limit or DATASET_LIMIT}
    raise Failed(f"expected --data to be a .npy/.npz file or a data set such as fashion-mnist:test, "
                 f"got {data!r} (no such file)")


def _labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise Failed(f"expected --labels as class numbers like 9,2, got {text!r}") from None


def _param(text: str) -> tuple[str, Any]:
    key, equals, raw = text.partition("=")
    if not equals or not key.strip():
        raise Failed(f"expected --param KEY=VALUE (VALUE in JSON, or a word), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def parse_eps(text: str) -> float:
    """``"8/255"`` -> 8/255, ``"0.1"`` -> 0.1."""
    numerator, slash, denominator = text.strip().partition("/")
    try:
        eps = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise Failed(f"expected eps as a number or a fraction like 8/255, got {text!r}") from None
    if not eps > 0 or eps == float("inf"):
        raise Failed(f"expected eps > 0, got {text!r}")
    return eps


def _eps_grid(options: Sequence[str]) -> dict[str, list[float]]:
    """``["linf=1/255,8/255", "l2=0.5"]`` -> ``{"linf": [1/255, 8/255], "l2": [0.5]}``."""
    grid: dict[str, list[float]] = {}
    for option in options:
        norm, equals, values = (part.strip() for part in option.partition("="))
        if not equals or norm not in ("linf", "l2") or not values:
            raise Failed(f"expected --eps like linf=1/255,8/255,0.1 or l2=0.5, got {option!r}")
        grid.setdefault(norm, []).extend(parse_eps(v) for v in values.split(","))
    return grid


def _write(path: Path | None, data: bytes) -> None:
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            raise Failed(f"cannot write {path}: {exc.strerror or exc}") from None


# --- models and datasets --------------------------------------------------------------------------


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The models you may attack: hosted ones and your team's (latest version of each)."""
    def body() -> None:
        with _options(ctx).client() as client:
            models = client.models.list()
        if as_json:
            _echo_json([model.model_dump(mode="json") for model in models])
            return
        table = Table("name", "version", "input", "classes", "clean accuracy", "hosted")
        for model in models:
            table.add_row(escape(model.name), str(model.version), "x".join(map(str, model.input_shape)),
                          str(len(model.classes)), _fmt(model.metrics.get("clean_accuracy")),
                          "yes" if model.hosted else "no")
        console.print(table)
    _run(body)


@models_app.command("show")
def models_show(ctx: typer.Context, ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]")]) -> None:
    """A model's card (JSON): input shape, classes, bounds, metrics, lineage, sha256."""
    def body() -> None:
        with _options(ctx).client() as client:
            _echo_json(client.models.get(ref))
    _run(body)


@models_app.command("push")
def models_push(
    ctx: typer.Context,
    card: Annotated[Path, typer.Option(metavar="FILE", help="the model card as JSON: name, input_shape, "
                                       "classes, bounds, normalization, architecture (safetensors)")],
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="model.onnx, or weights.safetensors")],
    wait: WaitOption = True, timeout: TimeoutOption = 1800, keep_running: KeepOption = False,
    poll: PollOption = 1.0, progress_interval: IntervalOption = 10,
) -> None:
    """Register a new version of your model (ONNX, or safetensors of a catalog architecture)."""
    def body() -> None:
        with _options(ctx).client() as client:
            job = client.models.push(card, model)
            console.print(f"registration job {job.id} {job.status}")
            if not wait:
                return
            job = follow(client, job, timeout=timeout, poll=poll, interval=progress_interval,
                         keep_running=keep_running)
        _check_ended(job)
        published = (job.result or {}).get("card") or {}
        console.print(f"published {escape(str(published.get('name')))}@{published.get('version')}")
    _run(body)


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The data sets you may name in jobs: hosted ones and your team's."""
    def body() -> None:
        with _options(ctx).client() as client:
            sets = client.datasets.list()
        if as_json:
            _echo_json(sets)
            return
        table = Table("name", "version", "references")
        for entry in sets:
            table.add_row(escape(str(entry.get("name"))), _fmt(entry.get("version")),
                          escape(", ".join(map(str, entry.get("references") or []))))
        console.print(table)
    _run(body)


@datasets_app.command("push")
def datasets_push(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(metavar="NAME", help="data set name (kebab-case)")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help=".npz (x, y), or .zip/.tar of class folders")],
    classes: Annotated[str | None, typer.Option(metavar="A,B,...", help="class names, in label order")] = None,
    split: Annotated[str, typer.Option(metavar="SPLIT", help="split name")] = "all",
    description: Annotated[str, typer.Option(help="where the data comes from")] = "",
) -> None:
    """Upload an evaluation set as the next version of NAME; jobs name it NAME@VERSION:SPLIT."""
    def body() -> None:
        with _options(ctx).client() as client:
            card = client.datasets.push(name, data, split=split, description=description,
                                        classes=classes.split(",") if classes else None)
        console.print(f"stored {escape(str(card.get('name')))}@{card.get('version')}: jobs name it "
                      f"{escape(', '.join(map(str, card.get('references') or [])))}")
    _run(body)


# --- attack -----------------------------------------------------------------------------------------


def _print_scores(job: JobView) -> None:
    result = job.result or {}
    scores = result.get("scores") or {}
    title = f"{result.get('attack', {}).get('name', 'attack')} "
    table = Table("score", "value", "8-bit quantized", title=title +
                  f"on {result.get('model', job.model)} (n={scores.get('n', '?')})")
    quantized = scores.get("quantized") or {}
    for key in ("clean_accuracy", "robust_accuracy", "success_rate", "rho", "confidence",
                "gradient_calls", "queries"):
        if key in scores:
            table.add_row(key.replace("_", " "), _fmt(scores.get(key)), _fmt(quantized.get(key)))
    for norm, stats in (scores.get("perturbation") or {}).items():
        if isinstance(stats, dict):
            table.add_row(f"{norm} mean / median",
                          f"{_fmt(stats.get('mean'))} / {_fmt(stats.get('median'))}", "")
    console.print(table)
    console.print(f"artifacts: {', '.join(result.get('artifacts') or []) or '-'}")


@app.command()
def attack(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(metavar="NAME[@VERSION]", help="the model to attack")],
    name: Annotated[str, typer.Option("--attack", metavar="NAME", help="fgsm, pgd, deepfool, apgd-ce, ...")],
    eps: Annotated[str | None, typer.Option(metavar="EPS", help="budget, e.g. 0.1 or 8/255")] = None,
    norm: Annotated[str | None, typer.Option(metavar="NORM", help="linf, l2 or l0")] = None,
    steps: Annotated[int | None, typer.Option(min=1, metavar="N")] = None,
    param: Annotated[list[str] | None, typer.Option(
        metavar="KEY=VALUE", help="any other attack parameter, VALUE in JSON (repeatable)")] = None,
    data: Annotated[str | None, typer.Option(
        metavar="DATASET|FILE", help="a data set such as fashion-mnist:test, or a .npy/.npz file")] = None,
    image: Annotated[list[Path] | None, typer.Option(
        metavar="FILE", help="a PNG/JPEG image (repeatable)")] = None,
    labels: Annotated[str | None, typer.Option(metavar="9,2,...", help="true classes of the inputs")] = None,
    offset: Annotated[int, typer.Option(min=0, metavar="N")] = 0,
    limit: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="samples (data set default 500)")] = None,
    seed: Annotated[int | None, typer.Option(min=0, metavar="N")] = None,
    surrogate: Annotated[str | None, typer.Option(metavar="NAME", help="transfer: craft on this model")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, metavar="N", help="images per chunk "
                                                   "(default: tuned per model)")] = None,
    out: Annotated[Path | None, typer.Option(metavar="DIR", help="download the artifacts here")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="write the job JSON")] = None,
    wait: WaitOption = True, timeout: TimeoutOption = 3600, keep_running: KeepOption = False,
    poll: PollOption = 1.0, progress_interval: IntervalOption = 10,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job id")] = False,
) -> None:
    """Attack a model: adversarial examples and robustness scores (exit 2 unless it succeeded)."""
    def body() -> None:
        spec: dict[str, Any] = {"name": name}
        if eps is not None:
            spec["eps"] = parse_eps(eps)
        for key, value in (("norm", norm), ("steps", steps)):
            if value is not None:
                spec[key] = value
        spec.update(_param(text) for text in param or [])
        inputs = _inputs(data, image or [], labels, offset, limit)
        with _options(ctx).client() as client:
            job = client.attack(model, spec, inputs=inputs, seed=seed, surrogate=surrogate,
                                batch_size=batch_size)
            if quiet:
                typer.echo(job.id)
            else:
                console.print(f"attack job {job.id} {job.status}")
            if not wait:
                return
            job = follow(client, job, timeout=timeout, poll=poll, interval=progress_interval,
                         keep_running=keep_running)
            _write(json_out, job.model_dump_json(indent=2).encode())
            _check_ended(job)
            if not quiet:
                _print_scores(job)
            if out is not None:
                for path in client.jobs.download(job.id, out):
                    console.print(f"wrote {escape(str(path))}")
    _run(body)


# --- jobs ----------------------------------------------------------------------------------------


class Kind(StrEnum):
    attack = "attack"
    audit = "audit"
    defense = "defense"
    generator = "generator"
    registration = "registration"


class Status(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    kind: Annotated[Kind | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option(metavar="NAME")] = None,
    status: Annotated[Status | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, metavar="N", help="jobs per page")] = 20,
    all_pages: Annotated[bool, typer.Option("--all", help="every page, not only the newest")] = False,
    as_json: JsonFlag = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job ids")] = False,
) -> None:
    """Your jobs, newest first (from the service's history)."""
    def body() -> None:
        filters: dict[str, Any] = {"kind": kind.value if kind else None, "model": model,
                                   "status": status.value if status else None, "limit": limit}
        with _options(ctx).client() as client:
            jobs = list(client.jobs.iter(**filters)) if all_pages else client.jobs.list(**filters).jobs
        if as_json:
            _echo_json([job.model_dump(mode="json") for job in jobs])
            return
        if quiet:
            for job in jobs:
                typer.echo(job.id)
            return
        table = Table("id", "kind", "model", "status", "progress", "created")
        for job in jobs:
            table.add_row(job.id, job.kind, escape(str(job.model or "-")), str(job.status),
                          f"{job.progress:.0%}", _fmt(job.created_at))
        console.print(table)
    _run(body)


JobArgument = Annotated[str, typer.Argument(metavar="JOB", help="a job id")]


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: JobArgument) -> None:
    """A job as JSON: status, progress, result (scores, artifacts) or error."""
    def body() -> None:
        with _options(ctx).client() as client:
            typer.echo(client.jobs.get(job_id).model_dump_json(indent=2))
    _run(body)


@jobs_app.command("wait")
def jobs_wait(ctx: typer.Context, job_id: JobArgument, timeout: TimeoutOption = 3600,
              keep_running: KeepOption = False, poll: PollOption = 1.0,
              progress_interval: IntervalOption = 10) -> None:
    """Follow a job until it ends (exit 2 unless it succeeded)."""
    def body() -> None:
        with _options(ctx).client() as client:
            job = follow(client, client.jobs.get(job_id), timeout=timeout, poll=poll,
                         interval=progress_interval, keep_running=keep_running)
        _check_ended(job)
        console.print(f"job {job.id} succeeded")
    _run(body)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: JobArgument) -> None:
    """Cancel a job: a queued one never runs, a running one stops after its current chunk."""
    def body() -> None:
        with _options(ctx).client() as client:
            job = client.jobs.cancel(job_id)
        if job.status == "canceled":
            console.print(f"job {job.id} canceled")
        else:
            console.print(f"job {job.id} {job.status}: canceled, it stops at its next chunk")
    _run(body)


@jobs_app.command("download")
def jobs_download(
    ctx: typer.Context, job_id: JobArgument,
    names: Annotated[list[str] | None, typer.Argument(
        metavar="[NAME]...", help="artifacts (default: all)")] = None,
    out: Annotated[Path, typer.Option(metavar="DIR", help="where to write them")] = Path("."),
) -> None:
    """Download a job's artifacts (adversarial.npy, grid.png, samples.csv, report.html, ...)."""
    def body() -> None:
        with _options(ctx).client() as client:
            paths = client.jobs.download(job_id, out, names or [])
        if not paths:
            raise Failed(f"job {job_id} has no artifacts (yet)")
        for path in paths:
            console.print(f"wrote {escape(str(path))}")
    _run(body)


# --- audit and report ----------------------------------------------------------------------------------


class Suite(StrEnum):
    quick = "quick"
    standard = "standard"
    minimal = "minimal"


def _print_audit(result: Mapping[str, Any], report_url: str) -> None:
    table = Table("metric", "value", "95% interval",
                  title=f"audit of {result.get('model', '?')} (suite {result.get('suite', '?')}, "
                        f"n={result.get('n', '?')})")
    bands = result.get("intervals") or {}
    table.add_row("clean accuracy", _fmt(result.get("clean_accuracy")), _interval(bands.get("clean_accuracy")))
    for key, value in (result.get("robust_accuracy") or {}).items():
        table.add_row(escape(f"robust accuracy @ {key}"), _fmt(value),
                      _interval((bands.get("robust_accuracy") or {}).get(key)))
    masking = result.get("masking_checks") or {}
    table.add_row("masking checks", escape(str(masking.get("status", "-"))), "")
    console.print(table)
    gate = result.get("gate") or {}
    baseline = result.get("baseline") or {}
    if baseline:
        console.print(f"baseline: audit {escape(str(baseline.get('audit')))} of "
                      f"{escape(str(baseline.get('model')))}", soft_wrap=True)
    for line in gate.get("lines") or []:
        verdict = "[green]PASS[/green]" if line.get("passed") else "[red]FAIL[/red]"
        compared = ""
        if line.get("baseline_value") is not None:  # a regression line: both values and the difference
            noise = ", larger than the noise" if line.get("significant") else ""
            compared = (f", baseline {_fmt(line.get('baseline_value'))}, difference "
                        f"{_fmt(line.get('difference'))}{noise}")
        console.print(f"{verdict} {escape(str(line.get('expression')))} "
                      f"(measured {_fmt(line.get('value'))}{compared})")
    if gate:
        console.print(f"gate verdict: {escape(str(gate.get('verdict')).upper())}")
    console.print(f"report: {escape(report_url)}", soft_wrap=True)


@app.command()
def audit(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(metavar="NAME[@VERSION]", help="the model to audit")],
    data: Annotated[str, typer.Option(
        metavar="DATASET|FILE", help="a data set such as fashion-mnist:test, or a .npy/.npz file")],
    offset: Annotated[int, typer.Option(min=0, metavar="N")] = 0,
    limit: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="samples (data set default 500)")] = None,
    suite: Annotated[Suite | None, typer.Option(help="attack battery (default: standard)")] = None,
    attacks_file: Annotated[Path | None, typer.Option(
        metavar="FILE", help="JSON list of attack specs, instead of --suite")] = None,
    eps: Annotated[list[str] | None, typer.Option(
        metavar="NORM=EPS,...", help="eps grid of a norm, e.g. linf=1/255,8/255 (repeatable)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, metavar="N", help="PGD/APGD iterations")] = None,
    gate: Annotated[list[str] | None, typer.Option(
        metavar="EXPR", help="threshold, e.g. 'robust_accuracy@linf:8/255 >= 0.4' (repeatable)")] = None,
    surrogate: Annotated[list[str] | None, typer.Option(metavar="NAME", help="transfer (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(min=0, metavar="N")] = None,
    baseline: Annotated[str | None, typer.Option(
        metavar="AUDIT-ID|NAME@VERSION", help="what 'baseline' in a --gate line compares with: an earlier "
        "audit of your team, or a model version whose latest audit on the same data, suite and grid")] = None,
    junit: Annotated[Path | None, typer.Option(metavar="FILE", help="write JUnit XML here")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="write the job JSON")] = None,
    timeout: TimeoutOption = 3600, keep_running: KeepOption = False, poll: PollOption = 2.0,
    progress_interval: IntervalOption = 10,
) -> None:
    """Audit a model's robustness and gate on thresholds (for CI).

    Exit code 0: the gate passed (or none was given); 1: it failed; 2: an error (then --junit
    holds an error case)."""
    suite_name = f"adversa audit {model}"

    def body() -> int:
        try:
            if attacks_file is not None and suite is not None:
                raise Failed("expected --suite or --attacks-file, got both")
            attacks = None
            if attacks_file is not None:
                try:
                    loaded = json.loads(attacks_file.read_text())
                except (OSError, ValueError) as exc:
                    raise Failed(f"expected a readable JSON file at --attacks-file: {exc}") from None
                attacks = loaded.get("attacks") if isinstance(loaded, dict) else loaded
                if not isinstance(attacks, list) or not all(isinstance(a, dict) for a in attacks):
                    raise Failed("expected --attacks-file to hold a list of attack objects")
            options: dict[str, Any] = {} if steps is None else {"steps": steps}
            if baseline is not None:
                options["baseline"] = baseline
            inputs = _inputs(data, [], None, offset, limit)
            with _options(ctx).client() as client:
                job = client.audit(model, inputs, suite=None if attacks else (suite or Suite.standard).value,
                                   attacks=attacks, eps=_eps_grid(eps) if eps else None,
                                   thresholds=gate or [], surrogates=surrogate or [], seed=seed, **options)
                console.print(f"audit job {job.id} {job.status}")
                job = follow(client, job, timeout=timeout, poll=poll, interval=progress_interval,
                             keep_running=keep_running)
                _write(json_out, job.model_dump_json(indent=2).encode())
                _check_ended(job)
                url = client.url
        except (Failed, AdversaError) as exc:
            _write(junit, junit_error(str(exc), suite_name, model=model))
            raise
        result = job.result or {}
        report_url = f"{url}/v1/jobs/{job.id}/artifacts/report.html"
        _print_audit(result, report_url)
        _write(junit, junit_xml(result, suite_name, extra_properties={"job": job.id, "report": report_url}))
        verdict = (result.get("gate") or {}).get("verdict")
        return 1 if verdict is not None and verdict != "pass" else 0
    _run(body)


@app.command()
def report(
    ctx: typer.Context, job_id: JobArgument,
    save: Annotated[Path | None, typer.Option(metavar="FILE", help="write report.html here")] = None,
    open_it: Annotated[bool, typer.Option("--open", help="open it in a browser")] = False,
) -> None:
    """An audit's self-contained report.html: --save it, --open it, or both."""
    def body() -> None:
        if save is None and not open_it:
            raise Failed("expected --save FILE, --open, or both")
        with _options(ctx).client() as client:
            page = client.jobs.artifact(job_id, "report.html")
        target = save
        if target is None:
            import tempfile

            target = Path(tempfile.mkdtemp(prefix="adversa-")) / f"report-{job_id}.html"
        _write(target, page)
        console.print(f"wrote {escape(str(target))}")
        if open_it and not webbrowser.open(target.resolve().as_uri()):
            raise Failed(f"no browser to open {target}")
    _run(body)


def main() -> None:
    app(prog_name="adversa-client")


if __name__ == "__main__":
    main()
