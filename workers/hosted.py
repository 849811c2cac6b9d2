"""Build the hosted defended models and the hosted detector through the defense jobs' own code.

``make models`` runs ``python -m workers.hosted`` after ``models.train``: each entry below is the
payload a client would POST to ``/v1/defenses``, run by ``execute_defense`` with the hosted
directory as the registry root (and no team, which makes the result hosted). The outputs are
committed under ``models/hosted/`` so that ``make run`` needs no training.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from models.manifest import HOSTED_DIR
from workers.defense_jobs import execute_defense
from workers.device import configure_numerics
from workers.jobs import make_context
from workers.settings import WorkerSettings
from workers.specs import DefenseJob

HOSTED: dict[str, dict[str, Any]] = {
    "fmnist-cnn-detector": {
        "model": "fmnist-cnn@1", "output": None,
        "defense": {"name": "feature-squeezing", "fpr": 0.05},
    },
    "fmnist-cnn-fgsm-at": {
        "model": "fmnist-cnn@1", "output": "fmnist-cnn-fgsm-at",
        "defense": {"name": "fgsm-adversarial-training", "alpha": 0.5, "eps": 0.1, "epochs": 6},
    },
    "fmnist-cnn-distilled": {
        "model": "fmnist-cnn@1", "output": "fmnist-cnn-distilled",
        "defense": {"name": "distillation", "temperature": 100, "epochs": 6},
    },
    "fmnist-cnn-pgd-at": {
        "model": "fmnist-cnn@1", "output": "fmnist-cnn-pgd-at",
        "defense": {"name": "pgd-adversarial-training", "eps": 0.1, "steps": 10, "epochs": 6},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(HOSTED), action="append")
    parser.add_argument("--root", type=Path, default=HOSTED_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configure_numerics()
    with tempfile.TemporaryDirectory() as var:
        ctx = make_context(WorkerSettings(var_dir=Path(var), device=args.device))
        ctx.cache.index.roots = [args.root, *[r for r in ctx.cache.index.roots if r != HOSTED_DIR]]
        for name in args.only or list(HOSTED):
            started = time.perf_counter()
            spec = DefenseJob(job_id=f"hosted-{name}", team=None, seed=args.seed, **HOSTED[name])
            result = execute_defense(spec, ctx, None, args.root)
            result.pop("lineage", None)
            print(f"{name}: {time.perf_counter() - started:.0f}s {json.dumps(result, default=str)[:2000]}")  # noqa: T201


if __name__ == "__main__":
    main()
