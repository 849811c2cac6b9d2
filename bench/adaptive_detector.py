"""Detect-and-reject on hosted fmnist-cnn with its calibrated feature-squeezing detector, under the
suite's (oblivious) attacks and under the adaptive attack on model and detector
(``workers.attacks.squeeze_adaptive``), and what the adaptive attack costs in the audit.

Run with ``.venv/bin/python -m bench.adaptive_detector --n 200`` (one torch thread). It runs the real
audit battery with the plan the worker builds for ``{"suite": <--suite>, "eps": {"linf": <--eps>},
"adaptive_steps": <--steps>}`` on the first ``--n`` Fashion-MNIST test images, merges the chunk as
the merge job does, and writes ``adaptive-detector-<suite>.md`` and ``.json`` into ``--out``: per eps, the
robust accuracy, detect-and-reject accuracy (oblivious) and (adaptive) with their 95% intervals,
and the battery's seconds split into the suite, the adaptive attack and the checks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from contracts.intervals import text as interval_text
from contracts.specs import AuditSpec
from models.datasets import load_split
from models.manifest import CardIndex
from models.registry import load_module
from workers.audit.battery import Detector, run_battery
from workers.audit.merge import merge, nan_to_none
from workers.audit_jobs import build_plan, stage_names
from workers.classifier import Classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--eps", default="0.03137254901960784,0.05,0.1")
    parser.add_argument("--steps", type=int, default=50, help="adaptive_steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    index = CardIndex.default()
    directory = index.directory("fmnist-cnn")
    assert directory is not None
    card, module = load_module(directory)
    found = index.detector(card, None)
    assert found is not None, "fmnist-cnn has no detector"
    model = Classifier(module, card.num_classes, card.input_shape, card.bounds, card.ref)
    x_np, y_np = load_split("fashion-mnist:test").slice(0, args.n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    grid = [float(e) for e in args.eps.split(",")]
    spec = AuditSpec(suite=args.suite, grids={"linf": grid}, check_eps={"linf": 0.1}, adaptive_steps=args.steps)
    plan = build_plan(spec, Detector(found.squeezers, found.threshold, args.steps), (), 128, card.num_classes)
    started = time.perf_counter()
    chunk = run_battery(model, x, y, plan, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - started
    bounded, minimal = stage_names(spec, card.num_classes)
    result = nan_to_none(merge([chunk], spec.grids, bounded, minimal, card.classes,
                               detector={"threshold": found.threshold, "fpr": found.fpr, "model": found.model,
                                         "adaptive_steps": args.steps}))
    detector, bands = result["detector"], result["intervals"]
    c = result["counters"]
    command = f".venv/bin/python -m bench.adaptive_detector {' '.join(sys.argv[1:])}".strip()
    rows = []
    for key in result["robust_accuracy"]:
        rows.append(f"| {key} | {result['robust_accuracy'][key]} | {detector['detect_reject_accuracy'][key]} "
                    f"({interval_text(bands['detect_reject_accuracy'][key])}) | "
                    f"{detector['adaptive_detect_reject_accuracy'][key]} "
                    f"({interval_text(bands['adaptive_detect_reject_accuracy'][key])}) |")
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Detect-and-reject under oblivious and adaptive attacks (fmnist-cnn, feature squeezing)", "",
        f"Command: `{command}` ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, CPU, 1 torch thread, "
        f"load average {load:.1f} on {os.cpu_count()} cores).", "",
        f"First {args.n} Fashion-MNIST test images; suite `{args.suite}`; detector "
        f"`models/hosted/fmnist-cnn/1/detector.json` (bit depth 2 and 3, threshold {found.threshold:.4f}, "
        f"5% false positives); adaptive attack `squeeze-adaptive`, {args.steps} steps per eps. Clean accuracy "
        f"{result['clean_accuracy']}; clean inputs rejected {detector['clean_rejection_rate']}.", "",
        "| eps | robust accuracy | detect-and-reject accuracy, oblivious | "
        "detect-and-reject accuracy, adaptive |",
        "|---|---|---|---|", *rows, "",
        f"Battery {seconds:.1f} s: suite {c['seconds_suite']:.1f} s, "
        f"adaptive attack {c['seconds_adaptive']:.1f} s "
        f"({c['adaptive_attacked']:.0f} sample-eps pairs attacked, {c['adaptive_evaded']:.0f} evaded by it), "
        f"checks {c['seconds_checks']:.1f} s.", ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"adaptive-detector-{args.suite}.md").write_text(text)
    (args.out / f"adaptive-detector-{args.suite}.json").write_text(json.dumps(
        {"command": command, "seconds": seconds, "detector": detector, "intervals": bands,
         "robust_accuracy": result["robust_accuracy"], "counters": c}, indent=2) + "\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
