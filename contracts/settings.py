"""Settings shared by the gateway and the workers (torch-free), read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Where Redis, the blob store, the registry and the data live. Environment prefix ``ADVERSA_``;
    ``REDIS_URL`` is read as is."""

    model_config = SettingsConfigDict(env_prefix="ADVERSA_", extra="ignore")

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "ADVERSA_REDIS_URL")
    )
    var_dir: Path = Path("var")
    data_dir: str | None = None
    job_timeout_s: int = Field(default=3600, ge=10)
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    queue_prefix: str = Field(default="", pattern=r"^[a-z0-9-]*$")
    max_model_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024,
                                 description="largest uploaded model file (ViT-B/16 weights: 330 MB)")
    max_parameters: int = Field(default=400_000_000, ge=1, description="parameters of an uploaded model")
    max_input_values: int = Field(default=3 * 1024 * 1024, ge=1,
                                  description="C x H x W of an uploaded model's input")
    max_models_per_team: int = Field(default=50, ge=0, description="model versions a team may hold")
    max_model_bytes_per_team: int = Field(default=8 * 1024**3, ge=0,
                                          description="bytes of model files a team may hold")
    registration_timeout_s: int = Field(default=1800, ge=60)
    job_retries: int = Field(default=2, ge=0, description="times a job whose worker died (killed, machine "
                             "gone) is run again before it fails with `worker-lost`")
    heartbeat_ttl_s: int = Field(default=15, ge=4, description="a worker whose last heartbeat is older is "
                                 "dead: its job is run again, its name is free, /readyz stops counting it")
    drain_timeout_s: int = Field(default=300, ge=1, description="how long `serve` waits on SIGTERM for its "
                                 "workers to finish or requeue their job before killing them")
    history_url: str | None = Field(default=None, description="the history database (SQLAlchemy URL, "
                                    "sqlite:/// or postgresql://); default: SQLite in the var dir")
    blob_store: Literal["file", "s3"] = Field(default="file", description="where inputs, artifacts and "
                                              "uploads live: `file` (<var>/blobs, one machine) or `s3` "
                                              "(a bucket every gateway and worker shares)")
    s3_endpoint_url: str | None = Field(default=None, description="an S3-compatible server (MinIO); "
                                        "unset: AWS. Credentials: boto3's AWS_* environment")
    s3_bucket: str | None = Field(default=None, min_length=3, max_length=63)
    s3_prefix: str = Field(default="", pattern=r"^([A-Za-z0-9_.-]+/?)*$", description="key prefix in "
                           "the bucket, so that several deployments can share one")
    sweep_interval_s: int = Field(default=900, ge=0, description="how often a worker removes orphan "
                                  "blobs (inputs and uploads no job references) and purges jobs past "
                                  "retention_days; 0: never")
    sweep_grace_s: int = Field(default=3600, ge=0, description="an orphan blob younger than this is "
                               "kept (its job may be being enqueued right now)")
    retention_days: float = Field(default=0, ge=0, description="the sweep purges finished jobs (history "
                                  "rows, artifacts, inputs, Redis keys) that ended longer ago; 0: keep "
                                  "them forever")

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Self:
        if self.blob_store == "s3" and not self.s3_bucket:
            raise ValueError("ADVERSA_BLOB_STORE=s3: expected ADVERSA_S3_BUCKET, got none")
        return self

    @property
    def history_database_url(self) -> str:
        return self.history_url or f"sqlite:///{(self.var_dir / 'history.db').resolve()}"

    @property
    def blob_root(self) -> Path:
        return self.var_dir / "blobs"

    @property
    def models_root(self) -> Path:
        return self.var_dir / "models"

    @property
    def generators_root(self) -> Path:
        return self.var_dir / "generators"

    @property
    def datasets_root(self) -> Path:
        return self.var_dir / "datasets"

    def queue_name(self, name: str) -> str:
        return f"{self.queue_prefix}{name}"
