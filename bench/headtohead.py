"""Head-to-head speed: Adversa against each peer on the same chunks, alternately.

    .venv/bin/python -m bench.headtohead [--model fmnist-cnn] [--out bench/results]

This VM's speed drifts by tens of percent over minutes (the t_fb that every bench measures before
and after its runs differs by up to 25%), so rows timed minutes apart can be decided by the drift
rather than by the code. Here each pair runs chunk by chunk on the same images, back to back, the
order alternating from one chunk to the next (Adversa first, then the peer first, ...), and the
speed-up is the ratio of the summed times. Same settings as the per-attack benches, whose
constants it imports; success and perturbation sizes are judged there, not here. Writes
``headtohead-<model>.md`` and ``.json``; ``bench.summary`` takes its speed-ups where present.
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

from bench import apgd as apgd_bench
from bench import attacks as base
from bench import blackbox as bb
from bench import cw as cw_bench
from bench import peers as peer_lib
from workers.attacks.apgd import apgd, apgd_t
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.attacks.square import SquareSpec, square

Fn = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class Pair:
    attack: str
    settings: str
    peer: str
    ours: Callable[[], Fn]  # built lazily, so a missing library fails only its own pairs
    theirs: Callable[[], Fn]
    chunks: int
    chunk: int
    target: float | None


@dataclass(frozen=True)
class Result:
    attack: str
    settings: str
    peer: str
    n: int
    chunk: int
    ours_seconds: float
    peer_seconds: float
    speedup: float
    target: float | None


def kernel_fn(model: Any, kernel: Callable[..., Any], spec: Any) -> Fn:
    def fn(x: torch.Tensor, y: torch.Tensor) -> Any:
        return kernel(model, x, y, spec, generator=torch.Generator().manual_seed(base.SEED))
    return fn


def peer_fn(make: Callable[[nn.Module], Any]) -> Fn:
    attack = make(base.fresh_module())

    def fn(x: torch.Tensor, y: torch.Tensor) -> Any:
        torch.manual_seed(base.SEED)
        np.random.seed(base.SEED)
        return attack(x, y)
    return fn


def pairs(model: Any, chunk: int) -> list[Pair]:
    import foolbox as fb
    import torchattacks

    eps, steps, alpha = base.EPS, base.PGD_STEPS, base.PGD_ALPHA
    pgd_spec = PGDSpec(eps=eps, norm="linf", steps=steps, step_size=alpha, random_start=True)
    df_spec = DeepFoolSpec(norm="l2", overshoot=base.DF_OVERSHOOT, max_iter=base.DF_STEPS, candidates=10)
    art = peer_lib.art_makers(eps, steps, alpha, base.DF_STEPS, base.DF_OVERSHOOT, chunk)
    foolbox = peer_lib.foolbox_makers(eps, steps, alpha, base.DF_STEPS, base.DF_OVERSHOOT)
    ta = base.torchattacks_makers()
    ta_apgd = apgd_bench.torchattacks_makers()
    a_spec = CarliniWagnerL2Spec(binary_search_steps=1, max_iter=cw_bench.STEPS, learning_rate=cw_bench.LR,
                                 initial_const=cw_bench.TA_C)
    b_spec = CarliniWagnerL2Spec(binary_search_steps=cw_bench.SEARCH_STEPS, max_iter=cw_bench.STEPS,
                                 learning_rate=cw_bench.LR, initial_const=cw_bench.INITIAL_CONST)
    fb_cw = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=cw_bench.SEARCH_STEPS, steps=cw_bench.STEPS, stepsize=cw_bench.LR, confidence=0,
        initial_const=cw_bench.INITIAL_CONST, abort_early=True)

    def foolbox_cw(module: nn.Module) -> Any:
        fmodel = fb.PyTorchModel(module.eval(), bounds=(0.0, 1.0))
        return lambda x, y: fb_cw(fmodel, x, y, epsilons=None)[1]

    sq_eps, sq_p = bb.SQUARE_EPS["linf"], bb.SQUARE_P["linf"]
    sq_spec = SquareSpec(eps=sq_eps, norm="linf", max_queries=bb.SQUARE_QUERIES, p_init=sq_p)
    a_set = "(A) c=1, 100 steps"
    b_set = f"(B) {cw_bench.SEARCH_STEPS}x{cw_bench.STEPS}, c0={cw_bench.INITIAL_CONST:g}"

    def ta_cw(m: nn.Module) -> Any:
        return torchattacks.CW(m, c=cw_bench.TA_C, kappa=0, steps=cw_bench.STEPS, lr=cw_bench.LR)

    def ours(kernel: Callable[..., Any], spec: Any) -> Callable[[], Fn]:
        return lambda: kernel_fn(model, kernel, spec)

    def theirs(make: Callable[[nn.Module], Any]) -> Callable[[], Fn]:
        return lambda: peer_fn(make)

    fgsm_spec = FGSMSpec(eps=eps, check=False)
    return [
        *(Pair("FGSM", "", name, ours(fgsm, fgsm_spec), theirs(makers["FGSM"][0]), 4, chunk, 1.0)
          for name, makers in (("torchattacks", ta), ("art", art), ("foolbox", foolbox))),
        *(Pair("PGD", "", name, ours(pgd, pgd_spec), theirs(makers["PGD"][0]), 4, chunk, 1.0)
          for name, makers in (("torchattacks", ta), ("art", art), ("foolbox", foolbox))),
        Pair("PGD (no early stop)", "same work as the peer", "torchattacks",
             ours(pgd, PGDSpec(eps=eps, norm="linf", steps=steps, step_size=alpha, early_stop=False)),
             theirs(ta["PGD"][0]), 4, chunk, None),
        Pair("APGD-CE", "", "torchattacks", ours(apgd, apgd_bench.APGD_SPEC), theirs(ta_apgd["APGD-CE"][0]),
             2, chunk, 1.0),
        Pair("APGD-T", "", "torchattacks", ours(apgd_t, apgd_bench.APGDT_SPEC), theirs(ta_apgd["APGD-T"][0]),
             1, chunk, 1.0),
        *(Pair("DeepFool", "", name, ours(deepfool, df_spec), theirs(makers["DeepFool"][0]), 1, chunk, 20.0)
          for name, makers in (("torchattacks", ta), ("art", art), ("foolbox", foolbox))),
        Pair("C&W", a_set + ", abort early", "torchattacks", ours(carlini_wagner_l2, a_spec),
             theirs(ta_cw), 2, chunk, 2.0),
        Pair("C&W", a_set + ", no abort", "torchattacks",
             ours(carlini_wagner_l2, CarliniWagnerL2Spec(binary_search_steps=1, max_iter=cw_bench.STEPS,
                                                         learning_rate=cw_bench.LR, initial_const=cw_bench.TA_C,
                                                         abort_early=False)),
             theirs(ta_cw), 2, chunk, 2.0),
        Pair("C&W", b_set, "foolbox", ours(carlini_wagner_l2, b_spec), theirs(foolbox_cw), 1, chunk, 2.0),
        Pair("Square", f"linf, eps {sq_eps}, {bb.SQUARE_QUERIES} queries", "torchattacks",
             ours(square, sq_spec),
             theirs(lambda m: torchattacks.Square(m, norm="Linf", eps=sq_eps, n_queries=bb.SQUARE_QUERIES - 2,
                                                  n_restarts=1, p_init=sq_p, loss="margin", resc_schedule=True,
                                                  seed=base.SEED)), 4, chunk, 1.0),
    ]


@dataclass(frozen=True)
class Cost:
    attack: str
    steps: int
    n: int
    attack_seconds: float
    limit_seconds: float
    ratio: float


def cost_ratios(model: Any, chunk: int) -> list[tuple[str, Callable[..., Any], Any, int]]:
    """The gradient attacks the issue bounds to 1.15 x (steps x one forward+backward)."""
    from workers.attacks.mifgsm import mi_fgsm

    pgd_spec = PGDSpec(eps=base.EPS, norm="linf", steps=base.PGD_STEPS, step_size=base.PGD_ALPHA)
    mi = apgd_bench.MI_SPEC
    return [
        ("PGD (no early stop)", pgd, replace(pgd_spec, early_stop=False), base.PGD_STEPS),
        ("PGD", pgd, pgd_spec, base.PGD_STEPS),
        ("APGD-CE (no early stop)", apgd, replace(apgd_bench.APGD_SPEC, early_stop=False),
         apgd_bench.APGD_STEPS),
        ("APGD-CE", apgd, apgd_bench.APGD_SPEC, apgd_bench.APGD_STEPS),
        ("MI-FGSM (no early stop)", mi_fgsm, replace(mi, early_stop=False), apgd_bench.MI_STEPS),
        ("MI-FGSM", mi_fgsm, mi, apgd_bench.MI_STEPS),
    ]


def alternating(first: Fn, second: Fn, x: torch.Tensor, y: torch.Tensor, chunk: int,
                chunks: int) -> tuple[float, float]:
    """Seconds of ``first`` and of ``second`` over the same ``chunks`` chunks, timed chunk by chunk,
    the order alternating (``first`` first on even chunks); one warm-up call of each on 8 images."""
    first(x[:8], y[:8])
    second(x[:8], y[:8])
    totals = [0.0, 0.0]
    for i in range(chunks):
        xc, yc = x[i * chunk:(i + 1) * chunk], y[i * chunk:(i + 1) * chunk]
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (first, second)[which](xc, yc)
            totals[which] += time.perf_counter() - start
    return totals[0], totals[1]


def cost(attack: str, fn: Fn, module: nn.Module, steps: int, x: torch.Tensor, y: torch.Tensor, chunk: int,
         chunks: int) -> Cost:
    """Attack seconds over the seconds of ``steps`` bare cross-entropy forward+backward passes (gradient
    with respect to the input) of the same chunk, the two alternating chunk by chunk."""

    def limit(xc: torch.Tensor, yc: torch.Tensor) -> None:
        for _ in range(steps):
            base.forward_backward(module, xc, yc)

    t_attack, t_limit = alternating(fn, limit, x, y, chunk, chunks)
    return Cost(attack, steps, chunks * chunk, t_attack, t_limit, t_attack / t_limit)


def head_to_head(pair: Pair, x: torch.Tensor, y: torch.Tensor) -> Result:
    t_ours, t_peer = alternating(pair.ours(), pair.theirs(), x, y, pair.chunk, pair.chunks)
    return Result(pair.attack, pair.settings, pair.peer, pair.chunks * pair.chunk, pair.chunk, t_ours, t_peer,
                  t_peer / t_ours, pair.target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4,
                        help="at most this many chunks per pair and per cost ratio (default 4; 2 for the "
                             "ResNet-18, whose slow peers take minutes a chunk)")
    parser.add_argument("--only", default="", help="comma-separated attacks to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    bench = base.load(args.chunks * args.chunk, args.chunk, base.FB_REPS, 1)
    wanted = {a for a in args.only.split(",") if a}
    results = []
    for pair in pairs(bench.model, args.chunk):
        if wanted and pair.attack not in wanted:
            continue
        pair = replace(pair, chunks=min(pair.chunks, args.chunks))
        result = head_to_head(pair, bench.x, bench.y)
        results.append(result)
        print(f"{result.attack} {result.settings} vs {result.peer}: {result.ours_seconds:.2f} s / "
              f"{result.peer_seconds:.2f} s on {result.n} images -> {result.speedup:.2f}x", flush=True)
    costs = []
    if not wanted or "cost" in wanted:
        for attack, kernel, spec, steps in cost_ratios(bench.model, args.chunk):
            c = cost(attack, kernel_fn(bench.model, kernel, spec), bench.model.module, steps, bench.x, bench.y,
                     args.chunk, args.chunks)
            costs.append(c)
            print(f"cost ratio {attack}: {c.attack_seconds:.2f} s / {c.limit_seconds:.2f} s = {c.ratio:.2f}",
                  flush=True)
    stem = args.out / f"headtohead-{base.MODEL}"
    if wanted and stem.with_suffix(".json").exists():
        # A partial run replaces its own rows in the last full run's file and keeps the others.
        previous = json.loads(stem.with_suffix(".json").read_text())
        results = [Result(**r) for r in previous["rows"] if r["attack"] not in wanted] + results
        if "cost" not in wanted:
            costs = [Cost(**c) for c in previous.get("costs", [])]
    lines = ["| attack | settings | peer | images | chunk | adversa s | peer s | speed-up | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = f">= {r.target:g}x" if r.target else "–"
        lines.append(f"| {r.attack} | {r.settings or '–'} | {r.peer} | {r.n} | {r.chunk} | "
                     f"{r.ours_seconds:.2f} | {r.peer_seconds:.2f} | {r.speedup:.2f}x | {target} |")
    cost_lines = ["| attack | nominal steps | images | attack s | steps x forward+backward s | cost ratio | "
                  "limit |", "|---|---|---|---|---|---|---|"]
    cost_lines += [f"| {c.attack} | {c.steps} | {c.n} | {c.attack_seconds:.2f} | {c.limit_seconds:.2f} | "
                   f"{c.ratio:.2f} | <= 1.15 |" for c in costs]
    command = base.command_line("headtohead", argv)
    if wanted:
        command += " (these rows re-measured; the others kept from the previous full run)"
    meta = {"model": base.MODEL, "command": command,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "wall_seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join([
        f"# Head-to-head speed: {base.MODEL}", "", f"Command: `{meta['command']}`", "",
        f"- date: {meta['date']}; torch {meta['torch']}, CPU, {meta['threads']} threads; "
        f"wall time {meta['wall_seconds']:.0f} s",
        "- each pair on the same chunks of the first test images, chunk by chunk, the order alternating "
        "(Adversa first on even chunks, the peer first on odd ones); speed-up = peer seconds / Adversa "
        "seconds; one warm-up call of each side on 8 images first. Settings: as in the per-attack "
        "benches (attacks, apgd, cw, blackbox), whose tables judge success and perturbation sizes.", "",
        *lines, "",
        "## Cost ratios", "",
        "Attack seconds / seconds of (nominal steps x one bare cross-entropy forward+backward of the same "
        f"chunk), the two alternating chunk by chunk on {args.chunks} chunks. '(no early stop)': every "
        "sample runs every step, so the ratio is the kernel's own overhead; without the mark, the kernel's "
        "defaults (early stop), so the ratio also counts the steps it saves.", "",
        *cost_lines, ""]))
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "rows": [asdict(r) for r in results], "costs": [asdict(c) for c in costs]},
        indent=2) + "\n")
    print("\n".join(lines + [""] + cost_lines))


if __name__ == "__main__":
    main()
