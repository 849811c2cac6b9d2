"""The model registry, read-only here: listing and model cards."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import RegistryDep, TeamDep, visible_card

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(index: RegistryDep, team: TeamDep) -> dict[str, list[dict[str, Any]]]:
    """Models this team may use: hosted ones and its own, latest version of each."""
    items = []
    for name in index.names():
        card = index.card(name)
        if card is None or (card.team is not None and card.team != team):
            continue
        items.append({
            "name": card.name,
            "version": card.version,
            "versions": index.versions(name),
            "architecture": card.architecture,
            "input_shape": list(card.input_shape),
            "classes": list(card.classes),
            "metrics": card.metrics,
            "hosted": card.team is None,
        })
    return {"models": items}


@router.get("/{ref}")
def get_model(ref: str, index: RegistryDep, team: TeamDep) -> dict[str, Any]:
    """The model card (manifest) of ``name`` (latest) or ``name@version``."""
    card = visible_card(index, ref, team)
    return {**card.model_dump(mode="json"), "versions": index.versions(card.name)}
