"""AdvGAN against the adversarially trained hosted models, next to PGD-20 (``docs/results/advgan-defended.md``).

    .venv/bin/python -m bench.advgan_defended [--train-limit 20000] [--epochs 4] [--n 500]

The rows of ``bench.advgan`` (same job code, same judging), for ``fmnist-cnn-fgsm-at`` and
``fmnist-cnn-pgd-at`` at Linf eps 0.1 (their training budget) and 0.2, semi-white-box, untargeted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from bench import advgan
from workers.device import configure_numerics
from workers.jobs import make_context
from workers.settings import WorkerSettings

MODELS = ("fmnist-cnn-fgsm-at@1", "fmnist-cnn-pgd-at@1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-limit", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.black_box_epochs, args.batch_size, args.repeats = args.epochs, 128, 1
    configure_numerics()
    rows = []
    with tempfile.TemporaryDirectory() as var:
        ctx = make_context(WorkerSettings(var_dir=Path(var), device="cpu"))
        x, y = advgan.test_slice(args.n)
        for model in MODELS:
            advgan.MODEL = model  # the bench's rows read the attacked model from this constant
            for eps in (0.1, 0.2):
                key = f"{model.split('@')[0]}-{round(eps * 100)}"
                rows.append({"model": model, **advgan.generator_row(ctx, Path(var) / "generators", key, args,
                                                                    x, y, 128, eps=eps)})
                rows.append({"model": model, **advgan.pgd_row(ctx, x, y, 128, eps, None, args)})
    command = " ".join([".venv/bin/python -m bench.advgan_defended", *sys.argv[1:]])
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# AdvGAN against the adversarially trained models", "",
             f"Command: `{command}`  \nDate: {date}; {platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}.", "",
             f"Semi-white-box, untargeted generators trained {args.epochs} epochs on the first "
             f"{args.train_limit} training images by the generator job, against each model; PGD-20 (random "
             f"start, early stop) on the same first {args.n} test images. Success over the inputs each model "
             "classifies correctly.", "",
             "| model | eps | attack | success | robust acc. | mean L2 | images/s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['eps']:g} | {row['attack']} | {advgan.pct(row['success_rate'])} "
                     f"| {advgan.pct(row['robust_accuracy'])} | {row['l2_mean'] or 0:.2f} "
                     f"| {row['images_per_s']:.0f} |")
    lines += ["", "Against the undefended `fmnist-cnn`: `advgan.md`."]
    Path("docs/results/advgan-defended.md").write_text("\n".join(lines) + "\n")
    Path("docs/results/advgan-defended.json").write_text(json.dumps(
        {"command": command, "date": date, "rows": [{k: v for k, v in r.items() if k != "card"} for r in rows]},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
