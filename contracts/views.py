"""What the service answers about jobs and models, as the client reads it (``GET /v1/jobs``,
``GET /v1/models``). ``JobView`` itself lives in ``contracts.specs`` beside the job payloads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.specs import JobView

TERMINAL_STATES = frozenset({"succeeded", "failed", "canceled"})


class JobPage(BaseModel):
    """One page of ``GET /v1/jobs``, newest first; ``next_cursor`` asks for the next (None: last)."""

    jobs: list[JobView]
    next_cursor: str | None = None


class ModelSummary(BaseModel):
    """One entry of ``GET /v1/models``: the latest version of a model the team may use."""

    model_config = ConfigDict(extra="allow")  # a newer server may add fields

    name: str
    version: int
    versions: list[int] = Field(default_factory=list)
    architecture: str | None = None
    input_shape: list[int]
    classes: list[str]
    metrics: dict[str, Any] = Field(default_factory=dict)
    hosted: bool = False
    differentiable: bool = True
