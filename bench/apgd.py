"""APGD / APGD-T / MI-FGSM benchmark: Adversa's kernels against torchattacks, ART and Foolbox on ``fmnist-cnn``.

Run with ``python -m bench.apgd``; ``--n 64 --out /tmp/apgdsmoke`` is a quick smoke run. The timing,
judging and cost-ratio helpers are those of ``bench.attacks``: every returned tensor is clipped to
[0, 1] and classified by the hosted model, whichever library produced it. Writes
``apgd-fmnist-cnn.md`` and ``apgd-fmnist-cnn.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.attacks import (
    FB_REPS,
    MODEL,
    SEED,
    SPLIT,
    AttackFn,
    Bench,
    Kernel,
    Row,
    Run,
    command_line,
    fmt,
    load,
    remeasure,
    run_torchattacks,
    score,
    timed,
)
from models.manifest import CardIndex
from models.registry import load_module
from workers.attacks.apgd import APGDSpec, apgd, apgd_t
from workers.attacks.mifgsm import MIFGSMSpec, mi_fgsm

EPS = 0.05  # Linf; at 0.1 every method fools ~100% of this CNN and success rates stop telling apart
APGD_STEPS = 100  # the AutoAttack default
RESTARTS = 1
N_TARGETS = 9  # all wrong classes of Fashion-MNIST, as AutoAttack and torchattacks' APGDT(n_classes=10)
MI_STEPS = 10  # the paper's T
MI_DECAY = 1.0
REPEATS = 3

APGD_SPEC = APGDSpec(eps=EPS, norm="linf", steps=APGD_STEPS, restarts=RESTARTS, loss="ce")
APGDT_SPEC = APGDSpec(eps=EPS, norm="linf", steps=APGD_STEPS, restarts=RESTARTS, n_target_classes=N_TARGETS)
NO_EARLY_STOP = "(no early stop)"
MI_SPEC = MIFGSMSpec(eps=EPS, norm="linf", steps=MI_STEPS, decay=MI_DECAY)


@dataclass(frozen=True)
class Scored:
    row: Row
    queries_per_image: float | None


# --- runs ----------------------------------------------------------------------------------------


def run_adversa(bench: Bench, attack: str, kernel: Kernel, spec: Any, nominal: int) -> tuple[Run, torch.Tensor]:
    """Our kernel in chunks (the worker's way), one generator for the whole run; also the queries."""

    def once() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(SEED)
        outs = [kernel(bench.model, xc, yc, spec, generator=generator)
                for xc, yc in zip(bench.x.split(bench.chunk), bench.y.split(bench.chunk), strict=True)]
        return (torch.cat([o.x_adv for o in outs]), torch.cat([o.gradients for o in outs]),
                torch.cat([o.queries for o in outs]))

    (x_adv, gradients, queries), seconds, others = timed(once, bench.repeats)
    run = Run("adversa", attack, f"chunks of {bench.chunk}", x_adv, seconds, others, gradients, nominal)
    return run, queries


def torchattacks_makers() -> dict[str, tuple[Callable[[nn.Module], AttackFn], int]]:
    import torchattacks

    return {
        "APGD-CE": (lambda m: torchattacks.APGD(m, norm="Linf", eps=EPS, steps=APGD_STEPS, n_restarts=RESTARTS,
                                                 seed=SEED, loss="ce"), APGD_STEPS * RESTARTS),
        "APGD-T": (lambda m: torchattacks.APGDT(m, norm="Linf", eps=EPS, steps=APGD_STEPS, n_restarts=RESTARTS,
                                                seed=SEED, n_classes=N_TARGETS + 1),
                   APGD_STEPS * RESTARTS * N_TARGETS),
        "MI-FGSM": (lambda m: torchattacks.MIFGSM(m, eps=EPS, alpha=EPS / MI_STEPS, steps=MI_STEPS,
                                                  decay=MI_DECAY), MI_STEPS),
    }


def fresh_module() -> nn.Module:
    """Another copy of the hosted module, so that no library shares (or re-modes) another's."""
    directory = CardIndex.default().directory(MODEL)
    assert directory is not None
    return load_module(directory)[1]


def run_art(bench: Bench, attack: str, m: int, note: str = "") -> Run:
    """ART's AutoProjectedGradientDescent (cross-entropy) or MomentumIterativeMethod, batch size = chunk."""
    from art.attacks.evasion import AutoProjectedGradientDescent, MomentumIterativeMethod
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=fresh_module(), loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    if attack == "APGD-CE":
        art_attack: Any = AutoProjectedGradientDescent(
            classifier, norm=np.inf, eps=EPS, eps_step=2 * EPS, max_iter=APGD_STEPS, targeted=False,
            nb_random_init=RESTARTS, batch_size=bench.chunk, loss_type="cross_entropy", verbose=False)
        nominal = APGD_STEPS * RESTARTS
    else:
        art_attack = MomentumIterativeMethod(classifier, norm=np.inf, eps=EPS, eps_step=EPS / MI_STEPS,
                                             decay=MI_DECAY, max_iter=MI_STEPS, batch_size=bench.chunk,
                                             verbose=False)
        nominal = MI_STEPS
    x, y = bench.x[:m].numpy(), bench.y[:m].numpy()

    def once() -> torch.Tensor:
        np.random.seed(SEED)  # ART draws its random starts from NumPy's global generator
        return torch.from_numpy(art_attack.generate(x=x, y=y))

    x_adv, seconds, others = timed(once, bench.repeats)
    return Run("ART", attack, f"batch_size {bench.chunk}", x_adv, seconds, others, None, nominal, note)


def run_foolbox(bench: Bench, m: int, note: str = "") -> Run:
    """Foolbox's LinfMomentumIterativeFastGradientMethod in chunks."""
    import foolbox as fb

    fmodel = fb.PyTorchModel(fresh_module(), bounds=(0.0, 1.0))
    attack = fb.attacks.LinfMomentumIterativeFastGradientMethod(momentum=MI_DECAY, abs_stepsize=EPS / MI_STEPS,
                                                                 steps=MI_STEPS)
    x, y = bench.x[:m], bench.y[:m]

    def once() -> torch.Tensor:
        outs = [attack(fmodel, xc, yc, epsilons=EPS)[1]
                for xc, yc in zip(x.split(bench.chunk), y.split(bench.chunk), strict=True)]
        return torch.cat(outs)

    x_adv, seconds, others = timed(once, bench.repeats)
    return Run("foolbox", "MI-FGSM", f"chunks of {bench.chunk}", x_adv, seconds, others, None, MI_STEPS, note)


def all_runs(bench: Bench, skip_peers: bool, peer_n: int) -> tuple[list[Run], dict[int, torch.Tensor]]:
    runs: list[Run] = []
    queries: dict[int, torch.Tensor] = {}
    for attack, kernel, spec, nominal in (
        ("APGD-CE", apgd, APGD_SPEC, APGD_STEPS * RESTARTS),
        ("APGD-T", apgd_t, APGDT_SPEC, APGD_STEPS * RESTARTS * N_TARGETS),
        ("MI-FGSM", mi_fgsm, MI_SPEC, MI_STEPS),
        # Every sample runs every step: the cost ratio is then the kernel's own overhead per step.
        (f"APGD-CE {NO_EARLY_STOP}", apgd, replace(APGD_SPEC, early_stop=False), APGD_STEPS * RESTARTS),
        (f"MI-FGSM {NO_EARLY_STOP}", mi_fgsm, replace(MI_SPEC, early_stop=False), MI_STEPS),
    ):
        run, spent = run_adversa(bench, attack, kernel, spec, nominal)
        queries[len(runs)] = spent
        runs.append(run)
    if skip_peers:
        return runs, queries
    m = min(peer_n, len(bench.x))
    note = f"first {m} images only (--peer-n)" if m < len(bench.x) else ""
    for attack, (make, nominal) in torchattacks_makers().items():
        for chunked in (False, True):
            runs.append(run_torchattacks(bench, attack, make, m, chunked, nominal, note))
    runs.append(run_art(bench, "APGD-CE", m, note))
    runs.append(run_art(bench, "MI-FGSM", m, note))
    runs.append(run_foolbox(bench, m, note))
    return runs, queries


# --- report --------------------------------------------------------------------------------------

HEADER = ("implementation", "attack", "batching", "n", "seconds", "images/s", "other load", "success",
          "out of [0,1]", "median L2", "median Linf", "success 8-bit", "grads/img", "queries/img",
          "cost ratio", "full-budget ratio")


def table(scored: list[Scored]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for s in scored:
        r = s.row
        oob = f"yes (max {r.max_bound_violation:.2g})" if r.out_of_bounds else "no"
        if r.non_finite:
            oob += ", non-finite"
        n = f"{r.n}*" if r.note else str(r.n)
        cells = (r.implementation, r.attack, r.batching, n, fmt(r.seconds, 2), fmt(r.images_per_s, 1),
                 fmt(r.other_cores, 2), f"{r.success_rate:.1%}", oob, fmt(r.median_l2), fmt(r.median_linf),
                 f"{r.success_rate_8bit:.1%}", fmt(r.grads_per_image, 2), fmt(s.queries_per_image, 2),
                 fmt(r.cost_ratio, 2), fmt(r.full_budget_ratio, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(bench: Bench, rows: list[Row]) -> list[str]:
    out = [
        f"Settings (equal for every implementation): Linf, eps = {EPS}. APGD-CE: {APGD_STEPS} iterations, "
        f"{RESTARTS} restart(s), initial step 2 eps (ART: eps_step = 2 eps), momentum 0.75, rho 0.75. APGD-T: "
        f"the targeted DLR loss, {N_TARGETS} target classes (the highest wrong classes of the clean logits), "
        f"{APGD_STEPS} iterations per target class, each pass only on the samples still robust. MI-FGSM: "
        f"{MI_STEPS} steps of eps/{MI_STEPS}, decay {MI_DECAY}, no random start.",
        f"seconds: median of {bench.repeats} timed run(s). other load: mean number of CPU cores other "
        "processes kept busy during the timed runs (from /proc/stat); well above 0 means contention "
        "disturbed the timing.",
        f"Adversa kernels run in chunks of {bench.chunk}; torchattacks both as one call and in chunks of "
        f"{bench.chunk}; ART with batch_size {bench.chunk}; Foolbox in chunks of {bench.chunk}.",
        "success: fraction of the initially-correct images whose prediction on clip(x_adv, 0, 1) differs from "
        "the label, judged by the hosted model for every row; success 8-bit: the same after "
        "round(x_adv * 255) / 255. Median L2 / Linf over successful images.",
        f"t_fb = {bench.t_fb * 1e3:.2f} ms: median of {FB_REPS} cross-entropy forward+backward passes "
        f"(gradient w.r.t. the input) of one {min(bench.chunk, len(bench.x))}-image chunk, the lower of the "
        "medians measured before and after the runs ("
        + ", ".join(f"{t * 1e3:.2f}" for t in bench.t_fb_measured) + " ms).",
        "full-budget ratio = attack seconds / (nominal steps x n / chunk x t_fb): the issue's cost ratio. "
        f"Nominal steps: {APGD_STEPS * RESTARTS} for APGD-CE, {APGD_STEPS * RESTARTS * N_TARGETS} for APGD-T "
        f"({N_TARGETS} targets x {APGD_STEPS}), {MI_STEPS} for MI-FGSM. Adversa stops each sample at its first "
        "success, so it can fall well below 1; torchattacks' APGD-T and ART's APGD also skip samples already "
        "fooled between target classes / restarts. The '(no early stop)' rows run every step on every "
        "sample (early_stop=False): their ratio is the kernel's own overhead over bare forward+backward "
        "passes, with nothing saved by stopping.",
        "cost ratio (adversa) = attack seconds / ((sum of per-sample gradient calls / chunk) x t_fb): the "
        "price of each gradient actually spent, against a bare forward+backward (the attack's own overhead); "
        "for peers the column repeats the full-budget ratio, as in bench.attacks. Adversa queries/img counts "
        "every forward of a sample, including the clean check and the gradient-free last iterate.",
        "Known differences between implementations: torchattacks and AutoAttack return the clean image for a "
        "sample that resists (ours returns its highest-loss point); ART's APGD counts a step as rising when it "
        "beats the best loss so far (the paper: the previous iterate), computes the loss with an extra forward "
        "per iteration and keeps running every sample to the end; Foolbox's Linf MI-FGSM accumulates "
        "sign(grad) instead of grad / ||grad||_1; torchattacks normalises by the mean |grad| (the same "
        "direction as L1).",
        "Why the norms differ: adversa returns each sample at its first successful iterate, so its MI-FGSM "
        "perturbations are much smaller than the peers' (their tenth iterate, which sign steps of eps/10 "
        "put on the corner of the ball); torchattacks' APGD returns the last successful iterate. A higher "
        "8-bit success than float success (adversa APGD-T) comes from resisting samples: adversa returns "
        "their highest-loss point, next to the boundary, and rounding pushes a few across; the peers return "
        "the clean image there.",
        f"Random starts: adversa from torch.Generator().manual_seed({SEED}); torchattacks after "
        f"torch.manual_seed({SEED}) (and its own seed={SEED}); ART after np.random.seed({SEED}).",
    ]
    out += [f"* {r.implementation} {r.attack} ({r.batching}): {r.note}." for r in rows if r.note]
    bad = [r for r in rows if r.out_of_bounds or r.non_finite]
    out.append("Out-of-bounds or non-finite outputs: " + (
        ", ".join(f"{r.implementation} {r.attack} ({r.batching})" for r in bad) if bad else "none."))
    return out


def metadata(bench: Bench, args: argparse.Namespace, wall: float) -> dict[str, Any]:
    return {
        "model": MODEL, "split": SPLIT, "command": command_line("apgd", None),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "n": len(bench.x), "peer_n": min(args.peer_n or len(bench.x), len(bench.x)), "chunk": bench.chunk,
        "clean_accuracy": float(bench.correct.float().mean()),
        "t_fb_seconds": bench.t_fb, "t_fb_measured": list(bench.t_fb_measured), "fb_reps": FB_REPS,
        "wall_seconds": wall, "skip_peers": args.skip_peers, "repeats": bench.repeats,
        "eps": EPS, "apgd_steps": APGD_STEPS, "restarts": RESTARTS, "n_target_classes": N_TARGETS,
        "mi_steps": MI_STEPS, "mi_decay": MI_DECAY,
    }


def write(out: Path, meta: dict[str, Any], scored: list[Scored], text_table: str,
          note_lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"apgd-{MODEL}"
    md = [
        f"# APGD / APGD-T / MI-FGSM benchmark: {MODEL}", "",
        f"Command: `{meta['command']}`", "",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, CPU, {meta['threads']} threads ({meta['cpu_count']} cores)",
        f"- {meta['n']} images of {SPLIT} (clean accuracy {meta['clean_accuracy']:.1%}), peers on the first "
        f"{meta['peer_n']}, adversa chunk size {meta['chunk']}",
        f"- total wall time of the benchmark: {meta['wall_seconds']:.0f} s", "",
        text_table, "", "## Notes", "",
        *[line if line.startswith("*") else f"- {line}" for line in note_lines], "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    payload = {"meta": meta, "rows": [{**asdict(s.row), "queries_per_image": s.queries_per_image}
                                      for s in scored]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=512, help="number of test images (default 512)")
    parser.add_argument("--peer-n", type=int, default=None, help="images for the peers (default: --n)")
    parser.add_argument("--chunk", type=int, default=128, help="chunk size (default 128)")
    parser.add_argument("--skip-peers", action="store_true", help="benchmark adversa only")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per row (median kept)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    start = time.perf_counter()
    bench = load(args.n, args.chunk, FB_REPS, args.repeats)
    runs, queries = all_runs(bench, args.skip_peers, args.peer_n or args.n)
    bench = remeasure(bench)
    scored = [Scored(score(bench, run), float(queries[i].float().mean()) if i in queries else None)
              for i, run in enumerate(runs)]
    rows = [s.row for s in scored]
    meta = metadata(bench, args, time.perf_counter() - start)
    text_table, note_lines = table(scored), notes(bench, rows)
    print(f"{MODEL}: n={meta['n']}, chunk={meta['chunk']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"t_fb={bench.t_fb * 1e3:.2f} ms, wall {meta['wall_seconds']:.0f} s")
    print(text_table)
    print("\n".join(note_lines))
    write(args.out, meta, scored, text_table, note_lines)


if __name__ == "__main__":
    main()
