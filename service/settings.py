"""Gateway settings (environment prefix ``ADVERSA_``), built once in the entry point."""

from __future__ import annotations

from limits import parse_many
from pydantic import Field, field_validator

from contracts.settings import CommonSettings


class Settings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="bearer key -> team (JSON); empty means no auth and every caller is 'public'",
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_inputs: int = Field(default=10_000, ge=1, description="images per job")
    max_infer_inputs: int = Field(default=1024, ge=1)
    max_steps: int = Field(default=1000, ge=1, description="steps, iterations and restarts x steps")
    max_queries: int = Field(default=20_000, ge=1, description="model queries per image (black box)")
    max_epochs: int = Field(default=50, ge=1, description="epochs of a training defense")
    defense_timeout_s: int = Field(default=8 * 3600, ge=60, description="training jobs run long")
    predict_timeout_s: int = Field(default=30, ge=1)
    workers: int = Field(default=1, ge=0, description="worker processes started by `adversa serve`")
    max_dataset_bytes: int = Field(default=256 * 1024 * 1024, ge=1024,
                                   description="an uploaded data set: its decoded arrays, and all an archive "
                                               "expands to")
    max_dataset_files: int = Field(default=50_000, ge=1, description="members of an uploaded archive")
    max_dataset_samples: int = Field(default=100_000, ge=1, description="samples of an uploaded data set")
    max_dataset_image_pixels: int = Field(default=1024 * 1024, ge=1, description="H x W of one sample")
    max_dataset_ratio: float = Field(default=200.0, ge=1, description="expanded / compressed size of an "
                                                                        "archive member (zip bombs)")
    max_datasets_per_team: int = Field(default=100, ge=0, description="data-set versions a team may hold")
    # The web pages (service/ui): browser sessions and signed report links.
    ui_secret: str | None = Field(default=None, min_length=32, description="key that signs /ui session "
                                  "cookies and report links; unset: generated once into the var dir")
    ui_session_ttl_s: int = Field(default=12 * 3600, ge=60, description="a /ui login lasts this long")
    report_link_ttl_s: int = Field(default=24 * 3600, ge=60, le=30 * 24 * 3600,
                                   description="a signed report link opens its report for this long")
    # Limits per team (service/limits.py): over one, 429 with Retry-After.
    rate_limit: str = Field(default="", description="requests per team on the /v1 and /v2 routes, in "
                            "the `limits` notation ('600/minute', '10/second;600/minute'); empty: no limit")
    max_active_jobs_per_team: int = Field(default=64, ge=1, description="a team's jobs queued or running "
                                          "(an audit is one job; predictions are not counted)")
    max_queued_jobs_per_team: int = Field(default=1000, ge=1, description="a team's entries waiting on the "
                                          "queues (each audit chunk and prediction is one); a submission is "
                                          "refused while this many wait")

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        if value.strip():
            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(f"expected a rate such as '600/minute' or '10/second;600/minute', "
                                 f"got {value!r}") from exc
        return value.strip()
