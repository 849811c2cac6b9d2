"""schemathesis against the gateway in-process (ASGI), on a real Redis and no worker: every operation
of the OpenAPI document, every check (no 500, documented statuses, content types and headers,
response schemas, positive and negative data, 405 with ``Allow``...), a fixed seed and a bounded
number of examples, so that the run is the same every time and stays short."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from redis import Redis
from schemathesis.config import SchemathesisConfig

from service.app import create_app
from service.settings import Settings

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261204,
    "generation": {"max-examples": 3, "deterministic": True, "mode": "all", "database": "none"},
    "checks": {
        # No worker runs here: readiness and predictions answer their documented 503 and 504.
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
        # A schema cannot say what depends on the model or the data named (eps within the model's
        # bounds, one target per input, a slice inside the set): such a valid-looking request gets a
        # 422 that says what was expected.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422",
                                                           "429", "5xx"]},
    },
})


def _document() -> dict[str, Any]:
    """The OpenAPI document (it does not depend on where Redis or the state directory are)."""
    with tempfile.TemporaryDirectory() as var_dir:
        return create_app(Settings(var_dir=Path(var_dir))).openapi()


schema = schemathesis.openapi.from_dict(_document(), config=CONFIG)


@pytest.fixture
def app(settings: Settings, redis: Redis) -> FastAPI:
    return create_app(settings)


@schema.parametrize()
# the app is the same across examples on purpose: state (queued jobs) builds up as it would
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_operation_passes_every_check(case: schemathesis.Case, app: FastAPI) -> None:
    case.call_and_validate(app=app)
