"""Warm models: an LRU of loaded ``Classifier`` handles per device, and tuned chunk sizes; and
an LRU of trained AdvGAN generators, for the ``advgan`` attack.

Loading weights per job wastes seconds and a fork per job breaks CUDA, so workers keep models in
memory. Chunk size changes speed as much as code does (on 2 CPU cores the small CNN runs
forward+backward at about twice the rate at batch 128 as at 512), so the best size is measured
once per model and device and remembered in ``<var>/batch_sizes.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.manifest import CardIndex, GeneratorCard, GeneratorIndex, ModelCard, parse_ref
from models.registry import ModelLoadError, load_module
from workers.classifier import Classifier
from workers.defenses.compose import build_composite
from workers.generators.registry import load_generator

log = logging.getLogger(__name__)
CANDIDATE_BATCHES = (32, 64, 128, 256, 512)


def card_key(card: ModelCard) -> str:
    """What identifies a model's computation: its weights, or its composition."""
    if card.sha256 is not None and not card.files:
        return card.sha256[:16]
    if card.sha256 is not None:
        files = "".join(f"{name}={digest}" for name, digest in sorted(card.files.items()))
        return card.sha256[:8] + hashlib.sha256(files.encode()).hexdigest()[:8]
    return "c-" + hashlib.sha256(card.model_dump_json(include={"composition"}).encode()).hexdigest()[:16]


class UnknownModelError(LookupError):
    """No model of that name or version in the registry."""


class UnknownGeneratorError(LookupError):
    """No generator of that name or version in the generator registry (never trained, or deleted)."""


class ModelCache:
    """Loads models from the registry on first use and keeps the ``capacity`` most recent."""

    def __init__(self, index: CardIndex, device: torch.device, capacity: int = 4,
                 tuning_file: Path | None = None) -> None:
        self.index = index
        self.device = device
        self.capacity = capacity
        self.tuning_file = tuning_file
        self._models: OrderedDict[str, tuple[ModelCard, Classifier]] = OrderedDict()
        self.calibrations = 0  # batch-size calibrations this cache ran (the others were remembered)
        self._lock = threading.RLock()  # compositions load their parts through get()

    def resolve(self, ref: str) -> ModelCard:
        card = self.index.card(ref)
        if card is None:
            raise UnknownModelError(f"expected a registered model, got {ref!r}")
        return card

    def get(self, ref: str) -> tuple[ModelCard, Classifier]:
        card = self.resolve(ref)
        with self._lock:
            if card.ref in self._models:
                self._models.move_to_end(card.ref)
                return self._models[card.ref]
            if card.composition is not None:
                parts = [self.get(part)[1].module for part in card.composition.parts]
                module = build_composite(card, parts)
            else:
                name, version = parse_ref(card.ref)
                directory = self.index.directory(name, version)
                assert directory is not None
                card, module = load_module(directory, self.device)
            handle = Classifier(module, card.num_classes, card.input_shape, card.bounds, card.ref,
                                differentiable=card.differentiable)
            self._models[card.ref] = (card, handle)
            while len(self._models) > self.capacity:
                evicted, _ = self._models.popitem(last=False)
                log.info("evicted %s from the model cache", evicted)
            return card, handle

    def tuning_key(self, card: ModelCard) -> str:
        """Where a calibration is remembered: the model's weights (or composition) and the device."""
        return f"{card_key(card)}:{self.device}"

    def known_batch_size(self, card: ModelCard) -> int | None:
        """The chunk size chosen at registration (uploaded models) or by an earlier calibration on
        this device (``<var>/batch_sizes.json``, shared by the workers of one var dir); None: not
        measured yet."""
        if self.device.type in card.batch_size:
            return card.batch_size[self.device.type]
        known = self._read_tuning().get(self.tuning_key(card))
        return int(known) if known is not None else None

    def batch_size(self, card: ModelCard, model: Classifier,
                   on_candidate: Callable[[int, int], None] | None = None) -> int:
        """The measured best chunk size for forward+backward of this model on this device: chosen
        at registration for uploaded models, else measured on first use and remembered.

        ``on_candidate(i, size)`` runs before the ``i``-th candidate size is timed (a job shows it as
        its ``calibrating`` stage). Sizes are tried from small to large and the search stops once a
        size runs at under 80% of the best rate: on CPUs throughput falls past a knee (the small CNN
        at batch 512 runs at half its rate at 128), so the large sizes would cost the most for nothing.
        """
        known = self.known_batch_size(card)
        if known is not None:
            return known
        best, best_rate = CANDIDATE_BATCHES[0], 0.0
        for i, size in enumerate(CANDIDATE_BATCHES):
            if on_candidate is not None:
                on_candidate(i, size)
            rate = self._rate(card, model, size)
            if rate > best_rate * 1.05:
                best, best_rate = size, rate
            elif rate < best_rate * 0.8:
                break
        model.reset_counters()
        self.calibrations += 1
        log.info("%s on %s: chunk size %d (%.0f images/s forward+backward)", card.ref,
                 self.device, best, best_rate)
        known_sizes = self._read_tuning()
        known_sizes[self.tuning_key(card)] = best
        self._write_tuning(known_sizes)
        return best

    def _rate(self, card: ModelCard, model: Classifier, size: int) -> float:
        """Images per second of forward+backward at chunk ``size``: one warm-up pass, then up to three
        timed ones (one when a pass takes more than a third of a second: slow models calibrate in
        seconds, not minutes)."""
        x = torch.rand(size, *card.input_shape, device=self.device)
        y = torch.zeros(size, dtype=torch.int64, device=self.device)

        def loss(logits: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def timed(passes: int) -> float:
            start = time.perf_counter()
            for _ in range(passes):
                model.value_and_grad(x, loss)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - start

        warm_up = timed(1)
        passes = 3 if warm_up < 1 / 3 else 1
        return passes * size / timed(passes)

    def _read_tuning(self) -> dict[str, int]:
        if self.tuning_file is None or not self.tuning_file.is_file():
            return {}
        try:
            return dict(json.loads(self.tuning_file.read_text()))
        except (OSError, ValueError):
            return {}

    def _write_tuning(self, known: dict[str, int]) -> None:
        if self.tuning_file is None:
            return
        self.tuning_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tuning_file.with_suffix(f".{os.getpid()}.tmp")  # workers may share the var dir
        tmp.write_text(json.dumps(known, indent=2, sort_keys=True))
        tmp.replace(self.tuning_file)


class GeneratorCache:
    """Loads trained generators on first use and keeps the ``capacity`` most recent, on ``device``.

    Entries are keyed by reference and weights digest, and every ``get`` looks the card up again:
    a deleted generator is refused even while its weights are still in memory.
    """

    def __init__(self, index: GeneratorIndex, device: torch.device, capacity: int = 4) -> None:
        self.index = index
        self.device = device
        self.capacity = capacity
        self._generators: OrderedDict[tuple[str, str], tuple[GeneratorCard, nn.Module]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> GeneratorCard:
        card = self.index.card(ref)
        if card is None:
            raise UnknownGeneratorError(f"expected a trained generator, got {ref!r}")
        return card

    def get(self, ref: str) -> tuple[GeneratorCard, nn.Module]:
        card = self.resolve(ref)
        key = (card.ref, card.generator_sha256)
        with self._lock:
            if key in self._generators:
                self._generators.move_to_end(key)
                return self._generators[key]
            name, version = parse_ref(card.ref)
            directory = self.index.directory(name, version)
            if directory is None:
                raise UnknownGeneratorError(f"expected a trained generator, got {ref!r} (deleted)")
            try:
                loaded = load_generator(directory, self.device)
            except (OSError, ModelLoadError) as exc:
                if self.index.card(card.ref) is None:  # deleted while loading
                    raise UnknownGeneratorError(f"expected a trained generator, got {ref!r} "
                                                "(deleted)") from exc
                raise
            self._generators[key] = loaded
            while len(self._generators) > self.capacity:
                evicted, _ = self._generators.popitem(last=False)
                log.info("evicted generator %s from the cache", evicted[0])
            return loaded
