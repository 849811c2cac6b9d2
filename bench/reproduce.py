"""Reproduce the defense papers' results on Fashion-MNIST; write ``docs/results/<name>.md`` + ``.json``.

    .venv/bin/python -m bench.reproduce distillation [--n 300] [--epochs 6]
    .venv/bin/python -m bench.reproduce fgsm-training
    .venv/bin/python -m bench.reproduce feature-squeezing [--n 500]

Every model here is made by the defense jobs' own code (``workers.defense_jobs.execute_defense``,
the function a worker runs for ``POST /v1/defenses``) and every attack by the attack kernels the
service runs; success is judged on the returned tensors by the same code for every row.

- ``distillation``: Papernot et al. (2016) report that JSMA's success rate falls from about 91%
  at T=1 to 0.5% at T=100 on MNIST; Carlini & Wagner (2017) that their L2 attack still succeeds
  on every distilled network. For each T a teacher and a student are trained (``--epochs``
  each, into ``var/repro``), then targeted JSMA (on the softmax, as in the paper, and on the
  logits) and targeted C&W L2 attack the first ``--n`` test images, with the same random target
  per image for every model. The undistilled row is the hosted ``fmnist-cnn``.
- ``fgsm-training``: Goodfellow et al. (2015): error on FGSM examples 89.4% -> 17.9% with the
  adversarial objective (alpha 0.5) on MNIST. Hosted ``fmnist-cnn`` against the hosted
  ``fmnist-cnn-fgsm-at`` on the whole test set, FGSM at the training eps (0.1) and at the paper's
  eps 0.25, PGD-20 for contrast, and FGSM examples transferred between the two models.
- ``feature-squeezing``: Xu et al. (2018): 98% detection at about 4% false positives on MNIST
  (1-bit depth + 2x2 median). Detection rate of successful FGSM/PGD/DeepFool/C&W examples and
  the false-positive rate on other clean images, for the hosted detector's squeezers and for
  the paper's MNIST configuration and other single squeezers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models.datasets import load_split
from workers.attacks.base import flat_norm
from workers.classifier import Classifier
from workers.defense_jobs import execute_defense
from workers.defenses.squeeze import calibrate_threshold, detection_rate, squeeze_scores
from workers.device import configure_numerics
from workers.jobs import Context, craft, make_context
from workers.settings import WorkerSettings
from workers.specs import (
    CarliniWagnerL2Params,
    DeepFoolParams,
    DefenseJob,
    FGSMParams,
    JSMAParams,
    PGDParams,
)

OUT = Path("docs/results")
TEMPERATURES = (1, 2, 5, 10, 20, 50, 100)


def test_slice(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("fashion-mnist:test").slice(offset, n)
    return torch.from_numpy(x), torch.from_numpy(y)


def judge(model: Classifier, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
          targets: torch.Tensor | None) -> dict[str, Any]:
    """Success over the initially correct images (targeted: the target is hit), and norms."""
    clean = model.predict(x, 500).argmax(1)
    adv = model.predict(x_adv, 500).argmax(1)
    correct = clean == y
    hit = (adv == targets) if targets is not None else (adv != y)
    success = hit & correct
    delta = x_adv - x
    l2, l0 = flat_norm(delta, "l2")[success], flat_norm(delta, "l0")[success]
    return {
        "n": int(x.shape[0]), "correct": int(correct.sum()),
        "success_rate": float(success.sum()) / max(int(correct.sum()), 1),
        "error_rate": float((adv != y).double().mean()),
        "mean_l2": float(l2.mean()) if l2.numel() else None,
        "mean_l0_pixels": float(l0.mean()) if l0.numel() else None,
    }


def write(name: str, text: str, payload: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python -m bench.reproduce", *sys.argv[1:]])
    meta = {"command": command, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "threads": torch.get_num_threads()}
    (OUT / f"{name}.json").write_text(json.dumps({**meta, **payload}, indent=2) + "\n")
    header = f"Command: `{command}`  \nDate: {meta['date']}; {meta['machine']}, {meta['threads']} threads.\n\n"
    (OUT / f"{name}.md").write_text(text.replace("{header}", header))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# --- defensive distillation ----------------------------------------------------------------


def distilled(ctx: Context, temperature: float, epochs: int, limit: int | None, seed: int) -> str:
    name = f"repro-distilled-t{temperature:g}-e{epochs}" + (f"-n{limit}" if limit else "")
    if ctx.cache.index.card(name) is not None:
        return name
    spec = DefenseJob(job_id=f"repro-{name}", team=None, model="fmnist-cnn@1", output=name, seed=seed,
                      defense={"name": "distillation", "temperature": temperature, "epochs": epochs,
                               "limit": limit},
                      evaluation={"robust_limit": 0})
    execute_defense(spec, ctx, None, ctx.settings.models_root)
    return name


def distillation(args: argparse.Namespace, ctx: Context) -> None:
    x, y = test_slice(args.n)
    generator = torch.Generator().manual_seed(args.seed)
    targets = (y + torch.randint(1, 10, y.shape, generator=generator)) % 10
    attacks = {
        "jsma-softmax": JSMAParams(name="jsma", targeted=True, targets=targets.tolist(), gamma=0.145),
        "jsma-logits": JSMAParams(name="jsma", targeted=True, targets=targets.tolist(), gamma=0.145,
                                  space="logits"),
        "cw-l2": CarliniWagnerL2Params(name="carlini-wagner-l2", targeted=True, targets=targets.tolist(),
                                       binary_search_steps=5, max_iter=100, learning_rate=0.05),
    }
    rows = []
    models = [("none", "fmnist-cnn@1")] + [
        (f"{t:g}", f"repro-distilled-t{t:g}-e{args.epochs}" + (f"-n{args.limit}" if args.limit else ""))
        for t in args.temperatures]
    for label, ref in models:
        if label != "none":
            distilled(ctx, float(label), args.epochs, args.limit, args.seed)
        card, model = ctx.cache.get(ref)
        row: dict[str, Any] = {"temperature": label, "model": card.ref,
                               "clean_accuracy": card.metrics.get("clean_accuracy")}
        with torch.no_grad():
            logits = model.predict(x, 500)
        row["mean_l1_logits"] = float(logits.abs().sum(1).mean())
        for attack_name, attack in attacks.items():
            started = time.perf_counter()
            x_adv, _, _ = craft(model, x, y, attack, 128, torch.Generator().manual_seed(args.seed), targets)
            row[attack_name] = judge(model, x, y, x_adv, targets)
            row[attack_name]["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row))  # noqa: T201
    lines = [
        "# Defensive distillation on Fashion-MNIST: JSMA and C&W L2 against the student, by temperature",
        "", "{header}",
        f"Targeted attacks on the first {args.n} test images, one random target class per image "
        "(the same for every model); success counts images classified correctly before the attack "
        "and as the target after it. JSMA changes at most 14.5% of the pixels (gamma 0.145, theta +1), "
        "as in the distillation paper; `softmax` is the paper's saliency on probabilities, `logits` "
        "the same attack on the logits. C&W L2: 5 binary-search steps x 100 Adam iterations at "
        "learning rate 0.05 (at the usual 0.01, 100 iterations are too few to reach a target: 89% "
        "success on the undistilled model instead of 100%). Students and "
        f"teachers trained {args.epochs} epochs each on the first {args.limit or 60000} training images "
        "by the `distillation` defense job (the hosted `fmnist-cnn-distilled`: 6 epochs on all 60k); "
        "clean accuracy on the 10k test images, measured by the job. The undistilled row is the hosted "
        "`fmnist-cnn`.", "",
        "| T | clean accuracy | mean L1 of logits | JSMA (softmax) success | JSMA (logits) success | "
        "C&W L2 success | C&W mean L2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['temperature']} | {pct(row['clean_accuracy'])} | {row['mean_l1_logits']:.1f} | "
            f"{pct(row['jsma-softmax']['success_rate'])} | {pct(row['jsma-logits']['success_rate'])} | "
            f"{pct(row['cw-l2']['success_rate'])} | {num(row['cw-l2']['mean_l2'])} |")
    lines += ["", "Published (MNIST): JSMA success 91% at T=1, 24% at T=5, 0.5% at T=100 (95.89% without "
              "distillation); C&W's attacks succeed with 100% probability at T=100 (mean L2 2.2 vs 1.76 "
              "undistilled); logits of distilled networks are about 80x larger.", ""]
    write("distillation", "\n".join(lines) + "\n", {"rows": rows, "n": args.n, "epochs": args.epochs,
                                                   "limit": args.limit})


# --- FGSM adversarial training ---------------------------------------------------------------


def fgsm_training(args: argparse.Namespace, ctx: Context) -> None:
    x, y = test_slice(10_000)
    refs = {"standard": "fmnist-cnn@1", "fgsm-at": "fmnist-cnn-fgsm-at@1"}
    models = {label: ctx.cache.get(ref) for label, ref in refs.items()}
    rows = []
    crafted: dict[tuple[str, float], torch.Tensor] = {}
    for label, (card, model) in models.items():
        row: dict[str, Any] = {"model": card.ref, "clean_error": 1 - float(
            (model.predict(x, 500).argmax(1) == y).double().mean())}
        for eps in (0.1, 0.25):
            x_adv, _, _ = craft(model, x, y, FGSMParams(name="fgsm", eps=eps), 500, torch.Generator())
            crafted[(label, eps)] = x_adv
            logits = model.predict(x_adv, 500)
            wrong = logits.argmax(1) != y
            row[f"fgsm_error@{eps:g}"] = float(wrong.double().mean())
            row[f"fgsm_confidence@{eps:g}"] = float(logits.softmax(1).amax(1)[wrong].mean())
        n = args.pgd_n
        x_adv, _, _ = craft(model, x[:n], y[:n], PGDParams(name="pgd", eps=0.1, steps=20), 128,
                            torch.Generator().manual_seed(args.seed))
        row["pgd20_error@0.1"] = float((model.predict(x_adv, 500).argmax(1) != y[:n]).double().mean())
        rows.append(row)
    for (source, target) in (("standard", "fgsm-at"), ("fgsm-at", "standard")):
        _, model = models[target]
        rows.append({"transfer": f"{source} -> {target}", **{
            f"error@{eps:g}": float((model.predict(crafted[(source, eps)], 500).argmax(1) != y).double().mean())
            for eps in (0.1, 0.25)}})
    print(json.dumps(rows, indent=1))  # noqa: T201
    std, at = rows[0], rows[1]
    lines = [
        "# FGSM adversarial training on Fashion-MNIST (Goodfellow et al. 2015)", "", "{header}",
        "Hosted `fmnist-cnn` (standard training) against hosted `fmnist-cnn-fgsm-at` (the defense job "
        "`fgsm-adversarial-training`: objective alpha J(x, y) + (1 - alpha) J(x + eps sign(grad), y), "
        "alpha 0.5, eps 0.1, same architecture and schedule, 6 epochs). Error = fraction of all 10,000 "
        "test images misclassified after the attack (the paper's definition); FGSM examples are clipped "
        "to [0, 1] (the paper did not clip). Confidence = mean softmax of the predicted class over the "
        f"misclassified examples. PGD-20 (eps 0.1, step 2.5 eps/20, random start) on the first {args.pgd_n} "
        "images.", "",
        "| model | clean error | FGSM error eps 0.1 (conf.) | FGSM error eps 0.25 (conf.) "
        "| PGD-20 error eps 0.1 |",
        "|---|---|---|---|---|",
    ]
    for row in (std, at):
        lines.append(f"| {row['model']} | {pct(row['clean_error'])} | {pct(row['fgsm_error@0.1'])} "
                     f"({pct(row['fgsm_confidence@0.1'])}) | {pct(row['fgsm_error@0.25'])} "
                     f"({pct(row['fgsm_confidence@0.25'])}) | {pct(row['pgd20_error@0.1'])} |")
    lines += ["", "Transfer (FGSM examples crafted on one model, classified by the other):", "",
              "| crafted on -> evaluated on | error eps 0.1 | error eps 0.25 |", "|---|---|---|"]
    for row in rows[2:]:
        lines.append(f"| {row['transfer']} | {pct(row['error@0.1'])} | {pct(row['error@0.25'])} |")
    lines += ["", "Published (MNIST, maxout network, eps 0.25): error on FGSM examples 89.4% -> 17.9%; clean "
              "error 0.94% -> 0.84%; transfer errors 19.6% / 40.9%.", ""]
    write("fgsm-training", "\n".join(lines) + "\n", {"rows": rows})


# --- feature squeezing -----------------------------------------------------------------------

SQUEEZERS: dict[str, list[list[dict[str, Any]]]] = {
    "2-bit + 3-bit (hosted default)": [[{"name": "bit-depth", "bits": 2}], [{"name": "bit-depth", "bits": 3}]],
    "1-bit + 2x2 median (paper, MNIST)": [[{"name": "bit-depth", "bits": 1}], [{"name": "median", "size": 2}]],
    "1-bit": [[{"name": "bit-depth", "bits": 1}]],
    "2-bit": [[{"name": "bit-depth", "bits": 2}]],
    "3-bit": [[{"name": "bit-depth", "bits": 3}]],
    "2x2 median": [[{"name": "median", "size": 2}]],
    "JPEG q75": [[{"name": "jpeg", "quality": 75}]],
}


def feature_squeezing(args: argparse.Namespace, ctx: Context) -> None:
    card, model = ctx.cache.get("fmnist-cnn@1")
    detector = ctx.cache.index.detector(card, None)
    x_cal, _ = test_slice(2500, 5000)
    x_held, _ = test_slice(2500, 7500)
    x, y = test_slice(args.n)
    correct = model.predict(x, 500).argmax(1) == y
    attacks = {"FGSM eps 0.1": FGSMParams(name="fgsm", eps=0.1),
               "PGD-20 eps 0.1": PGDParams(name="pgd", eps=0.1, steps=20),
               "DeepFool L2": DeepFoolParams(name="deepfool"),
               "C&W L2": CarliniWagnerL2Params(name="carlini-wagner-l2", binary_search_steps=5, max_iter=100)}
    adversarial = {}
    for name, attack in attacks.items():
        x_adv, _, _ = craft(model, x, y, attack, 128, torch.Generator().manual_seed(args.seed))
        fooled = (model.predict(x_adv, 500).argmax(1) != y) & correct
        adversarial[name] = x_adv[fooled]
    rows = []
    for label, squeezers in SQUEEZERS.items():
        threshold = calibrate_threshold(squeeze_scores(model.module, x_cal, squeezers, card.bounds), 0.05)
        held = squeeze_scores(model.module, x_held, squeezers, card.bounds)
        row: dict[str, Any] = {"squeezers": label, "threshold": threshold,
                               "false_positive_rate": detection_rate(held, threshold)}
        for name, x_adv in adversarial.items():
            row[name] = detection_rate(squeeze_scores(model.module, x_adv, squeezers, card.bounds), threshold)
        rows.append(row)
        print(json.dumps(row))  # noqa: T201
    names = list(attacks)
    lines = [
        "# Feature squeezing on Fashion-MNIST (Xu, Evans & Qi 2018)", "", "{header}",
        "Detector on hosted `fmnist-cnn`: score = largest L1 distance between the softmax on the input "
        "and on each squeezed input; threshold chosen on 2,500 clean test images (offset 5000) for 5% "
        "false positives; false-positive rate measured on 2,500 other clean test images (offset 7500); "
        f"detection rate over the successful adversarial examples of the first {args.n} test images "
        f"({', '.join(f'{n}: {adversarial[n].shape[0]}' for n in names)} successful).", "",
        "| squeezers | threshold | false positives | " + " | ".join(f"detection {n}" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        lines.append(f"| {row['squeezers']} | {row['threshold']:.3f} | {pct(row['false_positive_rate'])} | "
                     + " | ".join(pct(row[n]) for n in names) + " |")
    if detector is not None:
        lines += ["", "The hosted detector (`models/hosted/fmnist-cnn/1/detector.json`, made by the "
                  "`feature-squeezing` defense job on 500 attacked images) measured: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in detector.metrics.items()) + "."]
    lines += ["", "Published (MNIST, 1-bit depth + 2x2 median): 98.15% detection of successful adversarial "
              "examples at 3.98% false positives.", ""]
    write("feature-squeezing", "\n".join(lines) + "\n", {"rows": rows, "n": args.n})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["distillation", "fgsm-training", "feature-squeezing"])
    parser.add_argument("--n", type=int, default=None, help="attacked test images")
    parser.add_argument("--epochs", type=int, default=6, help="distillation: epochs of teacher and student")
    parser.add_argument("--limit", type=int, default=None, help="distillation: training images (default all)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--pgd-n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--var", type=Path, default=Path("var/repro"))
    args = parser.parse_args(argv)
    configure_numerics()
    ctx = make_context(WorkerSettings(var_dir=args.var, device="cpu"))
    if args.what == "distillation":
        args.n = args.n or 300
        distillation(args, ctx)
    elif args.what == "fgsm-training":
        fgsm_training(args, ctx)
    else:
        args.n = args.n or 500
        feature_squeezing(args, ctx)


if __name__ == "__main__":
    main()
