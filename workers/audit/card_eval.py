"""The robustness figures of a model card, from an evaluation that gradient masking cannot fool.

A card's ``robust_accuracy@linf:<eps>`` used to come from PGD-20 on the cross-entropy: on the
defensively distilled model, whose saturated softmax gives zero cross-entropy gradients, that
claimed 0.79 at Linf 0.1 where the reference AutoAttack measures 6.4%. The figures now come from
AutoAttack's cascade of its two gradient attacks (Croce & Hein, ICML 2020): APGD-CE, then APGD-T
(the targeted, scale-invariant DLR loss, one pass per target class) on the samples APGD-CE left
standing. The eps are taken in increasing order and each one attacks only the survivors of the
previous one (an example found inside a smaller ball is inside every larger one).

``python -m workers.audit.card_eval --out FILE`` re-measures the hosted models and writes the
figures to a JSON file; ``--write FILE`` puts them into the hosted cards, ``--in-place`` measures
and writes in one go (``make models`` ends with it). The weights stay as they are: the cards'
sha256 is checked when each model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.manifest import CARD_FILE, HOSTED_DIR, ModelCard, RobustnessEvaluation
from workers.attacks.apgd import DLR_MIN_CLASSES, APGDSpec, apgd, apgd_t
from workers.classifier import Classifier

log = logging.getLogger(__name__)

CASCADE = ("apgd-ce", "apgd-t")
ROBUST_PREFIX = "robust_accuracy@"
DEFAULT_EPS = (0.1,)


def cascade(model: Classifier) -> tuple[str, ...]:
    """The attacks the cascade runs on ``model``: APGD-T's DLR loss needs a third class to scale the
    margin by, so a two-class model gets APGD-CE alone (and its card says so)."""
    return CASCADE if model.num_classes >= DLR_MIN_CLASSES else CASCADE[:1]


def cascade_robust(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], *,
                   steps: int = 100, n_target_classes: int = 9, batch: int = 128,
                   seed: int = 0) -> dict[float, torch.Tensor]:
    """Per eps (Linf), a bool ``(N,)``: the sample is classified correctly and survived APGD-CE
    and then APGD-T. ``x`` ``(N, C, H, W)`` in the model's bounds, ``y`` ``(N,)`` labels. Each eps
    draws its random starts from a generator seeded with ``seed``, batch after batch."""
    robust = model.predict(x, batch).argmax(1).eq(y)
    out: dict[float, torch.Tensor] = {}
    kernels = {"apgd-ce": apgd, "apgd-t": apgd_t}
    for budget in sorted(eps):
        generator = torch.Generator(device=x.device).manual_seed(seed)
        for name in cascade(model):
            stage = kernels[name]
            spec = APGDSpec(eps=budget, norm="linf", steps=steps, n_target_classes=n_target_classes)
            alive = robust.nonzero().squeeze(1)
            for idx in alive.split(batch):
                result = stage(model, x[idx], y[idx], spec, generator=generator)
                # judged on the returned tensor, as every caller of a kernel does
                held = model.logits(result.x_adv).argmax(1).eq(y[idx])
                robust[idx] = held
            log.info("%s: %s at linf %g: %d of %d robust", model.name, name, budget, int(robust.sum()), len(y))
        out[budget] = robust.clone()
    return out


def evaluate_card(model: Classifier, x: torch.Tensor, y: torch.Tensor, data: str,
                  eps: Sequence[float] = DEFAULT_EPS, *, steps: int = 100, n_target_classes: int = 9,
                  batch: int = 128, seed: int = 0) -> tuple[dict[str, float], RobustnessEvaluation]:
    """The card's ``robust_accuracy@linf:<eps>`` figures over ``x`` (the first ``len(x)`` images
    of ``data``) and the evaluation that produced them."""
    started = time.perf_counter()
    robust = cascade_robust(model, x, y, eps, steps=steps, n_target_classes=n_target_classes,
                            batch=batch, seed=seed)
    n = int(y.shape[0])
    # labelled ``linf:0.1`` as cards always were (``f"{eps:g}"``), so existing readers find them
    counts = {f"linf:{e:g}": int(held.sum()) for e, held in robust.items()}
    evaluation = RobustnessEvaluation(
        attacks=cascade(model), norm="linf", eps=tuple(sorted(eps)), steps=steps, restarts=1,
        n_target_classes=min(n_target_classes, model.num_classes - 1), data=data, offset=0, images=n,
        seed=seed, robust=counts, torch=torch.__version__.split("+")[0],
        seconds=round(time.perf_counter() - started, 1))
    return {f"{ROBUST_PREFIX}{key}": round(k / n, 4) for key, k in counts.items()}, evaluation


def with_evaluation(card: ModelCard, metrics: dict[str, float], evaluation: RobustnessEvaluation) -> ModelCard:
    """``card`` with its robustness figures replaced by ``metrics`` (other metrics kept)."""
    kept = {k: v for k, v in card.metrics.items() if not k.startswith(ROBUST_PREFIX)}
    return card.model_copy(update={"metrics": {**kept, **metrics}, "robustness": evaluation})


def write_figures(path: Path, metrics: dict[str, float], evaluation: RobustnessEvaluation) -> ModelCard:
    """Put ``metrics`` and ``evaluation`` into the card at ``path``, changing nothing else: the
    committed card keeps its own keys and their order."""
    updated = with_evaluation(ModelCard.read(path), metrics, evaluation)
    raw = {k: v for k, v in json.loads(path.read_text()).items() if k != "robustness"}
    items = list(raw.items())
    at = list(raw).index("metrics") + 1
    items[at:at] = [("robustness", evaluation.model_dump(mode="json"))]
    raw = {**dict(items), "metrics": updated.metrics}
    assert ModelCard.model_validate(raw) == updated
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return updated


def _test_data(card: ModelCard, images: int) -> tuple[str, np.ndarray, np.ndarray]:
    from models.datasets import build_skimage_patches, load_split

    if card.lineage.data.startswith("skimage-patches"):
        raw, labels = build_skimage_patches("test")
        return "skimage-patches:test", raw[:images].astype(np.float32) / np.float32(255.0), labels[:images]
    x, y = load_split("fashion-mnist:test").slice(0, images)
    return "fashion-mnist:test", x, y


def main(argv: Sequence[str] | None = None) -> None:
    from models.registry import load_module

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HOSTED_DIR)
    parser.add_argument("--only", action="append", help="model names (default: every hosted model)")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--eps", type=float, action="append", help=f"Linf budgets (default {DEFAULT_EPS})")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON file of the figures, written after each model")
    parser.add_argument("--write", type=Path, help="put the figures of this JSON file into the cards")
    parser.add_argument("--in-place", action="store_true", help="write each model's figures into its card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.write:
        for name, entry in json.loads(args.write.read_text()).items():
            path = args.root / name / str(entry["version"]) / CARD_FILE
            evaluation = RobustnessEvaluation.model_validate(entry["robustness"])
            card = write_figures(path, entry["metrics"], evaluation)
            log.info("%s: wrote %s", card.ref, entry["metrics"])
        return
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    directories = sorted(p for p in args.root.glob("*/*") if (p / CARD_FILE).is_file())
    if args.only:
        directories = [d for name in args.only for d in directories if d.parent.name == name]
    for directory in directories:
        if directory.parent.name in results:
            continue
        card, module = load_module(directory)
        if card.composition is not None:
            continue
        model = Classifier(module, card.num_classes, card.input_shape, card.bounds, card.ref)
        data, x, y = _test_data(card, args.images)
        metrics, evaluation = evaluate_card(model, torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), data,
                                            args.eps or DEFAULT_EPS, steps=args.steps, seed=args.seed)
        log.info("%s: %s in %.0f s", card.ref, metrics, evaluation.seconds)
        results[card.name] = {"version": card.version, "metrics": metrics,
                              "robustness": evaluation.model_dump(mode="json")}
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        if args.in_place:
            write_figures(directory / CARD_FILE, metrics, evaluation)


if __name__ == "__main__":
    main()
