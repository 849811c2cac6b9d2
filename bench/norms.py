"""The other norms of the attacks in ``bench.attacks``: FGM and PGD in L2, DeepFool in Linf.

    .venv/bin/python -m bench.norms [--n 512] [--peer-n 128] [--repeats 3] [--out bench/results]

Same images, judge, timing and chunking as ``bench.attacks`` (whose helpers it uses), against the
peers that implement each variant: torchattacks ``PGDL2``; ART ``FastGradientMethod`` and
``ProjectedGradientDescentPyTorch`` with ``norm=2``; Foolbox ``L2FastGradientAttack``, ``L2PGD`` and
``LinfDeepFoolAttack`` (on the first ``--peer-n`` images: it is slow). Writes ``norms-<model>.md``
and ``.json``; each row carries its norm, so that ``bench.summary`` pairs like with like.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import attacks as base
from bench.attacks import AttackFn, Bench, Run
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.pgd import PGDSpec, pgd

EPS_L2 = 1.5
PGD_STEPS = 20
PGD_ALPHA_L2 = 0.15
DF_STEPS = 50
DF_OVERSHOOT = 0.02
NORMS = {"FGM": "l2", "PGD": "l2", "DeepFool": "linf"}


def adversa_pendings(bench: Bench) -> list[base.Pending]:
    pgd_spec = PGDSpec(eps=EPS_L2, norm="l2", steps=PGD_STEPS, step_size=PGD_ALPHA_L2, random_start=True)
    return [
        base.adversa_pending(bench, "FGM", fgsm, FGSMSpec(eps=EPS_L2, norm="l2", check=False), 1),
        base.adversa_pending(bench, "PGD", pgd, pgd_spec, PGD_STEPS),
        base.adversa_pending(bench, "DeepFool", deepfool, DeepFoolSpec(
            norm="linf", overshoot=DF_OVERSHOOT, max_iter=DF_STEPS, candidates=10), None),
    ]


def peer_makers(chunk: int) -> dict[str, dict[str, tuple[Callable[[nn.Module], AttackFn], int | None]]]:
    import foolbox as fb
    import torchattacks
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    def art(module: nn.Module) -> PyTorchClassifier:
        return PyTorchClassifier(model=module, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                 nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")

    def art_run(attack: Any) -> AttackFn:
        return lambda x, y: torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))

    def foolbox(attack: Any, epsilon: float | None) -> Callable[[nn.Module], AttackFn]:
        def make(module: nn.Module) -> AttackFn:
            fmodel = fb.PyTorchModel(module.eval(), bounds=(0.0, 1.0))
            return lambda x, y: attack(fmodel, x, y, epsilons=epsilon)[1].detach()
        return make

    return {
        "torchattacks": {
            "PGD": (lambda m: torchattacks.PGDL2(m, eps=EPS_L2, alpha=PGD_ALPHA_L2, steps=PGD_STEPS,
                                                 random_start=True), PGD_STEPS),
        },
        "art": {
            "FGM": (lambda m: art_run(FastGradientMethod(art(m), norm=2, eps=EPS_L2, batch_size=chunk)), 1),
            "PGD": (lambda m: art_run(ProjectedGradientDescentPyTorch(
                art(m), norm=2, eps=EPS_L2, eps_step=PGD_ALPHA_L2, max_iter=PGD_STEPS, num_random_init=1,
                batch_size=chunk, verbose=False)), PGD_STEPS),
        },
        "foolbox": {
            "FGM": (foolbox(fb.attacks.L2FastGradientAttack(), EPS_L2), 1),
            "PGD": (foolbox(fb.attacks.L2PGD(abs_stepsize=PGD_ALPHA_L2, steps=PGD_STEPS, random_start=True),
                            EPS_L2), PGD_STEPS),
            "DeepFool": (foolbox(fb.attacks.LinfDeepFoolAttack(steps=DF_STEPS, candidates=10,
                                                               overshoot=DF_OVERSHOOT), None), None),
        },
    }


def peer_pendings(bench: Bench, peer_n: int) -> list[base.Pending]:
    runs = []
    m = min(peer_n, len(bench.x))
    for name, table in peer_makers(bench.chunk).items():
        for attack, (make, nominal) in table.items():
            n_rows = m if attack == "DeepFool" else len(bench.x)
            note = f"first {n_rows} images" if n_rows < len(bench.x) else ""
            runs.append(base.peer_pending(bench, attack, make, n_rows, True, nominal, note,
                                          implementation=name, module=base.fresh_module()))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--peer-n", type=int, default=128, help="images for Foolbox's Linf DeepFool")
    parser.add_argument("--repeats", type=int, default=base.REPEATS)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    bench = base.load(args.n, args.chunk, base.FB_REPS, args.repeats)
    pending = adversa_pendings(bench) + ([] if args.skip_peers else peer_pendings(bench, args.peer_n))
    runs: list[Run] = base.run_interleaved(pending, bench.repeats)
    if args.peer_n < len(bench.x):
        runs.insert(3, base.same_images(runs[2], args.peer_n))  # adversa's DeepFool on the peer's images
    bench = base.remeasure(bench)
    rows = [base.score(bench, run) for run in runs]
    notes = [
        f"seconds: median of {bench.repeats} timed run(s) per row, rows timed round-robin; other load, "
        "success, medians and ratios as in "
        f"attacks-{base.MODEL}.md; t_fb = {bench.t_fb * 1e3:.2f} ms.",
        f"FGM: one L2 step of eps = {EPS_L2}; PGD L2: eps {EPS_L2}, {PGD_STEPS} steps of {PGD_ALPHA_L2}, "
        f"random start (each library draws its own); DeepFool Linf: overshoot {DF_OVERSHOOT}, at most "
        f"{DF_STEPS} iterations, all 10 classes as candidates (adversa: its defaults, a damped first step).",
        "For DeepFool Linf compare the median Linf column (the norm it minimises).",
        *[f"* {r.implementation} {r.attack} ({r.batching}): {r.note}." for r in rows if r.note],
    ]
    text = base.table(rows)
    meta = {"model": base.MODEL, "command": base.command_line("norms", argv),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "n": len(bench.x), "chunk": bench.chunk,
            "t_fb_seconds": bench.t_fb, "wall_seconds": time.perf_counter() - start,
            "cpu_count": os.cpu_count(), "numpy": np.__version__}
    print(text)
    print("\n".join(notes))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"norms-{base.MODEL}"
    stem.with_suffix(".md").write_text("\n".join([
        f"# Other norms: {base.MODEL}", "", f"Command: `{meta['command']}`", "",
        f"- date: {meta['date']}", f"- torch {meta['torch']}, CPU, {meta['threads']} threads",
        f"- {meta['n']} images, chunks of {meta['chunk']}; wall time {meta['wall_seconds']:.0f} s", "",
        text, "", "## Notes", "", *[n if n.startswith("*") else f"- {n}" for n in notes], ""]))
    payload = {"meta": meta, "rows": [asdict(r) | {"norm": NORMS[r.attack]} for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
