"""Settings shared by the gateway and the workers (torch-free), read from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
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

    @property
    def blob_root(self) -> Path:
        return self.var_dir / "blobs"

    @property
    def models_root(self) -> Path:
        return self.var_dir / "models"

    @property
    def generators_root(self) -> Path:
        return self.var_dir / "generators"

    def queue_name(self, name: str) -> str:
        return f"{self.queue_prefix}{name}"


class WorkerSettings(CommonSettings):
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    model_cache_size: int = Field(default=4, ge=1)
    queues: list[str] = ["predict", "attacks", "defenses", "audits"]
