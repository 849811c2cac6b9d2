"""The Python SDK: ``Client(url, api_key)`` and its resources ``models``, ``datasets``, ``jobs``, plus
``attack``, ``audit`` and ``defend``, which start jobs.

Bodies are checked against the contract (``contracts.specs``) before they are sent, so a typo fails
here with pydantic's message instead of a round trip; answers are read back into the same models.

Retries: reads (GET) and cancels are retried on connection errors and 5xx. A POST that starts a job
carries an ``Idempotency-Key`` (one per call, kept across its retries) and is retried on connection
errors, 5xx and the service's 409 ``idempotency-in-progress``: the service answers a retry with the
job the first try queued, so a retry never runs a job twice. A data-set upload has no key on the
service, so it is retried only when the connection failed before anything was sent.
"""

from __future__ import annotations

import base64
import builtins
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from adversa_client._version import __version__
from contracts.specs import AttackRequest, AuditRequest, DefenseRequest, JobView
from contracts.views import TERMINAL_STATES, JobPage, ModelSummary

RETRIES = 3  # retries after the first try
RETRY_DELAY_S = 1.0  # doubled after each retry; a Retry-After header wins when it is shorter than 60 s
POLL_ERRORS = 10  # consecutive failed polls before ``wait`` gives up

ProgressCallback = Callable[[JobView], None]


class AdversaError(Exception):
    """Anything the client could not do; the message says what and why."""


class ApiError(AdversaError):
    """The service refused a request: ``status``, and the problem's ``detail``, ``code``, ``field``."""

    def __init__(self, status: int, detail: str, *, code: str | None = None, field: str | None = None,
                 body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.code = code
        self.field = field
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and (body.get("detail") or body.get("error")):
            detail = body.get("detail") or body.get("error")
            return cls(response.status_code, str(detail), code=body.get("code"), field=body.get("field"),
                       body=body)
        text = response.text[:500] or response.reason_phrase
        return cls(response.status_code, text, body=body)


class JobTimeout(AdversaError):
    """``Jobs.wait`` ran out of time; ``job`` is the last view seen (the job may still run)."""

    def __init__(self, message: str, job: JobView) -> None:
        super().__init__(message)
        self.job = job


def _retry_after(response: httpx.Response | None, default: float) -> float:
    if response is not None:
        try:
            seconds = float(response.headers.get("retry-after", ""))
        except ValueError:
            return default
        if 0 <= seconds < 60:
            return seconds
    return default


def _in_progress(response: httpx.Response) -> bool:
    """409 while the first try with the same Idempotency-Key is still being accepted."""
    if response.status_code != 409:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("code") == "idempotency-in-progress"


class Client:
    """A session with one Adversa service.

    >>> with Client("http://127.0.0.1:8000", api_key=None) as adversa:
    ...     job = adversa.attack("fmnist-cnn", {"name": "fgsm", "eps": 0.1},
    ...                          inputs={"dataset": "fashion-mnist:test", "limit": 100})
    ...     job = adversa.jobs.wait(job.id)
    ...     print(job.result["scores"]["robust_accuracy"])
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = RETRIES, retry_delay: float = RETRY_DELAY_S,
                 sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise AdversaError(f"expected the service URL as http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        headers = {"User-Agent": f"adversa-client/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=10.0))
        self.retries = retries
        self.retry_delay = retry_delay
        self._sleep = sleep
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, idempotent: bool = True, ok: Sequence[int] = (200,),
                **kwargs: Any) -> httpx.Response:
        """Send, retrying what is safe to retry; an ``ApiError`` for any status not in ``ok``.
        ``idempotent=False``: retried only when the connection failed before sending."""
        problem: Exception | None = None
        response: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                problem = exc
            except httpx.TransportError as exc:
                if not idempotent:
                    raise AdversaError(f"{method} {self.url}{path}: {exc!r} (not retried: the "
                                       "request may have arrived)") from exc
                problem = exc
            else:
                if response.status_code in ok:
                    return response
                retry = response.status_code >= 500 or _in_progress(response)
                if not (retry and idempotent):
                    raise ApiError.from_response(response)
                problem = ApiError.from_response(response)
            if attempt < self.retries:
                self._sleep(_retry_after(response, self.retry_delay * 2**attempt))
        if isinstance(problem, ApiError):
            raise problem
        raise AdversaError(f"cannot reach {self.url}: {problem!r} "
                           f"(gave up after {self.retries + 1} tries)") from problem

    def start(self, path: str, *, json: Any = None, data: Mapping[str, str] | None = None,
              files: Any = None, idempotency_key: str | None = None) -> JobView:
        """POST a job-creating request with an Idempotency-Key; the queued job."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        response = self.request("POST", path, ok=(200, 201, 202), json=json, data=data, files=files,
                                headers=headers)
        return _job(response)

    # --- jobs that do something ---------------------------------------------------------------

    def attack(self, model: str, attack: Mapping[str, Any], *, inputs: Mapping[str, Any] | None = None,
               images: Sequence[Path] = (), labels: Sequence[int] | None = None, seed: int | None = None,
               surrogate: str | None = None, batch_size: int | None = None,
               idempotency_key: str | None = None) -> JobView:
        """``POST /v1/attacks``: ``inputs`` (a data-set slice, ``{"array": ...}`` or
        ``{"images": [...]}``) inline, or ``images`` (PNG/JPEG paths) uploaded as multipart with
        optional ``labels``. The queued job; ``jobs.wait(job.id)`` follows it."""
        body: dict[str, Any] = {"model": model, "attack": dict(attack)}
        for key, value in (("inputs", inputs), ("seed", seed), ("surrogate", surrogate),
                           ("batch_size", batch_size)):
            if value is not None:
                body[key] = value
        if images and inputs is not None:
            raise AdversaError("expected inputs or images, got both")
        if not images and inputs is None:
            raise AdversaError("expected inputs (a data-set slice or an array) or image files")
        _check(AttackRequest, body)
        if not images:
            return self.start("/v1/attacks", json=body, idempotency_key=idempotency_key)
        import json

        files = [("files", (path.name, _read(path), "application/octet-stream")) for path in images]
        data = {"spec": json.dumps(body)}
        if labels is not None:
            data["labels"] = json.dumps([int(label) for label in labels])
        return self.start("/v1/attacks", data=data, files=files, idempotency_key=idempotency_key)

    def audit(self, model: str, inputs: Mapping[str, Any], *, suite: str | None = None,
              attacks: Sequence[Mapping[str, Any]] | None = None,
              eps: Mapping[str, Sequence[float]] | None = None, thresholds: Sequence[str] = (),
              surrogates: Sequence[str] = (), seed: int | None = None, idempotency_key: str | None = None,
              **options: Any) -> JobView:
        """``POST /v1/audits``: an attack battery over an eps grid, judged by ``thresholds`` (gate
        lines, e.g. ``"robust_accuracy@linf:8/255 >= 0.4"``). Other fields of ``AuditRequest``
        (``steps``, ``chunk_size``, ``norms``, ...) go in ``options``."""
        body: dict[str, Any] = {"model": model, "inputs": dict(inputs), "thresholds": list(thresholds),
                                "surrogates": list(surrogates), **options}
        for key, value in (("suite", suite), ("seed", seed), ("eps", eps)):
            if value is not None:
                body[key] = value
        if attacks is not None:
            body["attacks"] = [dict(spec) for spec in attacks]
        _check(AuditRequest, body)
        return self.start("/v1/audits", json=body, idempotency_key=idempotency_key)

    def defend(self, model: str | None, defense: Mapping[str, Any], *, output: str | None = None,
               seed: int | None = None, evaluation: Mapping[str, Any] | None = None,
               idempotency_key: str | None = None) -> JobView:
        """``POST /v1/defenses``: a job whose output is a new model version (or a detector)."""
        body: dict[str, Any] = {"model": model, "defense": dict(defense)}
        for key, value in (("output", output), ("seed", seed), ("evaluation", evaluation)):
            if value is not None:
                body[key] = value
        _check(DefenseRequest, body)
        return self.start("/v1/defenses", json=body, idempotency_key=idempotency_key)


class Models:
    """``/v1/models``: the registry as the team sees it."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> builtins.list[ModelSummary]:
        body = self._client.request("GET", "/v1/models").json()
        return _parse(builtins.list[ModelSummary], body.get("models") if isinstance(body, dict) else None)

    def get(self, ref: str) -> dict[str, Any]:
        """The model card of ``name`` (latest version) or ``name@version``."""
        return dict(self._client.request("GET", f"/v1/models/{_segment(ref)}").json())

    def push(self, card: Path | Mapping[str, Any], model: Path, *, idempotency_key: str | None = None
             ) -> JobView:
        """Register a version: ``model`` is an ``.onnx`` graph, or ``.safetensors`` weights of the
        card's catalog ``architecture``. The registration job (``jobs.wait`` it)."""
        import json

        card_text = _read(card).decode() if isinstance(card, Path) else json.dumps(dict(card))
        field = "weights" if model.suffix.lower() == ".safetensors" else "model"
        return self._client.start("/v1/models", data={"card": card_text},
                                  files={field: (model.name, _read(model), "application/octet-stream")},
                                  idempotency_key=idempotency_key)

    def delete(self, ref: str) -> None:
        self._client.request("DELETE", f"/v1/models/{_segment(ref)}", ok=(204,))


class Datasets:
    """``/v1/datasets``: the team's evaluation sets (and the hosted ones it may name)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> builtins.list[dict[str, Any]]:
        body = self._client.request("GET", "/v1/datasets").json()
        return list(body.get("datasets", [])) if isinstance(body, dict) else []

    def get(self, ref: str) -> dict[str, Any]:
        return dict(self._client.request("GET", f"/v1/datasets/{_segment(ref)}").json())

    def push(self, name: str, data: Path, *, classes: Sequence[str] | None = None, split: str = "all",
             description: str = "", layout: str | None = None) -> dict[str, Any]:
        """Upload ``data`` (``.npz`` with ``x``, ``y``; or a ``.zip``/``.tar[.gz]`` of class folders)
        as the next version of ``name``; its card (``references`` say what jobs name)."""
        import json

        spec: dict[str, Any] = {"name": name, "split": split, "description": description}
        if classes is not None:
            spec["classes"] = list(classes)
        if layout is not None:
            spec["layout"] = layout
        response = self._client.request(
            "POST", "/v1/datasets", idempotent=False, ok=(200, 201), data={"spec": json.dumps(spec)},
            files={"data": (data.name, _read(data), "application/octet-stream")})
        return dict(response.json())

    def delete(self, ref: str) -> None:
        self._client.request("DELETE", f"/v1/datasets/{_segment(ref)}", ok=(204,))


class Jobs:
    """``/v1/jobs``: the team's jobs, from the history database."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, *, kind: str | None = None, model: str | None = None, model_version: int | None = None,
             status: str | None = None, created_after: str | None = None, created_before: str | None = None,
             limit: int = 50, cursor: str | None = None) -> JobPage:
        """One page, newest first; ``page.next_cursor`` asks for the next one."""
        params = {key: value for key, value in (
            ("kind", kind), ("model", model), ("model_version", model_version), ("status", status),
            ("created_after", created_after), ("created_before", created_before), ("limit", limit),
            ("cursor", cursor)) if value is not None}
        return _parse(JobPage, self._client.request("GET", "/v1/jobs", params=params).json())

    def iter(self, **filters: Any) -> Iterator[JobView]:
        """Every job that matches, page after page."""
        cursor: str | None = None
        while True:
            page = self.list(**filters, cursor=cursor)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def get(self, job_id: str) -> JobView:
        return _job(self._client.request("GET", f"/v1/jobs/{_segment(job_id)}"))

    def cancel(self, job_id: str) -> JobView:
        """Cancel: a queued job never runs, a running one stops after its current chunk."""
        return _job(self._client.request("DELETE", f"/v1/jobs/{_segment(job_id)}", ok=(200, 202)))

    def wait(self, job_id: str, *, timeout: float = 3600, poll: float = 2.0,
             on_progress: ProgressCallback | None = None,
             clock: Callable[[], float] = time.monotonic) -> JobView:
        """Poll until the job ends (succeeded, failed or canceled) and return it; ``on_progress``
        sees every view polled. ``JobTimeout`` after ``timeout`` seconds (the job keeps running:
        ``cancel`` it if it should not)."""
        deadline = clock() + timeout
        job = self.get(job_id)
        errors = 0
        while True:
            if on_progress is not None:
                on_progress(job)
            if job.status in TERMINAL_STATES:
                return job
            remaining = deadline - clock()
            if remaining <= 0:
                raise JobTimeout(f"timed out after {timeout:g} s: job {job_id} is still {job.status}", job)
            self._client._sleep(min(poll, remaining))
            try:
                job, errors = self.get(job_id), 0
            except ApiError as exc:
                if exc.status < 500:
                    raise
                errors += 1
            except AdversaError:
                errors += 1
            if errors >= POLL_ERRORS:
                raise AdversaError(f"polling job {job_id} failed {errors} times in a row")

    def artifacts(self, job_id: str) -> builtins.list[str]:
        """Names of the job's artifacts (from its result; empty until it succeeded)."""
        result = self.get(job_id).result or {}
        names = result.get("artifacts") or []
        return [str(name) for name in names] if isinstance(names, list) else []

    def artifact(self, job_id: str, name: str) -> bytes:
        """One artifact's bytes (``adversarial.npy``, ``grid.png``, ``samples.csv``, ``report.html``...)."""
        response = self._client.request("GET", f"/v1/jobs/{_segment(job_id)}/artifacts/{_segment(name)}",
                                        headers={"Accept": "*/*"})
        return response.content

    def download(self, job_id: str, directory: Path, names: Sequence[str] = ()) -> builtins.list[Path]:
        """Write artifacts (``names``, default all of them) into ``directory``; the paths written."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in names or self.artifacts(job_id):
            path = directory / Path(name).name
            path.write_bytes(self.artifact(job_id, name))
            written.append(path)
        return written


def _segment(value: str) -> str:
    """A path segment, percent-encoded: an id or name never changes the path it is put in."""
    from urllib.parse import quote

    return quote(value, safe="@:")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdversaError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check(model: type[Any], body: Mapping[str, Any]) -> None:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}"
                             for error in exc.errors()[:5])
        raise AdversaError(f"invalid {model.__name__}: {problems}") from None


def _parse(kind: Any, body: Any) -> Any:
    try:
        return TypeAdapter(kind).validate_python(body)
    except ValidationError as exc:
        raise AdversaError(f"unexpected answer from the service: {exc.errors()[:3]}") from None


def _job(response: httpx.Response) -> JobView:
    try:
        return JobView.model_validate_json(response.content)
    except ValidationError as exc:
        raise AdversaError(f"expected a job, got HTTP {response.status_code}: {response.text[:300]}"
                           f" ({exc.error_count()} problems)") from None


def inline_images(paths: Sequence[Path], labels: Sequence[int] | None = None) -> dict[str, Any]:
    """``{"images": [base64 ...], "labels": [...]}``: PNG/JPEG files as inline inputs."""
    inputs: dict[str, Any] = {"images": [base64.b64encode(_read(p)).decode("ascii") for p in paths]}
    if labels is not None:
        inputs["labels"] = [int(label) for label in labels]
    return inputs
