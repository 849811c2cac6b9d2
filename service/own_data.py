"""A model's own data: the default training and test data of defenses and generators.

A request that names no data set uses the splits of the set its model was trained on (the card's
``lineage.data``): ``fashion-mnist:train|test`` for the hosted Fashion-MNIST models,
``skimage-patches:train|test`` for ``skimage-cnn``, a team set's ``train``/``test`` splits for a
model trained on it. An uploaded model names no training data, so its requests must name theirs;
the 422 says so instead of silently training an RGB model on grey Fashion-MNIST.
"""

from __future__ import annotations

from contracts.specs import DatasetInputs
from models.datasets import DataCatalog, DataError, DataRef, parse_data_ref
from models.manifest import ModelCard
from service.errors import invalid


def own_split(catalog: DataCatalog, card: ModelCard, split: str, team: str) -> str | None:
    """The ``split`` of the data set ``card`` was trained on, pinned (``my-set@2:test``), or None
    when the card names none or that set has no such split visible to ``team``."""
    try:
        trained_on = parse_data_ref(card.lineage.data)
    except DataError:
        return None
    candidate = str(DataRef(trained_on.name, trained_on.version, split))
    try:
        return catalog.describe(candidate, team).ref
    except DataError:
        return None


def default_data(catalog: DataCatalog, card: ModelCard, split: str, team: str, field: str) -> str:
    """``own_split`` or a 422 on ``field`` that says which data the request must name."""
    ref = own_split(catalog, card, split, team)
    if ref is None:
        trained = card.lineage.data
        why = (f"{card.ref} names no data set it was trained on" if trained in ("", "-")
               else f"{card.ref} was trained on {trained}, which has no {split} split you can read")
        raise invalid(field, f"expected a data set ({why}): name one, hosted (e.g. "
                             f"skimage-patches:{split}) or yours from POST /v1/datasets "
                             f"(name[@version]:split)")
    return ref


def default_slices(catalog: DataCatalog, card: ModelCard, team: str, field: str
                   ) -> dict[str, DatasetInputs]:
    """Feature squeezing's three default slices of the model's own test split: attack inputs from
    the first half (at most 500), calibration on the third quarter, the false-positive rate on the
    fourth (Fashion-MNIST's 10000 test images: 0-500, 5000-7500, 7500-10000)."""
    ref = default_data(catalog, card, "test", team, field)
    size = catalog.describe(ref, team).size
    half, quarter = size // 2, size // 4
    if quarter < 1:
        raise invalid(field, f"expected a test split of at least 4 samples, got {size} in {ref}")
    return {
        "attack_inputs": DatasetInputs(dataset=ref, offset=0, limit=min(500, half)),
        "calibration": DatasetInputs(dataset=ref, offset=half, limit=quarter),
        "held_out": DatasetInputs(dataset=ref, offset=half + quarter, limit=size - half - quarter),
    }
