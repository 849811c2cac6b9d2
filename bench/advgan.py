"""AdvGAN on fmnist-cnn: generators trained by the service's own job code, next to PGD-20.

    .venv/bin/python -m bench.advgan [--train-limit 20000] [--epochs 8] [--black-box-epochs 4] [--n 1000]
                                     [--threads N] [--repeats 3] [--out docs/results]
    .venv/bin/python -m bench.advgan --render docs/results/advgan.json   # only rebuild advgan.md

About 20 minutes on 2 CPU cores (each semi-white-box generator about 4 minutes, the black-box one
about 5).

Every generator is trained and measured by ``workers.generator_jobs.execute_generator``, the
function a worker runs for ``POST /v1/attacks/generators`` (published into a scratch registry),
then loaded back from its safetensors files as the ``advgan`` attack loads it. Rows:

- semi-white-box, untargeted, Linf eps 0.1 and 0.2; targeted at class ``--target`` (eps 0.2);
- black-box (dynamic distillation of a ``small-cnn`` surrogate from the target's scores), eps 0.2;
- PGD-20 (the service's defaults: random start, step 2.5 eps / 20, early stop) at the same eps and
  targeting.

All attacks run on the same ``--n`` first test images, through the attack jobs' chunk loop
(``workers.jobs.craft``) with the same chunk size, and are judged by the same code
(``workers.scores``): success over the inputs classified correctly (targeted: and not already of
the target class), Linf/L2 means over the successful ones, and again after 8-bit quantisation.
Throughput: images per second of one whole pass (best of ``--repeats``, after a warm-up), the
generator against PGD-20 on the same batch. Writes ``docs/results/advgan.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.datasets import load_split
from workers.classifier import Classifier
from workers.device import configure_numerics
from workers.generator_jobs import execute_generator
from workers.jobs import Context, craft, make_context
from workers.scores import evaluate, quantize, summarize
from workers.settings import WorkerSettings
from workers.specs import AdvGANParams, GeneratorJob, PGDParams

OUT = Path("docs/results")
MODEL = "fmnist-cnn@1"
PGD_STEPS = 20
# Xiao et al. (2018): semi-white-box AdvGAN against their MNIST classifiers, as quoted by the issue and
# ../shared/RESEARCH.md (not re-checked here).
PAPER_SEMI_WHITE_BOX = "about 97-98% against MNIST classifiers at Linf eps 0.3"


def test_slice(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("fashion-mnist:test").slice(0, n)
    return torch.from_numpy(x), torch.from_numpy(y)


def judge(model: Classifier, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
          targets: torch.Tensor | None, batch: int) -> dict[str, Any]:
    """The attack jobs' scores for one adversarial batch."""
    clean_pred = model.predict(x, batch).argmax(1)
    scores = summarize(evaluate(model, x, y, x_adv, clean_pred, targets, batch), y, clean_pred, True, False)
    quantized = summarize(evaluate(model, x, y, quantize(x_adv, model.bounds), clean_pred, targets, batch),
                          y, clean_pred, True, False)
    return {"success_rate": scores["success_rate"], "quantized_success_rate": quantized["success_rate"],
            "robust_accuracy": scores["robust_accuracy"], "clean_accuracy": scores["clean_accuracy"],
            "linf_mean": scores["perturbation"]["linf"]["mean"],
            "l2_mean": scores["perturbation"]["l2"]["mean"], "max_linf": float((x_adv - x).abs().amax())}


def timed(model: Classifier, x: torch.Tensor, y: torch.Tensor, attack: Any, batch: int, seed: int,
          targets: torch.Tensor | None, repeats: int, loaded: dict[str, Any] | None = None
          ) -> tuple[torch.Tensor, float, float]:
    """``x_adv`` of the last pass, the best pass's seconds and the mean gradient calls per image."""
    craft(model, x[:batch], y[:batch], attack, batch, torch.Generator().manual_seed(seed),
          targets[:batch] if targets is not None else None, loaded=loaded)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        x_adv, _, gradients = craft(model, x, y, attack, batch, torch.Generator().manual_seed(seed), targets,
                                    loaded=loaded)
        best = min(best, time.perf_counter() - started)
    model.reset_counters()
    return x_adv, best, float(gradients.double().mean())


def generator_row(ctx: Context, root: Path, key: str, args: argparse.Namespace, x: torch.Tensor,
                  y: torch.Tensor, batch: int, **fields: Any) -> dict[str, Any]:
    epochs = args.black_box_epochs if fields.get("mode") == "black-box" else args.epochs
    spec = GeneratorJob(job_id=f"bench-{key}", team=None, model=MODEL, output=f"bench-{key}", seed=args.seed,
                        epochs=epochs, limit=args.train_limit, batch_size=args.batch_size,
                        evaluation={"dataset": "fashion-mnist:test", "offset": 0, "limit": args.n}, **fields)
    started = time.perf_counter()
    summary = execute_generator(spec, ctx, None, root)
    job_seconds = time.perf_counter() - started
    card, network = ctx.generators.get(summary["generator"])
    model = ctx.cache.get(MODEL)[1]
    targets = torch.full_like(y, card.target_class) if card.target_class is not None else None
    loaded = {"generator": network, "eps": card.eps, "targeted": card.targeted}
    attack = AdvGANParams(name="advgan", generator=card.ref)
    x_adv, seconds, gradients = timed(model, x, y, attack, batch, args.seed, targets, args.repeats, loaded)
    row = {"attack": "advgan", "key": key, "mode": card.mode, "eps": card.eps, "target": card.target_class,
           "epochs": epochs, **judge(model, x, y, x_adv, targets, batch),
           "images_per_s": x.shape[0] / seconds, "gradient_calls": gradients,
           "training_seconds": card.metrics["training_seconds"], "job_seconds": round(job_seconds, 1),
           "training_queries": card.lineage.parameters["training"]["queries"],
           "card_success_rate": card.metrics.get("success_rate"), "card": card.model_dump(mode="json")}
    print(json.dumps({k: v for k, v in row.items() if k != "card"}), flush=True)
    return row


def pgd_row(ctx: Context, x: torch.Tensor, y: torch.Tensor, batch: int, eps: float, target: int | None,
            args: argparse.Namespace) -> dict[str, Any]:
    model = ctx.cache.get(MODEL)[1]
    targets = torch.full_like(y, target) if target is not None else None
    attack = (PGDParams(name="pgd", eps=eps, steps=PGD_STEPS) if target is None else
              PGDParams(name="pgd", eps=eps, steps=PGD_STEPS, targeted=True, targets=[target] * x.shape[0]))
    x_adv, seconds, gradients = timed(model, x, y, attack, batch, args.seed, targets, args.repeats)
    # The same attack spending all 20 steps on every image (no early stop), for the throughput only.
    _, full_seconds, _ = timed(model, x, y, attack.model_copy(update={"early_stop": False}), batch, args.seed,
                               targets, args.repeats)
    row = {"attack": "pgd-20", "key": f"pgd-{eps:g}" + (f"-t{target}" if target is not None else ""),
           "mode": "white-box", "eps": eps, "target": target, **judge(model, x, y, x_adv, targets, batch),
           "images_per_s": x.shape[0] / seconds, "gradient_calls": gradients,
           "images_per_s_all_steps": x.shape[0] / full_seconds}
    print(json.dumps(row), flush=True)
    return row


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report(payload: dict[str, Any]) -> str:
    """``advgan.md`` from the run's JSON (``--render`` rebuilds it without running again)."""
    rows, settings = payload["rows"], payload["settings"]

    def label(row: dict[str, Any]) -> str:
        aim = f"targeted → {row['target']}" if row["target"] is not None else "untargeted"
        if row["attack"] == "advgan":
            return f"AdvGAN {row['mode']} ({row['epochs']} ep), {aim}"
        return f"PGD-20, {aim}"

    threads = payload["threads"]
    lines = [
        "# AdvGAN on Fashion-MNIST (fmnist-cnn): trained generators next to PGD-20", "",
        f"Command: `{payload['command']}`  ",
        f"Date: {payload['date']}; {payload['machine']}, {threads} thread{'s' if threads != 1 else ''}; "
        f"load average before the run {payload['load_before']}, after {payload['load_after']}; whole run "
        f"{payload['seconds'] / 60:.1f} min.", "",
        f"Generators trained by the job code (`execute_generator`, what `POST /v1/attacks/generators` runs) on "
        f"the first {settings['train_limit']:,} training images, batch {settings['batch_size']}, Adam 1e-3, "
        f"seed {settings['seed']}, the request's default loss weights (adv 10, GAN 1, hinge 1, hinge bound "
        f"eps x sqrt(78.4), kappa 0); black-box: a `small-cnn` surrogate distilled from the model's scores, "
        f"one distillation step per generator step. Every attack on the same first {settings['n']:,} test "
        f"images, chunks of {payload['chunk_size']} (the worker's tuned chunk size), judged by the attack "
        f"jobs' scores: success over the correctly classified inputs (targeted: not already of the target "
        f"class), norms over the successful ones. Images/s: the best of {settings['repeats']} whole passes "
        f"through the attack jobs' chunk loop.", "",
        "| attack | eps | success | 8-bit success | robust acc. | mean Linf | mean L2 | images/s | "
        "gradients/image | training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        training = "–"
        if row["attack"] == "advgan":
            training = f"{row['training_seconds']:.0f} s"
            if row["mode"] == "black-box":
                training += f", {row['training_queries']:,} queries"
        speed = f"{row['images_per_s']:,.0f}"
        if "images_per_s_all_steps" in row:
            speed += f" ({row['images_per_s_all_steps']:,.0f} without early stop)"
        lines.append(f"| {label(row)} | {row['eps']:g} | {pct(row['success_rate'])} | "
                     f"{pct(row['quantized_success_rate'])} | {pct(row['robust_accuracy'])} | "
                     f"{num(row['linf_mean'])} | {num(row['l2_mean'], 2)} | {speed} | "
                     f"{row['gradient_calls']:.1f} | {training} |")
    lines += ["", *discussion(rows, settings, payload), ""]
    return "\n".join(lines)


def _row(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(row for row in rows if row["key"] == key)


def discussion(rows: list[dict[str, Any]], settings: dict[str, Any], payload: dict[str, Any]) -> list[str]:
    """The paragraphs under the table, with the run's own numbers."""
    u1, u2 = _row(rows, "untargeted-0p1"), _row(rows, "untargeted-0p2")
    tg, bb = _row(rows, f"targeted-{settings['target']}-0p2"), _row(rows, "black-box-0p2")
    p1, p2 = _row(rows, "pgd-0.1"), _row(rows, "pgd-0.2")
    last = [r["card"]["lineage"]["parameters"]["training"]["last"]["success"] for r in (u1, u2, tg)]
    saved = 1 / p2["images_per_s"] - 1 / u2["images_per_s"]
    break_even = u2["training_seconds"] / saved if saved > 0 else None
    largest = max(r["max_linf"] for r in rows if r["attack"] == "advgan")
    return [
        f"Clean accuracy of fmnist-cnn on these images: {pct(u1['clean_accuracy'])}. Every AdvGAN output "
        f"is inside its Linf ball by construction (largest Linf seen: {largest:.4f}). Its mean Linf sits at "
        f"eps (on every image some pixel moves by the whole eps: tanh saturates there), while its mean L2 "
        f"({u2['l2_mean']:.2f} at eps 0.2, of at most {0.2 * math.sqrt(784):.1f} for a 28x28 image) shows "
        f"that most pixels move less.",
        "",
        f"**Published reference.** Xiao et al. (2018) report semi-white-box success rates of "
        f"{PAPER_SEMI_WHITE_BOX} (the figure quoted in the issue and in RESEARCH.md; not re-checked here). "
        f"Ours, against fmnist-cnn on held-out Fashion-MNIST test images: {pct(u2['success_rate'])} at eps "
        f"0.2 and {pct(u1['success_rate'])} at eps 0.1 (untargeted), {pct(tg['success_rate'])} targeted at "
        f"class {settings['target']} (eps 0.2), {pct(bb['success_rate'])} black-box (eps 0.2, "
        f"{bb['training_queries']:,} target queries). PGD-20 reaches {pct(p2['success_rate'])} (eps 0.2) "
        f"and {pct(p1['success_rate'])} (eps 0.1) on the same images.",
        "",
        "**Why ours differs.** (1) Budget: the paper's figures are at Linf 0.3 on MNIST; we report 0.1 and "
        "0.2, and at 0.2 our untargeted and targeted generators are within a few points of them. (2) What "
        "limits a generator here is not the budget (PGD-20 breaks nearly every image at 0.1) but that one "
        "forward pass must produce a perturbation that works on images it never saw, where PGD optimises "
        "each test image with its own gradients; the gap to PGD is largest at the smallest eps. (3) Training "
        f"is short, to fit the bench's 25-minute budget on 2 CPU cores: {u2['epochs']} epochs on the first "
        f"{settings['train_limit']:,} training images ({u2['training_seconds'] / 60:.0f} min per "
        f"semi-white-box generator), black-box {bb['epochs']} epochs; success on the training batches in the "
        f"last epoch was {', '.join(pct(v) for v in last)} (eps 0.1, 0.2, targeted), close to the held-out "
        "figures, so the generators do not overfit, and longer training might gain a few points (not "
        "measured). (4) The paper bounds the perturbation softly, with a hinge on its L2 norm; here it is "
        "bounded by construction and success is judged on the returned tensors (and again after 8-bit "
        "quantisation, which costs at most a couple of points). (5) Black-box mode trains against a "
        "surrogate that is still being distilled, so it lags the semi-white-box generator trained for "
        f"about the same wall-clock time ({bb['epochs']} epochs against {u2['epochs']}).",
        "",
        f"**Cost.** A trained generator attacks about {u2['images_per_s']:,.0f} images/s here (one generator "
        f"pass and two forward passes of the model per image, no gradients), "
        f"{u2['images_per_s'] / p2['images_per_s']:.1f}x PGD-20 with early stop (the service default, which "
        f"stops spending steps on images already fooled: {p2['gradient_calls']:.1f} gradient steps per image "
        f"at eps 0.2) and {u2['images_per_s'] / p2['images_per_s_all_steps']:.0f}x PGD-20 spending all 20 "
        f"steps. Training costs {u2['training_seconds']:.0f} s, so against PGD-20 with early stop at eps 0.2 "
        + (f"a generator pays for itself after about {float(f'{break_even:.2g}'):,.0f} attacked images"
           if break_even else
           "a generator never pays for itself here") + "; it is worth it when the same model is attacked "
        "over and over (CI) or when gradients are unavailable (black-box mode).",
        "",
        f"Timings were taken with {payload['threads']} torch thread while other benchmark jobs ran on this "
        "2-core machine (see the load averages above): compare rows with each other, not with other files.",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-limit", type=int, default=20_000, help="training images (first N)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the semi-white-box generators")
    parser.add_argument("--black-box-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n", type=int, default=1000, help="held-out test images attacked")
    parser.add_argument("--target", type=int, default=0, help="the targeted generator's class")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per attack (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", type=Path, default=None,
                        help="only rebuild advgan.md (in --out) from this run's advgan.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "advgan.md").write_text(report(json.loads(args.render.read_text())))
        return
    configure_numerics()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python -m bench.advgan", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "threads": torch.get_num_threads(), "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as var:
        ctx = make_context(WorkerSettings(var_dir=Path(var), device="cpu"))
        root = ctx.settings.generators_root
        card, model = ctx.cache.get(MODEL)
        batch = ctx.cache.batch_size(card, model)
        x, y = test_slice(args.n)
        rows = []
        for eps in (0.1, 0.2):
            rows.append(generator_row(ctx, root, f"untargeted-{eps:g}".replace(".", "p"), args, x, y, batch,
                                      eps=eps))
            rows.append(pgd_row(ctx, x, y, batch, eps, None, args))
        rows.append(generator_row(ctx, root, f"targeted-{args.target}-0p2", args, x, y, batch, eps=0.2,
                                  targeted=True, target_class=args.target))
        rows.append(pgd_row(ctx, x, y, batch, 0.2, args.target, args))
        rows.append(generator_row(ctx, root, "black-box-0p2", args, x, y, batch, eps=0.2, mode="black-box"))
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "chunk_size": batch, "settings": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()},
               "paper_semi_white_box": PAPER_SEMI_WHITE_BOX, "rows": rows}
    (args.out / "advgan.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "advgan.md").write_text(report(payload))


if __name__ == "__main__":
    main()
