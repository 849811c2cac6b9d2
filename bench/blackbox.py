"""Black-box benchmark: Adversa's Square and HopSkipJump against torchattacks, ART and Foolbox on fmnist-cnn.

Run with ``python -m bench.blackbox``; ``--n 64 --peer-n 16 --out /tmp/blackboxsmoke`` is a quick smoke
run. Black-box attacks spend queries (forwards), not gradients: every implementation's model is
wrapped in a counter of forwarded images, so each row reports the queries it really spent per
image. Every returned tensor is judged here by the same code: clipped to [0, 1], classified by the
hosted model, and again after 8-bit quantisation. Writes ``blackbox-fmnist-cnn.md`` and
``blackbox-fmnist-cnn.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bench.attacks import MODEL, SEED, SPLIT, command_line, fmt, median_or_none, timed
from models.datasets import load_split
from models.manifest import CardIndex
from models.registry import load_module
from workers.attacks.base import AttackOutput
from workers.attacks.hop_skip_jump import HopSkipJumpSpec, hop_skip_jump
from workers.attacks.square import SquareSpec, square
from workers.classifier import Classifier

SQUARE_EPS = {"linf": 0.1, "l2": 1.5}
SQUARE_P = {"linf": 0.8, "l2": 0.1}  # the paper's / libraries' defaults per norm
SQUARE_QUERIES = 5000
HSJ_QUERIES = 5000
HSJ_STEPS = 40  # ours: the budget ends the attack first
HSJ_EVALS = (100, 10000)  # initial and maximum probes per iteration, every implementation
REPEATS = 1
FWD_REPS = 10

Kernel = Callable[..., AttackOutput]


class Counting(nn.Module):
    """Wraps a module and counts the images it forwards (the queries a black-box attack spends)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        # ART's HopSkipJump interpolates in float64 and hands that to the float32 module.
        out: torch.Tensor = self.inner(x.float())
        return out


@dataclass(frozen=True)
class Bench:
    x: torch.Tensor
    y: torch.Tensor
    correct: torch.Tensor
    judge: nn.Module
    model: Classifier
    chunk: int
    repeats: int
    t_fwd: float  # median seconds of one no-grad forward of a chunk


@dataclass(frozen=True)
class Run:
    implementation: str
    attack: str
    norm: str
    settings: str
    batching: str
    x_adv: torch.Tensor
    seconds: float | None  # None: a subset of another row's run, not timed separately
    others: float | None
    queries: float  # forwarded images per image
    per_sample: torch.Tensor | None = None  # our per-sample query counts
    eps: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Row:
    implementation: str
    attack: str
    norm: str
    settings: str
    batching: str
    n: int
    seconds: float | None
    images_per_s: float | None
    other_cores: float | None
    attacked: int
    success_rate: float
    success_rate_8bit: float
    out_of_bounds: bool
    max_bound_violation: float
    non_finite: bool
    max_norm_over_eps: float | None
    median_l2: float | None
    median_linf: float | None
    queries_per_image: float
    median_queries_success: float | None
    fwd_ratio: float | None
    note: str


# --- setup ---------------------------------------------------------------------------------------


def fresh_module() -> nn.Module:
    directory = CardIndex.default().directory(MODEL)
    if directory is None:
        raise SystemExit(f"model {MODEL} is not hosted here")
    return load_module(directory)[1]


def load(n: int, chunk: int, repeats: int) -> Bench:
    directory = CardIndex.default().directory(MODEL)
    if directory is None:
        raise SystemExit(f"model {MODEL} is not hosted here")
    card, module = load_module(directory)
    judge = fresh_module()
    model = Classifier(module, card.num_classes, card.input_shape, card.bounds, card.ref)
    x_np, y_np = load_split(SPLIT).slice(0, n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    with torch.no_grad():
        correct = torch.cat([judge(part).argmax(1) for part in x.split(chunk)]).eq(y)
    return Bench(x, y, correct, judge, model, chunk, repeats, time_forward(judge, x[:chunk]))


def time_forward(module: nn.Module, x: torch.Tensor) -> float:
    def once() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            module(x)
        return time.perf_counter() - start

    for _ in range(2):
        once()
    return statistics.median(once() for _ in range(FWD_REPS))


def peer_iterations(budget: int, init: int, overhead: int) -> int:
    """Iterations of a HopSkipJump whose iteration t costs ``min(100 sqrt(t), 10000) + overhead``
    queries after ``init``, that fit in ``budget`` (at least 1)."""
    spent, steps = init, 0
    while True:
        cost = min(int(HSJ_EVALS[0] * math.sqrt(steps + 1)), HSJ_EVALS[1]) + overhead
        if spent + cost > budget:
            return max(steps, 1)
        spent += cost
        steps += 1


# --- runs ----------------------------------------------------------------------------------------


def run_adversa(bench: Bench, attack: str, kernel: Kernel, spec: Any, m: int, settings: str,
                eps: float | None) -> Run:
    x, y = bench.x[:m], bench.y[:m]

    def once() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(SEED)
        bench.model.reset_counters()
        outs = [kernel(bench.model, xc, yc, spec, generator=generator)
                for xc, yc in zip(x.split(bench.chunk), y.split(bench.chunk), strict=True)]
        spent = torch.cat([o.queries for o in outs])
        # The kernel's own counts must be what the classifier saw.
        assert int(spent.sum()) == bench.model.queries and bench.model.gradients == 0
        return torch.cat([o.x_adv for o in outs]), spent

    (x_adv, spent), seconds, others = timed(once, bench.repeats)
    return Run("adversa", attack, spec.norm, settings, f"chunks of {bench.chunk}", x_adv, seconds, others,
               float(spent.float().mean()), spent, eps)


def subset(run: Run, m: int) -> Run:
    """The first ``m`` images of a run (the peers' images), for a like-for-like comparison."""
    spent = run.per_sample[:m] if run.per_sample is not None else None
    queries = float(spent.float().mean()) if spent is not None else run.queries
    return replace(run, x_adv=run.x_adv[:m], seconds=None, others=None, queries=queries, per_sample=spent,
                   note=f"the first {m} images of the row above (the peers' images), not timed separately")


def run_peer(bench: Bench, implementation: str, attack: str, norm: str, settings: str, batching: str, m: int,
             make: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
             eps: float | None = None, note: str = "") -> Run:
    counter = Counting(fresh_module()).eval()
    fn = make(counter)
    x, y = bench.x[:m], bench.y[:m]

    def once() -> torch.Tensor:
        torch.manual_seed(SEED)
        np.random.seed(SEED)
        random.seed(SEED)
        return fn(x, y).detach().float()

    x_adv, seconds, others = timed(once, bench.repeats)
    return Run(implementation, attack, norm, settings, batching, x_adv, seconds, others,
               counter.images / bench.repeats / m, None, eps, note)


def chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunk: int
            ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, y: torch.cat([fn(xc, yc) for xc, yc in zip(x.split(chunk), y.split(chunk), strict=True)])


def art_classifier(module: nn.Module) -> Any:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=module, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                             clip_values=(0.0, 1.0), device_type="cpu")


def square_peers(bench: Bench, norm: str, m: int) -> list[Run]:
    import torchattacks
    from art.attacks.evasion import SquareAttack

    eps, p = SQUARE_EPS[norm], SQUARE_P[norm]
    # Ours spends 1 query on the clean check and 1 on the start, then one per iteration.
    iterations = SQUARE_QUERIES - 2
    settings = f"eps {eps}, p_init {p}, {iterations} iterations"

    def ta(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        atk = torchattacks.Square(module, norm="Linf" if norm == "linf" else "L2", eps=eps,
                                  n_queries=iterations, n_restarts=1, p_init=p, loss="margin",
                                  resc_schedule=True, seed=SEED)
        return chunked(atk, bench.chunk)

    def art(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        attack = SquareAttack(art_classifier(module), norm=np.inf if norm == "linf" else 2, max_iter=iterations,
                              eps=eps, p_init=p, nb_restarts=1, batch_size=bench.chunk, verbose=False)
        return lambda x, y: torch.from_numpy(attack.generate(x=x.numpy(), y=y.numpy()))

    return [run_peer(bench, "torchattacks", "Square", norm, settings, f"chunks of {bench.chunk}", m, ta, eps),
            run_peer(bench, "ART", "Square", norm, settings, f"batch_size {bench.chunk}", m, art, eps)]


def hsj_peers(bench: Bench, norm: Literal["l2", "linf"], m: int) -> list[Run]:
    import foolbox as fb
    from art.attacks.evasion import HopSkipJump

    d = 28 * 28
    # Queries per iteration beyond the probes: ART, a binary search to 0.01/sqrt(d) (L2) or 0.01/d
    # (Linf), and ~2 step-size tries; Foolbox, a binary search to d^-1.5 or d^-2 run until the whole
    # batch converged, ~4 step-size rounds and 2 checks. Init: ART ~1 noise draw, a line search to 1e-3
    # and 2 checks; Foolbox noise draws until the whole batch has one (~150 in a chunk, a few for one
    # image) and a blended line search.
    art_bs = math.ceil(math.log2(math.sqrt(d) / 0.01)) if norm == "l2" else math.ceil(math.log2(d / 0.01))
    fb_bs = math.ceil(math.log2(d**1.5)) if norm == "l2" else math.ceil(math.log2(d**2))
    art_iters = peer_iterations(HSJ_QUERIES, 14, art_bs + 2)
    fb_iters = {bench.chunk: peer_iterations(HSJ_QUERIES, 200 + fb_bs, fb_bs + 6),
                1: peer_iterations(HSJ_QUERIES, 50 + fb_bs, fb_bs + 4)}

    def art(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        attack = HopSkipJump(art_classifier(module), batch_size=bench.chunk, targeted=False,
                             norm=2 if norm == "l2" else np.inf, max_iter=art_iters, max_eval=HSJ_EVALS[1],
                             init_eval=HSJ_EVALS[0], init_size=100, verbose=False)
        return lambda x, y: torch.from_numpy(attack.generate(x=x.numpy(), y=y.numpy()))

    def foolbox(batch: int) -> Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        def make(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            fmodel = fb.PyTorchModel(module, bounds=(0.0, 1.0))
            attack = fb.attacks.HopSkipJumpAttack(
                steps=fb_iters[batch], initial_gradient_eval_steps=HSJ_EVALS[0],
                max_gradient_eval_steps=HSJ_EVALS[1], gamma=1.0, constraint=norm)

            def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return attack(fmodel, x, fb.criteria.Misclassification(y), epsilons=None)[1]

            return chunked(run, batch)

        return make

    runs = [run_peer(bench, "ART", "HopSkipJump", norm, f"max_iter {art_iters}, init_eval {HSJ_EVALS[0]}, "
                     f"max_eval {HSJ_EVALS[1]}", "per image", m, art)]
    for batch, batching in ((bench.chunk, f"chunks of {bench.chunk}"), (1, "per image")):
        runs.append(run_peer(bench, "foolbox", "HopSkipJump", norm, f"steps {fb_iters[batch]}, "
                             f"initial_gradient_eval_steps {HSJ_EVALS[0]}", batching, m, foolbox(batch)))
    return runs


def all_runs(bench: Bench, skip_peers: bool, peer_n: int, hsj_n: int) -> list[Run]:
    runs: list[Run] = []
    n = len(bench.x)
    m = min(peer_n, n)
    square_norms: tuple[Literal["linf", "l2"], ...] = ("linf", "l2")
    for norm in square_norms:
        eps, p = SQUARE_EPS[norm], SQUARE_P[norm]
        spec = SquareSpec(eps=eps, norm=norm, max_queries=SQUARE_QUERIES, p_init=p)
        ours = run_adversa(bench, "Square", square, spec, n, f"eps {eps}, p_init {p}, max_queries "
                           f"{SQUARE_QUERIES}", eps)
        runs.append(ours)
        if skip_peers:
            continue
        if m < n:
            runs.append(subset(ours, m))
        runs += square_peers(bench, norm, m)
    h = min(hsj_n, n)
    hsj_norms: tuple[Literal["l2", "linf"], ...] = ("l2", "linf")
    for hsj_norm in hsj_norms:
        hsj = HopSkipJumpSpec(norm=hsj_norm, max_queries=HSJ_QUERIES, steps=HSJ_STEPS,
                              initial_num_evals=HSJ_EVALS[0], max_num_evals=HSJ_EVALS[1])
        ours = run_adversa(bench, "HopSkipJump", hop_skip_jump, hsj, h, f"max_queries {HSJ_QUERIES}, steps "
                           f"{HSJ_STEPS}, initial_num_evals {HSJ_EVALS[0]}", None)
        runs.append(ours)
        if skip_peers:
            continue
        if m < h:
            runs.append(subset(ours, m))
        runs += hsj_peers(bench, hsj_norm, m)
    return runs


# --- judging -------------------------------------------------------------------------------------


def judged(bench: Bench, x_adv: torch.Tensor, correct: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        pred = torch.cat([bench.judge(part).argmax(1) for part in x_adv.split(bench.chunk)])
    return correct & pred.ne(y)


def score(bench: Bench, run: Run) -> Row:
    m = len(run.x_adv)
    x, y, correct = bench.x[:m], bench.y[:m], bench.correct[:m]
    raw = run.x_adv.detach().to(x.dtype)
    finite = bool(torch.isfinite(raw).all())
    violation = float(torch.maximum(raw - 1.0, -raw).clamp_min(0).nan_to_num(float("inf")).max())
    x_adv = raw.clamp(0.0, 1.0)
    ok = judged(bench, x_adv, correct, y)
    ok_8bit = judged(bench, torch.round(x_adv * 255) / 255, correct, y)
    delta = (x_adv - x).flatten(1)
    attacked = int(correct.sum())
    norm_over_eps = None
    if run.eps is not None:
        norms = delta.abs().amax(1) if run.norm == "linf" else delta.norm(p=2, dim=1)
        norm_over_eps = float(norms.max()) / run.eps
    spent = run.per_sample
    ideal = run.queries * m / bench.chunk * bench.t_fwd
    return Row(
        implementation=run.implementation, attack=run.attack, norm=run.norm, settings=run.settings,
        batching=run.batching, n=m, seconds=run.seconds,
        images_per_s=m / run.seconds if run.seconds else None, other_cores=run.others, attacked=attacked,
        success_rate=int(ok.sum()) / max(attacked, 1), success_rate_8bit=int(ok_8bit.sum()) / max(attacked, 1),
        out_of_bounds=violation > 0, max_bound_violation=violation, non_finite=not finite,
        max_norm_over_eps=norm_over_eps,
        median_l2=median_or_none(delta[ok].norm(p=2, dim=1)),
        median_linf=median_or_none(delta[ok].abs().amax(dim=1)),
        queries_per_image=run.queries,
        median_queries_success=median_or_none(spent[ok].float()) if spent is not None else None,
        fwd_ratio=run.seconds / ideal if run.seconds and ideal > 0 else None, note=run.note,
    )


# --- report --------------------------------------------------------------------------------------

HEADER = ("implementation", "attack", "norm", "settings", "batching", "n", "seconds", "images/s", "other load",
          "success", "success 8-bit", "out of [0,1]", "max norm / eps", "median L2", "median Linf",
          "queries/img", "median queries (fooled)", "fwd-limit ratio")


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        oob = f"yes (max {r.max_bound_violation:.2g})" if r.out_of_bounds else "no"
        if r.non_finite:
            oob += ", non-finite"
        n = f"{r.n}*" if r.note else str(r.n)
        cells = (r.implementation, r.attack, r.norm, r.settings, r.batching, n, fmt(r.seconds, 1),
                 fmt(r.images_per_s, 2), fmt(r.other_cores, 2), f"{r.success_rate:.1%}",
                 f"{r.success_rate_8bit:.1%}", oob, fmt(r.max_norm_over_eps, 4), fmt(r.median_l2),
                 fmt(r.median_linf), fmt(r.queries_per_image, 1), fmt(r.median_queries_success, 0),
                 fmt(r.fwd_ratio, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(bench: Bench, rows: list[Row], meta: dict[str, Any]) -> list[str]:
    out = [
        f"Square: Linf eps {SQUARE_EPS['linf']} (p_init {SQUARE_P['linf']}), L2 eps {SQUARE_EPS['l2']} (p_init "
        f"{SQUARE_P['l2']}), margin loss, one restart. Adversa: max_queries {SQUARE_QUERIES} per image, the "
        f"clean check and the start included, each sample stopping at its first success; the peers get "
        f"{SQUARE_QUERIES - 2} iterations (torchattacks n_queries, ART max_iter), the same number of "
        "proposals.",
        f"HopSkipJump: untargeted, {HSJ_QUERIES} queries per image. Adversa enforces the budget per sample "
        f"(steps {HSJ_STEPS} is never reached); ART (max_iter) and Foolbox (steps) take no query budget, so "
        "their iteration counts were set from their per-iteration cost to spend about as much; queries/img is "
        "what each really forwarded. Probes per iteration: min(100 sqrt(t), 10000) everywhere.",
        "queries/img: images forwarded through the model per input image (the initially misclassified ones "
        "included), counted by a wrapper around "
        "every implementation's module (for adversa, the kernel's own per-sample counts, checked against the "
        "classifier's counter); it includes clean checks and, for the peers, any redundant forwards. median "
        "queries (fooled): the median per-sample count over fooled images, adversa only.",
        f"fwd-limit ratio = attack seconds / (queries/img x n / {bench.chunk} x t_fwd), t_fwd = "
        f"{bench.t_fwd * 1e3:.2f} ms the median no-grad forward of a {bench.chunk}-image chunk: the overhead "
        "over spending the same queries in full chunks.",
        "success: fraction of the initially-correct images whose prediction on clip(x_adv, 0, 1) differs from "
        "the label (hosted model); success 8-bit: the same after round(x_adv * 255) / 255. Median L2 / Linf of "
        "clip(x_adv) - x over successful images: for HopSkipJump, the minimal-perturbation figure of merit. "
        "max norm / eps: the largest perturbation returned, over eps (Square).",
        f"seconds: median of {bench.repeats} timed run(s); other load: CPU cores other processes kept busy "
        "meanwhile (well above 0 = contention). Adversa rows run in chunks of "
        f"{bench.chunk}; peers run on the first {meta['peer_n']} images, adversa's HopSkipJump on the first "
        f"{meta['hsj_n']} (--hsj-n), and rows marked * restrict an adversa run to the peers' images.",
        f"Seeds: adversa torch.Generator().manual_seed({SEED}); peers after torch.manual_seed({SEED}), "
        f"np.random.seed({SEED}), random.seed({SEED}) (torchattacks Square also seed={SEED}).",
        "Known differences. Square: torchattacks follows the authors' code (one square position per "
        "iteration shared by the batch; positions exclude the last row/column); ART adds +-2 eps to the window "
        "and clips back to the ball, shares the position too, and forwards 3 times per iteration (the "
        "current point's loss again, the proposal, a robustness check of the whole batch). Adversa draws the "
        "square per sample and redraws a Linf proposal that would not change the image (as the authors' code). "
        "ART's L2 Square divides the new window by its norm budget instead of multiplying by it (and by "
        "zero once the budget is spent: the RuntimeWarnings), so its L2 proposals are mis-scaled and it "
        "succeeds less often. "
        "HopSkipJump: ART returns the last stepped point (after the step-size search, not projected back to "
        "the boundary, hence its high 8-bit success and larger norms) and runs image by image; its "
        "binary-search tolerance is 0.01/sqrt(d) (L2) / 0.01/d (Linf) instead of the paper's d^-1.5 / d^-2. "
        "Foolbox runs the whole batch through every search round until the slowest sample finishes and "
        "returns its last boundary point; it normalises its probe directions jointly over the batch "
        "(flatten(rv, keep=1) on a (probes, batch, ...) tensor), so each image's probe radius shrinks as "
        "1/sqrt(batch) and its result depends on the batch size: the per-image row is the method as "
        "published (on 12 images, median L2 1.25 in one batch of 12 against 0.69 one image at a time, "
        "16 steps, in a quick trial); its per-image boundary points can flip when judged here in a batch "
        "(float noise at the boundary: the cause of any Foolbox success below 100%). ART draws its starting "
        "noise from an unseeded np.random.RandomState(), so its rows vary from run to run, and a sample "
        "whose 100 noise draws all fail is returned unchanged. Adversa returns the "
        "nearest adversarial point it found, scaled out from x by 0.1% and queried again so that it keeps "
        "a logit margin (boundary points flipped when re-judged one image at a time); its starts are "
        "uniform noise (up to 100 draws per sample) and, "
        "for the samples noise never fools (uniform noise is classified 'bag' ~98% of the time, so bags "
        "rarely get a noise start), the nearest input of the batch with another prediction.",
    ]
    out += [f"* {r.implementation} {r.attack} {r.norm} ({r.batching}): {r.note}." for r in rows if r.note]
    bad = [r for r in rows if r.out_of_bounds or r.non_finite]
    out.append("Out-of-bounds or non-finite outputs: " + (
        ", ".join(f"{r.implementation} {r.attack} {r.norm}" for r in bad) if bad else "none."))
    return out


def metadata(bench: Bench, args: argparse.Namespace, wall: float) -> dict[str, Any]:
    n = len(bench.x)
    return {
        "model": MODEL, "split": SPLIT, "command": command_line("blackbox", None),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "n": n, "peer_n": min(args.peer_n, n), "hsj_n": min(args.hsj_n, n), "chunk": bench.chunk,
        "clean_accuracy": float(bench.correct.float().mean()), "t_fwd_seconds": bench.t_fwd,
        "wall_seconds": wall, "skip_peers": args.skip_peers, "repeats": bench.repeats,
        "square_eps": SQUARE_EPS, "square_p_init": SQUARE_P, "square_queries": SQUARE_QUERIES,
        "hsj_queries": HSJ_QUERIES, "hsj_steps": HSJ_STEPS, "hsj_evals": list(HSJ_EVALS),
    }


def write(out: Path, meta: dict[str, Any], rows: list[Row], text_table: str, note_lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"blackbox-{MODEL}"
    md = [
        f"# Black-box benchmark (Square, HopSkipJump): {MODEL}", "",
        f"Command: `{meta['command']}`", "",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, CPU, {meta['threads']} threads ({meta['cpu_count']} cores)",
        f"- {meta['n']} images of {SPLIT} (clean accuracy {meta['clean_accuracy']:.1%}); peers on the first "
        f"{meta['peer_n']}, adversa HopSkipJump on the first {meta['hsj_n']}; adversa chunk size "
        f"{meta['chunk']}",
        f"- total wall time of the benchmark: {meta['wall_seconds']:.0f} s", "",
        text_table, "", "## Notes", "",
        *[line if line.startswith("*") else f"- {line}" for line in note_lines], "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=512, help="test images for adversa's Square (default 512)")
    parser.add_argument("--hsj-n", type=int, default=128,
                        help="images for adversa's HopSkipJump, at most --n (default 128: 5000 queries each)")
    parser.add_argument("--peer-n", type=int, default=64, help="images for the peers (default 64)")
    parser.add_argument("--chunk", type=int, default=128, help="chunk size (default 128)")
    parser.add_argument("--skip-peers", action="store_true", help="benchmark adversa only")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per row (median kept)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    start = time.perf_counter()
    bench = load(args.n, args.chunk, args.repeats)
    runs = all_runs(bench, args.skip_peers, args.peer_n, args.hsj_n)
    rows = [score(bench, run) for run in runs]
    meta = metadata(bench, args, time.perf_counter() - start)
    text_table, note_lines = table(rows), notes(bench, rows, meta)
    print(f"{MODEL}: n={meta['n']}, chunk={meta['chunk']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"t_fwd={bench.t_fwd * 1e3:.2f} ms, wall {meta['wall_seconds']:.0f} s")
    print(text_table)
    print("\n".join(note_lines))
    write(args.out, meta, rows, text_table, note_lines)


if __name__ == "__main__":
    main()
