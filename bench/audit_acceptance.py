"""The audit's acceptance figures on the hosted models; writes ``docs/results/audit-acceptance.md``
(+ ``.json`` and each audit's ``report.html`` under ``docs/results/audit-reports/``).

    .venv/bin/python -m bench.audit_acceptance [--n 200] [--steps 50] [--targets 3] [--queries 1000]

Each audit runs through the audit jobs' own code (``run_audit_chunk`` and ``run_audit_merge``,
what the workers run for ``POST /v1/audits``), one chunk per 100 samples, ``standard`` suite
(FGSM probe, APGD-CE, APGD-T, Square) on the first ``--n`` test images. The budgets are cut from
AutoAttack's (100 steps, 9 target classes, 5000 queries) to fit 2 CPU cores; the command line
records them. Models: the hosted ``fmnist-cnn``, ``fmnist-cnn-pgd-at``, ``fmnist-cnn-distilled``,
and ``fmnist-cnn`` behind JPEG (quality 75) and 4-bit depth, made by the ``preprocessing`` defense
job (its card also records the PGD figure with plain gradients, the one an audit must not report).
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

from workers.audit_jobs import run_audit_chunk, run_audit_merge
from workers.defense_jobs import execute_defense
from workers.device import configure_numerics
from workers.jobs import install_context, make_context
from workers.settings import WorkerSettings
from workers.specs import DEFAULT_CHECK_EPS, AuditSpec, DefenseJob, InputRef

OUT = Path("docs/results")
GRID = [2 / 255, 8 / 255, 0.05, 0.1, 0.2, 0.3]
MODELS = ["fmnist-cnn@1", "fmnist-cnn-pgd-at@1", "fmnist-cnn-distilled@1", "fmnist-cnn-jpeg-bits@1"]


def audit(model: str, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    audit_id = f"acceptance-{model.replace('@', '-')}"
    spec = AuditSpec(suite="standard", grids={"linf": GRID}, check_eps={"linf": DEFAULT_CHECK_EPS["linf"]},
                     steps=args.steps, n_target_classes=args.targets, square_queries=args.queries,
                     thresholds=["masking_checks == pass"])
    chunk_ids = []
    for i, start in enumerate(range(0, args.n, args.chunk)):
        stop = min(start + args.chunk, args.n)
        chunk_id = f"{audit_id}c{i}"
        run_audit_chunk({"job_id": chunk_id, "audit_id": audit_id, "team": "public", "model": model,
                         "inputs": InputRef(kind="dataset", n=stop - start, dataset="fashion-mnist:test",
                                            offset=start).model_dump(),
                         "start": start, "stop": stop, "index": i, "seed": args.seed,
                         "audit": spec.model_dump(mode="json")})
        chunk_ids.append(chunk_id)
    result = run_audit_merge({"job_id": audit_id, "audit_id": audit_id, "team": "public", "model": model,
                              "chunk_ids": chunk_ids, "seed": args.seed, "audit": spec.model_dump(mode="json")})
    report = ctx.store.get(f"jobs/{audit_id}/report.html")
    (OUT / "audit-reports").mkdir(parents=True, exist_ok=True)
    (OUT / "audit-reports" / f"{model.split('@')[0]}.html").write_bytes(report)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--var", type=Path, default=Path("var/acceptance"))
    parser.add_argument("--only", action="append", choices=MODELS)
    args = parser.parse_args(argv)
    configure_numerics()
    ctx = make_context(WorkerSettings(var_dir=args.var, device="cpu"))
    install_context(ctx)
    if ctx.cache.index.card("fmnist-cnn-jpeg-bits") is None:
        execute_defense(DefenseJob(
            job_id="acceptance-jpeg", team="public", model="fmnist-cnn@1", output="fmnist-cnn-jpeg-bits",
            seed=0,
            defense={"name": "preprocessing", "steps": [{"name": "jpeg", "quality": 75},
                                                        {"name": "bit-depth", "bits": 4}]},
            evaluation={"robust_limit": 500}), ctx, None, ctx.settings.models_root)
    rows = []
    for model in args.only or MODELS:
        started = time.perf_counter()
        result = audit(model, args, ctx)
        card = ctx.cache.resolve(model)
        rows.append({"model": model, "seconds": round(time.perf_counter() - started, 1), "result": result,
                     "card_metrics": card.metrics})
        print(model, json.dumps({k: result[k] for k in ("clean_accuracy", "robust_accuracy")}),  # noqa: T201
              result["masking_checks"]["status"], f"{rows[-1]['seconds']}s")
    write(rows, args)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    command = " ".join([".venv/bin/python -m bench.audit_acceptance", *sys.argv[1:]])
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    labels = rows[0]["result"]["curves"]["linf"]["labels"]
    lines = [
        "# Audit acceptance on the hosted models", "",
        f"Command: `{command}`  \nDate: {date}; {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads.", "",
        f"`standard` suite on the first {args.n} Fashion-MNIST test images: FGSM probe, APGD-CE "
        f"({args.steps} steps), APGD-T ({args.targets} target classes x {args.steps} steps), Square "
        f"({args.queries} queries), Linf grid {', '.join(labels)}. Worst-case robust accuracy per eps "
        "(over all samples), clean accuracy, and the gradient-masking verdict; the per-attack curves, "
        "checks and image grids are in `audit-reports/<model>.html`.", "",
        "| model | clean | " + " | ".join(f"robust@{label}" for label in labels)
        + " | masking checks | BPDA | time |",
        "|---|---|" + "---|" * len(labels) + "---|---|---|",
    ]
    for row in rows:
        r = row["result"]
        lines.append(f"| {row['model']} | {pct(r['clean_accuracy'])} | "
                     + " | ".join(pct(v) for v in r["curves"]["linf"]["worst_case"])
                     + f" | {r['masking_checks']['status']} | {'yes' if r['bpda'] else 'no'} "
                     f"| {row['seconds']:.0f} s |")
    lines += ["", "Per-attack robust accuracy at Linf 0.1 (each attack alone):", "",
              "| model | " + " | ".join(rows[0]["result"]["curves"]["linf"]["attacks"]) + " |",
              "|---|" + "---|" * len(rows[0]["result"]["curves"]["linf"]["attacks"])]
    e = labels.index("0.1")
    for row in rows:
        attacks = row["result"]["curves"]["linf"]["attacks"]
        lines.append(f"| {row['model']} | " + " | ".join(pct(v[e]) for v in attacks.values()) + " |")
    lines += ["", "Masking checks that warned:", ""]
    for row in rows:
        warned = [c for c in row["result"]["masking_checks"]["checks"] if c["status"] == "warn"]
        lines.append(f"- `{row['model']}`: " + ("none" if not warned else "; ".join(
            f"**{c['name']}**: {c['evidence']}" for c in warned)))
    jpeg = next((row for row in rows if "jpeg" in row["model"]), None)
    if jpeg is not None:
        plain = jpeg["card_metrics"].get("plain_gradient_robust_accuracy@linf:0.1")
        lines += ["", f"`fmnist-cnn-jpeg-bits`: PGD-20 at Linf 0.1 with plain gradients (through JPEG and "
                  f"bit depth, zero almost everywhere) leaves {pct(plain)} robust (the defense job's card, "
                  f"500 images); the audit attacks it with BPDA and reports "
                  f"{pct(jpeg['result']['robust_accuracy'].get('linf:0.1'))}."]
    (OUT / "audit-acceptance.md").write_text("\n".join(lines) + "\n")
    (OUT / "audit-acceptance.json").write_text(json.dumps({"command": command, "date": date, "rows": rows},
                                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
