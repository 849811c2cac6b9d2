"""The workers' settings; those the gateway shares are ``contracts.settings.CommonSettings``
(re-exported here)."""

from __future__ import annotations

from pydantic import Field

from contracts.settings import CommonSettings

__all__ = ["CommonSettings", "WorkerSettings"]


class WorkerSettings(CommonSettings):
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    model_cache_size: int = Field(default=4, ge=1)
    queues: list[str] = ["predict", "attacks", "defenses", "audits"]
    torch_threads: int | None = Field(default=None, ge=1, le=1024, description="torch intra-op threads "
                                      "of a worker (torch.set_num_threads); unset: torch's default, one "
                                      "per core. Several workers on one machine: cores / workers each")
    preload: str = Field(default="hosted", pattern=r"^[A-Za-z0-9@:._,-]*$", description="models a worker "
                         "loads and calibrates before it takes jobs: `hosted` (the hosted models, at "
                         "most model_cache_size), `none`, or references separated by commas")

    @property
    def preload_refs(self) -> list[str] | None:
        """The models to preload; None: the hosted ones."""
        if self.preload == "hosted":
            return None
        if self.preload in ("", "none"):
            return []
        return [ref for ref in self.preload.split(",") if ref]
