"""Where a peer fools one image more than Adversa: is it the method, or chance?

    .venv/bin/python -m bench.onediff [--n 512] [--seeds 3] [--cw-n 64] [--out bench/results]

Two such one-image differences stand in the per-attack benches on ``fmnist-cnn``:

* APGD-T against torchattacks in chunks (``bench.apgd``): both draw a random start. Here both run
  with ``--seeds`` different seeds on the same ``--n`` images; if the gap is chance, it changes
  sign or size from seed to seed.
* L2 PGD against torchattacks' PGDL2 (``bench.norms``): both draw a random start; as for APGD-T,
  both run with ``--seeds`` seeds.
* C&W (B) against ART (``bench.cw``, first ``--cw-n`` images): the images ART fools and Adversa does
  not are attacked again by Adversa with each of its speed rules switched off in turn (the
  per-sample early abort, the hopeless rule, the warm start), to find the rule that costs them.

Every returned tensor is clipped to [0, 1] and judged by the hosted model, as in the other benches.
Writes ``onediff-<model>.md`` and ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import apgd as apgd_bench
from bench import cw as cw_bench
from bench import norms as norms_bench
from bench.attacks import FB_REPS, MODEL, Bench, command_line, load, predict, success_rate
from workers.attacks.apgd import apgd_t
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.pgd import PGDSpec, pgd


def fooled(bench: Bench, x_adv: torch.Tensor) -> torch.Tensor:
    """Per image: initially correct and misclassified after clipping to [0, 1]."""
    m = len(x_adv)
    return success_rate(bench, x_adv.detach().clamp(0.0, 1.0), bench.correct[:m], bench.y[:m])


Side = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def seeded(bench: Bench, seeds: int, make: Callable[[int], tuple[Side, Side]]) -> list[dict[str, Any]]:
    """For each seed, ``make(seed)`` gives (Adversa, torchattacks) chunk attacks; count who fools what."""
    chunks = list(zip(bench.x.split(bench.chunk), bench.y.split(bench.chunk), strict=True))
    rows = []
    for seed in range(seeds):
        ours_fn, theirs_fn = make(seed)
        ours = torch.cat([ours_fn(xc, yc) for xc, yc in chunks])
        torch.manual_seed(seed)
        theirs = torch.cat([theirs_fn(xc, yc) for xc, yc in chunks])
        a, b = fooled(bench, ours), fooled(bench, theirs)
        rows.append({"seed": seed, "adversa": int(a.sum()), "torchattacks": int(b.sum()),
                     "only_adversa": int((a & ~b).sum()), "only_torchattacks": int((b & ~a).sum())})
        print(rows[-1], flush=True)
    return rows


def apgd_t_seeds(bench: Bench, seeds: int) -> list[dict[str, Any]]:
    import torchattacks  # the ``bench`` extra

    def make(seed: int) -> tuple[Side, Side]:
        generator = torch.Generator().manual_seed(seed)
        attack = torchattacks.APGDT(bench.ta_module, norm="Linf", eps=apgd_bench.EPS,
                                    steps=apgd_bench.APGD_STEPS, n_restarts=apgd_bench.RESTARTS, seed=seed,
                                    n_classes=apgd_bench.N_TARGETS + 1)
        return (lambda xc, yc: apgd_t(bench.model, xc, yc, apgd_bench.APGDT_SPEC, generator=generator).x_adv,
                attack)
    return seeded(bench, seeds, make)


def pgd_l2_seeds(bench: Bench, seeds: int) -> list[dict[str, Any]]:
    import torchattacks  # the ``bench`` extra

    spec = PGDSpec(eps=norms_bench.EPS_L2, norm="l2", steps=norms_bench.PGD_STEPS,
                   step_size=norms_bench.PGD_ALPHA_L2, random_start=True)

    def make(seed: int) -> tuple[Side, Side]:
        generator = torch.Generator().manual_seed(seed)
        attack = torchattacks.PGDL2(bench.ta_module, eps=norms_bench.EPS_L2, alpha=norms_bench.PGD_ALPHA_L2,
                                    steps=norms_bench.PGD_STEPS, random_start=True)
        return lambda xc, yc: pgd(bench.model, xc, yc, spec, generator=generator).x_adv, attack
    return seeded(bench, seeds, make)


def cw_against_art(bench: Bench, m: int) -> dict[str, Any]:
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import PyTorchClassifier

    x, y = bench.x[:m], bench.y[:m]
    spec = CarliniWagnerL2Spec(binary_search_steps=cw_bench.SEARCH_STEPS, max_iter=cw_bench.STEPS,
                               learning_rate=cw_bench.LR, initial_const=cw_bench.INITIAL_CONST)

    def ours(s: CarliniWagnerL2Spec, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return torch.cat([carlini_wagner_l2(bench.model, xc, yc, s).x_adv
                          for xc, yc in zip(xs.split(bench.chunk), ys.split(bench.chunk), strict=True)])

    classifier = PyTorchClassifier(cw_bench.peer_module(), loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 1.0))
    art = CarliniL2Method(classifier, confidence=0.0, targeted=False, learning_rate=cw_bench.LR,
                          binary_search_steps=cw_bench.SEARCH_STEPS, max_iter=cw_bench.STEPS,
                          initial_const=cw_bench.INITIAL_CONST, batch_size=bench.chunk, verbose=False)
    theirs = torch.from_numpy(art.generate(x.numpy(), y=y.numpy().astype(np.int64)))
    a, b = fooled(bench, ours(spec, x, y)), fooled(bench, theirs)
    gap = (b & ~a).nonzero().squeeze(1)
    out: dict[str, Any] = {"n": m, "adversa": int(a.sum()), "art": int(b.sum()), "only_art": gap.tolist(),
                           "only_adversa": (a & ~b).nonzero().squeeze(1).tolist(), "variants": {}}
    if gap.numel():
        variants = {
            "defaults": spec,
            "abort_early off": replace(spec, abort_early=False),
            "abort_hopeless off": replace(spec, abort_hopeless=False),
            "warm_start off": replace(spec, warm_start=False),
        }
        for name, s in variants.items():
            adv = ours(s, x[gap], y[gap])
            ok = predict(bench.judge, adv.clamp(0.0, 1.0), bench.chunk).ne(y[gap])
            l2 = (adv.clamp(0.0, 1.0) - x[gap]).flatten(1).norm(dim=1)
            out["variants"][name] = {"fooled": ok.tolist(), "l2": [round(float(v), 4) for v in l2]}
            print(name, out["variants"][name], flush=True)
        theirs_l2 = (theirs[gap].clamp(0.0, 1.0) - x[gap]).flatten(1).norm(dim=1)
        out["art_l2"] = [round(float(v), 4) for v in theirs_l2]
    return out


def seeds_table(title: str, seeds: list[dict[str, Any]], attacked: int) -> list[str]:
    lines = [title, "",
             "| seed | fooled by Adversa | fooled by torchattacks | only Adversa | only torchattacks |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['adversa']} | {r['torchattacks']} | {r['only_adversa']} | "
              f"{r['only_torchattacks']} |" for r in seeds]
    if seeds:
        mean_a = sum(r["adversa"] for r in seeds) / len(seeds)
        mean_b = sum(r["torchattacks"] for r in seeds) / len(seeds)
        lines += ["", f"Mean over {len(seeds)} seeds: Adversa {mean_a:.1f}, torchattacks {mean_b:.1f} of the "
                  f"{attacked} attacked images."]
    return lines + [""]


def report(meta: dict[str, Any], seeds: list[dict[str, Any]], pgd_seeds: list[dict[str, Any]],
           cw: dict[str, Any]) -> list[str]:
    lines = [f"# One-image success differences: {MODEL}", "", f"Command: `{meta['command']}`", "",
             f"- date: {meta['date']}; torch {meta['torch']}, CPU; wall time {meta['wall_seconds']:.0f} s", ""]
    lines += seeds_table(f"## APGD-T (Linf eps {apgd_bench.EPS}, {apgd_bench.APGD_STEPS} steps, "
                         f"{apgd_bench.N_TARGETS} target classes) against torchattacks, chunks of "
                         f"{meta['chunk']}, {meta['n']} images", seeds, meta["attacked"])
    lines += seeds_table(f"## L2 PGD (eps {norms_bench.EPS_L2}, {norms_bench.PGD_STEPS} steps of "
                         f"{norms_bench.PGD_ALPHA_L2}, random start) against torchattacks' PGDL2, chunks of "
                         f"{meta['chunk']}, {meta['n']} images", pgd_seeds, meta["attacked"])
    if cw:
        lines += ["", f"## C&W L2 (B) against ART on the first {cw['n']} images", ""]
        lines.append(f"Fooled: Adversa {cw['adversa']}, ART {cw['art']}; only ART: images {cw['only_art']}; "
                     f"only Adversa: images {cw['only_adversa']}.")
        if cw["variants"]:
            lines += ["", "Adversa again on the images only ART fooled, one speed rule off at a time "
                      f"(ART's L2 there: {cw.get('art_l2')}):", "",
                      "| Adversa's rules | fooled | L2 |", "|---|---|---|"]
            lines += [f"| {name} | {v['fooled']} | {v['l2']} |" for name, v in cw["variants"].items()]
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images for APGD-T (default 512)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of APGD-T's random start (default 3)")
    parser.add_argument("--cw-n", type=int, default=64, help="images for C&W against ART (default 64)")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    bench = load(max(args.n, args.cw_n), args.chunk, FB_REPS, 1)
    first = replace(bench, x=bench.x[:args.n], y=bench.y[:args.n], correct=bench.correct[:args.n])
    seeds = apgd_t_seeds(first, args.seeds) if args.seeds else []
    pgd_seeds = pgd_l2_seeds(first, args.seeds) if args.seeds else []
    cw = cw_against_art(bench, args.cw_n) if args.cw_n else {}
    command = command_line("onediff", argv)
    meta = {"model": MODEL, "command": command.strip(), "n": args.n, "chunk": args.chunk,
            "attacked": int(first.correct.sum()),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "wall_seconds": time.perf_counter() - start}
    lines = report(meta, seeds, pgd_seeds, cw)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"onediff-{MODEL}"
    stem.with_suffix(".md").write_text("\n".join(lines))
    payload = {"meta": meta, "apgd_t": seeds, "pgd_l2": pgd_seeds, "cw_art": cw}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
