"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from redis import Redis

from models.datasets import DataCatalog
from models.manifest import CardIndex, GeneratorCard, GeneratorIndex, ModelCard
from models.store import BlobStore
from service.errors import Problem
from service.queueing import Queues
from service.settings import Settings

PUBLIC_TEAM = "public"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


def get_queues(request: Request) -> Queues:
    return request.app.state.queues  # type: ignore[no-any-return]


def get_index(request: Request) -> CardIndex:
    return request.app.state.index  # type: ignore[no-any-return]


def get_generators(request: Request) -> GeneratorIndex:
    return request.app.state.generators  # type: ignore[no-any-return]


def get_store(request: Request) -> BlobStore:
    return request.app.state.store  # type: ignore[no-any-return]


def get_data_catalog(request: Request) -> DataCatalog:
    return request.app.state.data  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queues, Depends(get_queues)]
RegistryDep = Annotated[CardIndex, Depends(get_index)]
GeneratorsDep = Annotated[GeneratorIndex, Depends(get_generators)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
DataCatalogDep = Annotated[DataCatalog, Depends(get_data_catalog)]


def get_team(request: Request, settings: SettingsDep) -> str:
    """The caller's team from ``Authorization: Bearer <key>``; 'public' when auth is off. Counts
    the request against the team's rate limit (429 over it)."""
    team: str | None = PUBLIC_TEAM
    if settings.api_keys:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        team = settings.api_keys.get(key.strip()) if scheme.lower() == "bearer" else None
    if team is None:
        raise Problem(401, "expected header 'Authorization: Bearer <key>' with a known API key",
                      code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
    limits = get_queues(request).limits
    if limits is not None:
        limits.check_rate(team)
    return team


TeamDep = Annotated[str, Depends(get_team)]

# Ids the gateway makes (uuid4 hex, "<audit id>c<chunk>" for an audit's chunks): ASCII letters and
# digits. Anything else is refused before it reaches RQ, which raises on other characters.
JOB_ID_PATTERN = r"^[A-Za-z0-9]{1,64}$"
JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="a job id, as POST answered it")]


def visible_card(index: CardIndex, ref: str, team: str) -> ModelCard:
    """The card of ``ref`` if this team may use it (hosted models are visible to all), else 404."""
    card = index.card(ref)
    if card is None or (card.team is not None and card.team != team):
        raise Problem(404, f"model: expected a registered model name (GET /v1/models), got {ref!r}",
                      field="model", code="unknown-model")
    return card


def visible_generator(index: GeneratorIndex, ref: str, team: str, field: str = "generator") -> GeneratorCard:
    """The card of the generator ``ref`` if this team may use it, else 404 naming ``field``."""
    card = index.card(ref)
    if card is None or not card.visible_to(team):
        raise Problem(404, f"{field}: expected a trained generator (GET /v1/attacks/generators), "
                           f"got {ref!r}", field=field, code="unknown-generator")
    return card
