"""Attack benchmark: Adversa's FGSM / PGD / DeepFool kernels against torchattacks, ART and Foolbox.

Run with ``make bench`` or ``python -m bench.attacks [--model fmnist-resnet18]``; ``--n 64 --out
/tmp/benchsmoke`` is a quick smoke run. The classic per-image DeepFool loop (one backward per class
per image, as in the original reference code) is a baseline row, unclipped and clipped.

Every returned tensor is judged here, by the same code, whichever library produced it: clipped to
[0, 1] first (out-of-bounds values are reported), then classified by the hosted model. Writes
``attacks-<model>.md`` and ``attacks-<model>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from models.datasets import load_split
from models.manifest import CardIndex
from models.registry import load_module
from workers.attacks.base import AttackOutput
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.classifier import Classifier

MODEL = os.environ.get("ADVERSA_BENCH_MODEL", "fmnist-cnn")  # every bench module reads it
SPLIT = "fashion-mnist:test"
EPS = 0.1
PGD_STEPS = 20
PGD_ALPHA = 0.01
DF_STEPS = 50
DF_OVERSHOOT = 0.02
FB_REPS = 20
TA_PROBE = 16
TA_BUDGET_S = 600.0
SEED = 0
REPEATS = 3

Kernel = Callable[..., AttackOutput]
AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
T = TypeVar("T")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that made a result file: the model's variable when not the default, then the
    module and its arguments (``argv``; ``sys.argv[1:]`` when None)."""
    args = " ".join(sys.argv[1:] if argv is None else argv)
    prefix = f"ADVERSA_BENCH_MODEL={MODEL} " if MODEL != "fmnist-cnn" else ""
    return f"{prefix}.venv/bin/python -m bench.{module} {args}".strip()


@dataclass(frozen=True)
class Run:
    """One timed attack run: what it returned and what it cost."""

    implementation: str
    attack: str
    batching: str
    x_adv: torch.Tensor
    seconds: float
    others: float | None  # CPU cores used by other processes during the timed runs (contention)
    gradients: torch.Tensor | None = None  # per-sample gradient calls (adversa only)
    nominal_steps: int | None = None  # torchattacks: gradient steps per image, for the cost ratio
    note: str = ""


@dataclass(frozen=True)
class Row:
    implementation: str
    attack: str
    batching: str
    n: int
    seconds: float
    images_per_s: float
    other_cores: float | None
    attacked: int  # initially-correct images among the n
    success_rate: float
    out_of_bounds: bool
    max_bound_violation: float
    non_finite: bool
    median_l2: float | None
    median_linf: float | None
    success_rate_8bit: float
    grads_per_image: float | None
    cost_ratio: float | None
    full_budget_ratio: float | None
    note: str


@dataclass(frozen=True)
class Bench:
    """The data and the models every run shares."""

    x: torch.Tensor
    y: torch.Tensor
    correct: torch.Tensor  # (N,) bool: the clean prediction is right
    judge: nn.Module  # the hosted module, used only to classify returned tensors
    model: Classifier  # what our kernels attack
    ta_module: nn.Module  # a second copy of the module for torchattacks
    chunk: int
    t_fb: float  # median seconds of one forward+backward of a chunk (the lower of the measurements)
    repeats: int
    t_fb_measured: tuple[float, ...] = ()  # t_fb measured before and after the attack runs
    t_deepfool_floor: float | None = None  # seconds of DeepFool's first iteration on one chunk


# --- setup ---------------------------------------------------------------------------------------


def load(n: int, chunk: int, reps: int, repeats: int) -> Bench:
    directory = CardIndex.default().directory(MODEL)
    if directory is None:
        raise SystemExit(f"model {MODEL} is not hosted here")
    card, module = load_module(directory)
    _, ta_module = load_module(directory)
    model = Classifier(module, card.num_classes, card.input_shape, card.bounds, card.ref)
    x_np, y_np = load_split(SPLIT).slice(0, n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    with torch.no_grad():
        module(x[:chunk])  # warm-up forward
        ta_module(x[:chunk])
        correct = predict(module, x, chunk).eq(y)
    t_fb = time_forward_backward(module, x[:chunk], y[:chunk], reps)
    return Bench(x, y, correct, module, model, ta_module, chunk, t_fb, repeats, (t_fb,))


def remeasure(bench: Bench) -> Bench:
    """Measure t_fb again after the runs and keep the lower median (less disturbed by contention)."""
    again = time_forward_backward(bench.judge, bench.x[:bench.chunk], bench.y[:bench.chunk], FB_REPS)
    measured = (*bench.t_fb_measured, again)
    return replace(bench, t_fb=min(measured), t_fb_measured=measured)


def predict(module: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(part).argmax(dim=1) for part in x.split(chunk)])


def forward_backward(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One bare cross-entropy forward+backward of ``x`` (gradient with respect to the input only):
    the unit the cost ratios and the layout bench measure against."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        torch.autograd.grad(F.cross_entropy(module(xg), y, reduction="sum"), xg)


def time_forward_backward(module: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    """Median seconds of one cross-entropy forward+backward (gradient w.r.t. the input) of ``x``."""

    def once() -> float:
        start = time.perf_counter()
        forward_backward(module, x, y)
        return time.perf_counter() - start

    for _ in range(2):
        once()
    return statistics.median(once() for _ in range(reps))


# --- runs ----------------------------------------------------------------------------------------


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux ``/proc/stat``), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_round_robin(onces: list[Callable[[], Any]], repeats: int,
                     warm_up: bool = True) -> list[tuple[Any, float, float | None]]:
    """Run every ``once`` ``repeats`` times, round-robin (1, 2, ..., 1, 2, ...), and give each one's
    last result, its median wall time and the mean number of CPU cores other processes kept busy
    while it ran (a contention flag: near 0 on a quiet machine). The one timer of the benches.

    Round-robin because the machine's speed drifts by tens of percent over minutes: timing rows one
    after the other let that drift decide comparisons. One untimed run of each first when
    ``warm_up`` and ``repeats > 1``: without it, whichever row ran first paid for the allocator and
    autograd warm-up (measured: our FGSM 1.4x torchattacks in the table, equal in isolation)."""
    results = [once() if warm_up and repeats > 1 else None for once in onces]
    times: list[list[float]] = [[] for _ in onces]
    others = [0.0 for _ in onces]
    known = True
    for _ in range(repeats):
        for i, once in enumerate(onces):
            busy0, cpu0 = busy_seconds(), time.process_time()
            start = time.perf_counter()
            results[i] = once()
            times[i].append(time.perf_counter() - start)
            busy1, cpu1 = busy_seconds(), time.process_time()
            if busy0 is None or busy1 is None:
                known = False
            else:
                others[i] += max(0.0, busy1 - busy0 - (cpu1 - cpu0))
    return [(results[i], statistics.median(times[i]), others[i] / sum(times[i]) if known else None)
            for i in range(len(onces))]


def timed(fn: Callable[[], T], repeats: int, warm_up: bool = True) -> tuple[T, float, float | None]:
    """``fn()``'s result, its median wall time over ``repeats`` runs and the other load (see
    ``time_round_robin``)."""
    result, seconds, others = time_round_robin([fn], repeats, warm_up)[0]
    return result, seconds, others


@dataclass(frozen=True)
class Pending:
    """A row to time: ``once()`` runs the attack, ``finish(result, seconds, others)`` makes the Run."""

    once: Callable[[], Any]
    finish: Callable[[Any, float, float | None], Run]


def run_interleaved(pending: list[Pending], repeats: int) -> list[Run]:
    """Time every row ``repeats`` times, round-robin, and keep each row's median (``time_round_robin``)."""
    measured = time_round_robin([p.once for p in pending], repeats)
    return [p.finish(result, seconds, others)
            for p, (result, seconds, others) in zip(pending, measured, strict=True)]


def adversa_pending(bench: Bench, attack: str, kernel: Kernel, spec: Any, nominal: int | None) -> Pending:

    def once() -> tuple[torch.Tensor, list[AttackOutput]]:
        generator = torch.Generator().manual_seed(SEED)
        outs = [kernel(bench.model, xc, yc, spec, generator=generator)
                for xc, yc in zip(bench.x.split(bench.chunk), bench.y.split(bench.chunk), strict=True)]
        return torch.cat([o.x_adv for o in outs]), outs

    def finish(result: tuple[torch.Tensor, list[AttackOutput]], seconds: float, others: float | None) -> Run:
        x_adv, outs = result
        gradients = torch.cat([o.gradients for o in outs])
        return Run("adversa", attack, f"chunks of {bench.chunk}", x_adv, seconds, others, gradients, nominal)

    return Pending(once, finish)


def run_adversa(bench: Bench, attack: str, kernel: Kernel, spec: Any, nominal: int | None) -> Run:
    return run_interleaved([adversa_pending(bench, attack, kernel, spec, nominal)], bench.repeats)[0]


def deepfool_floor(bench: Bench, reps: int = FB_REPS) -> float:
    """Median seconds of DeepFool's first iteration alone on one chunk, done as cheaply as autograd
    allows: one forward pass and one backward pass per other class (9), through one graph. Every
    exact DeepFool over all 10 classes pays at least this per chunk, whoever implements it."""
    x = bench.x[:bench.chunk]
    k = bench.model.num_classes

    def once() -> float:
        start = time.perf_counter()
        logits, vjp = bench.model.linearize(x)
        for c in range(1, k):
            cot = torch.zeros_like(logits)
            cot[:, c] = 1.0
            cot[:, 0] -= 1.0
            vjp(cot, c == k - 1)
        return time.perf_counter() - start

    for _ in range(2):
        once()
    return statistics.median(once() for _ in range(reps))


def same_images(run: Run, m: int) -> Run:
    """Adversa's row restricted to the first ``m`` images (the slow peers' subset), seconds pro rata."""
    n = len(run.x_adv)
    gradients = run.gradients[:m] if run.gradients is not None else None
    return replace(run, x_adv=run.x_adv[:m], seconds=run.seconds * m / n, gradients=gradients,
                   note=f"first {m} images of the {n}-image run above (the peers' images), seconds pro rata")


def peer_pending(bench: Bench, attack: str, make: Callable[[nn.Module], AttackFn], m: int,
                 chunked: bool, nominal: int | None, note: str = "",
                 implementation: str = "torchattacks", module: nn.Module | None = None) -> Pending:
    """``make(module)(x, y)`` on the first ``m`` images, in one call or in chunks."""
    atk = make(module if module is not None else bench.ta_module)
    x, y = bench.x[:m], bench.y[:m]
    size = bench.chunk if chunked else m

    def once() -> torch.Tensor:
        torch.manual_seed(SEED)
        return torch.cat([atk(xc, yc) for xc, yc in zip(x.split(size), y.split(size), strict=True)])

    def finish(x_adv: torch.Tensor, seconds: float, others: float | None) -> Run:
        batching = f"chunks of {bench.chunk}" if chunked else f"one call of {m}"
        return Run(implementation, attack, batching, x_adv.detach(), seconds, others, None, nominal, note)

    return Pending(once, finish)


def run_torchattacks(bench: Bench, attack: str, make: Callable[[nn.Module], AttackFn], m: int,
                     chunked: bool, nominal: int | None, note: str = "",
                     implementation: str = "torchattacks", module: nn.Module | None = None) -> Run:
    """Time ``make(module)(x, y)`` on the first ``m`` images, in one call or in chunks."""
    pending = peer_pending(bench, attack, make, m, chunked, nominal, note, implementation, module)
    return run_interleaved([pending], bench.repeats)[0]


def torchattacks_makers() -> dict[str, tuple[Callable[[nn.Module], AttackFn], int | None]]:
    import torchattacks  # optional dependency (the ``bench`` extra)

    return {
        "FGSM": (lambda m: torchattacks.FGSM(m, eps=EPS), 1),
        "PGD": (lambda m: torchattacks.PGD(m, eps=EPS, alpha=PGD_ALPHA, steps=PGD_STEPS, random_start=True),
                PGD_STEPS),
        "DeepFool": (lambda m: torchattacks.DeepFool(m, steps=DF_STEPS, overshoot=DF_OVERSHOOT), None),
    }


def deepfool_subset(bench: Bench, make: Callable[[nn.Module], AttackFn]) -> tuple[int, str]:
    """How many images torchattacks DeepFool gets: all, unless a probe predicts > TA_BUDGET_S."""
    n = len(bench.x)
    probe = min(TA_PROBE, n)
    start = time.perf_counter()
    make(bench.ta_module)(bench.x[:probe], bench.y[:probe])
    estimate = (time.perf_counter() - start) * n / probe
    if estimate <= TA_BUDGET_S or n <= bench.chunk:
        return n, ""
    return bench.chunk, (f"first {bench.chunk} images only: a probe on {probe} images predicted "
                         f"{estimate:.0f} s for {n}")


def fresh_module() -> nn.Module:
    directory = CardIndex.default().directory(MODEL)
    assert directory is not None
    return load_module(directory)[1]


def peer_pendings(bench: Bench, peers: list[str], peer_n: int) -> list[Pending]:
    """ART and Foolbox (in chunks, their usual batching) and the per-image reference DeepFool."""
    from bench import peers as peer_lib

    runs = []
    m = min(peer_n, len(bench.x))
    makers = {}
    if "art" in peers:
        makers["art"] = peer_lib.art_makers(EPS, PGD_STEPS, PGD_ALPHA, DF_STEPS, DF_OVERSHOOT, bench.chunk)
    if "foolbox" in peers:
        makers["foolbox"] = peer_lib.foolbox_makers(EPS, PGD_STEPS, PGD_ALPHA, DF_STEPS, DF_OVERSHOOT)
    for name, table_ in makers.items():
        for attack, (make, nominal) in table_.items():
            n_rows = m if attack == "DeepFool" else len(bench.x)
            note = f"first {n_rows} images" if n_rows < len(bench.x) else ""
            runs.append(peer_pending(bench, attack, make, n_rows, True, nominal, note,
                                     implementation=name, module=fresh_module()))
    if "reference" in peers:
        for clip in (False, True):
            def make(module: nn.Module, clip: bool = clip) -> AttackFn:
                return lambda x, y: peer_lib.reference_deepfool(module, x, y, overshoot=DF_OVERSHOOT,
                                                                max_iter=DF_STEPS, clip=clip)
            runs.append(peer_pending(
                bench, "DeepFool", make, m, False, None,
                f"classic per-image loop, {'clipped to [0, 1] every iterate' if clip else 'never clipped'}; "
                f"first {m} images", implementation="reference", module=fresh_module()))
    return runs


def all_pendings(bench: Bench, skip_torchattacks: bool) -> list[Pending]:
    pgd_spec = PGDSpec(eps=EPS, norm="linf", steps=PGD_STEPS, step_size=PGD_ALPHA, random_start=True)
    df_spec = DeepFoolSpec(norm="l2", overshoot=DF_OVERSHOOT, max_iter=DF_STEPS, candidates=10)
    runs = [
        adversa_pending(bench, "FGSM", fgsm, FGSMSpec(eps=EPS, check=False), 1),
        adversa_pending(bench, "PGD", pgd, pgd_spec, PGD_STEPS),
        # Every sample runs every step: the cost ratio is then the kernel's own overhead per step.
        adversa_pending(bench, "PGD (no early stop)", pgd, replace(pgd_spec, early_stop=False), PGD_STEPS),
        adversa_pending(bench, "DeepFool", deepfool, df_spec, None),
    ]
    if skip_torchattacks:
        return runs
    for attack, (make, nominal) in torchattacks_makers().items():
        m, note = deepfool_subset(bench, make) if attack == "DeepFool" else (len(bench.x), "")
        for chunked in (False, True):
            runs.append(peer_pending(bench, attack, make, m, chunked, nominal, note))
    return runs


# --- judging -------------------------------------------------------------------------------------


def median_or_none(values: torch.Tensor) -> float | None:
    return float(values.median()) if values.numel() else None


def success_rate(bench: Bench, x_adv: torch.Tensor, correct: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample success: initially correct and now predicted differently from the label."""
    return correct & predict(bench.judge, x_adv, bench.chunk).ne(y)


def ratios(bench: Bench, run: Run, m: int) -> tuple[float | None, float | None]:
    """(cost ratio, full-budget ratio); see the notes in the report for the definitions."""
    batch = min(bench.chunk, len(bench.x))
    full = run.seconds / (run.nominal_steps * (m / batch) * bench.t_fb) if run.nominal_steps else None
    if run.gradients is None:
        return full, None
    ideal = float(run.gradients.sum()) / batch * bench.t_fb
    return (run.seconds / ideal if ideal > 0 else None), full


def score(bench: Bench, run: Run) -> Row:
    m = len(run.x_adv)
    x, y, correct = bench.x[:m], bench.y[:m], bench.correct[:m]
    raw = run.x_adv.detach().float()
    finite = bool(torch.isfinite(raw).all())
    violation = float(torch.maximum(raw - 1.0, -raw).clamp_min(0).nan_to_num(float("inf")).max())
    x_adv = raw.clamp(0.0, 1.0)
    ok = success_rate(bench, x_adv, correct, y)
    ok_8bit = success_rate(bench, torch.round(x_adv * 255) / 255, correct, y)
    delta = (x_adv - x)[ok].flatten(1)
    attacked = int(correct.sum())
    cost, full = ratios(bench, run, m)
    return Row(
        implementation=run.implementation, attack=run.attack, batching=run.batching, n=m,
        seconds=run.seconds, images_per_s=m / run.seconds, other_cores=run.others, attacked=attacked,
        success_rate=int(ok.sum()) / max(attacked, 1), out_of_bounds=violation > 0,
        max_bound_violation=violation, non_finite=not finite,
        median_l2=median_or_none(delta.norm(p=2, dim=1)),
        median_linf=median_or_none(delta.abs().amax(dim=1)),
        success_rate_8bit=int(ok_8bit.sum()) / max(attacked, 1),
        grads_per_image=float(run.gradients.float().mean()) if run.gradients is not None else None,
        cost_ratio=cost, full_budget_ratio=full, note=run.note,
    )


# --- report --------------------------------------------------------------------------------------

HEADER = ("implementation", "attack", "batching", "n", "seconds", "images/s", "other load", "success",
          "out of [0,1]", "median L2", "median Linf", "success 8-bit", "grads/img", "cost ratio",
          "full-budget ratio")


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        oob = f"yes (max {r.max_bound_violation:.2g})" if r.out_of_bounds else "no"
        if r.non_finite:
            oob += ", non-finite"
        n = f"{r.n}*" if r.note else str(r.n)
        cells = (r.implementation, r.attack, r.batching, n, fmt(r.seconds, 2), fmt(r.images_per_s, 1),
                 fmt(r.other_cores, 2),
                 f"{r.success_rate:.1%}", oob, fmt(r.median_l2), fmt(r.median_linf),
                 f"{r.success_rate_8bit:.1%}", fmt(r.grads_per_image, 2), fmt(r.cost_ratio, 2),
                 fmt(r.full_budget_ratio, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(bench: Bench, rows: list[Row]) -> list[str]:
    out = [
        f"seconds: median of {bench.repeats} timed run(s) per row, the rows timed round-robin (every row "
        "once, then every row again, ...) so that the machine's drift over minutes hits all rows alike; "
        "one untimed warm-up run per row first. other load: mean number "
        "of CPU cores that other processes kept busy during the timed runs (from /proc/stat); well above 0 "
        "means the timing was disturbed by contention.",
        f"Adversa kernels are called in chunks of {bench.chunk} (the worker's way); torchattacks runs "
        f"both as one call on the whole batch and in chunks of {bench.chunk}.",
        "success: fraction of the initially-correct images whose prediction on clip(x_adv, 0, 1) differs "
        "from the label, judged here by the hosted model for every row; success 8-bit: the same after "
        "x_q = round(x_adv * 255) / 255. Median L2 / Linf of (clip(x_adv) - x) over successful images.",
        f"t_fb (median of {FB_REPS} forward+backward of a {min(bench.chunk, len(bench.x))}-image chunk, "
        f"cross-entropy, gradient w.r.t. the input) = {bench.t_fb * 1e3:.2f} ms: the lower of the medians "
        "measured before and after the attack runs ("
        + ", ".join(f"{t * 1e3:.2f}" for t in bench.t_fb_measured) + " ms).",
        "cost ratio (adversa) = attack seconds / ((sum of per-sample gradient calls / chunk) x t_fb). "
        "For DeepFool the candidate-class backward passes of one iteration share one forward pass, so "
        "each counts as a gradient call here and the ideal time is overstated (the ratio is flattering).",
        f"full-budget ratio = attack seconds / (nominal steps x n / chunk x t_fb), nominal steps 1 for "
        f"FGSM and {PGD_STEPS} for PGD, as the issue defines it. Adversa's PGD stops early per sample, so "
        "it spends fewer gradient steps than the nominal budget; its full-budget ratio can fall below 1. "
        "'PGD (no early stop)' runs all steps on every sample: its ratio is the kernel's own overhead.",
        "torchattacks DeepFool has no cost ratio: it loops over images and over classes (one backward "
        "per class per image per iteration), with no fixed number of gradient steps to compare against.",
        f"eps = {EPS} (Linf) for FGSM and PGD (alpha {PGD_ALPHA}, {PGD_STEPS} steps, random start); "
        f"DeepFool L2, overshoot {DF_OVERSHOOT}, at most {DF_STEPS} iterations, all classes as candidates "
        "(adversa: its defaults, a first step damped to 0.6, then full steps following the nearest boundary). "
        f"Random starts: adversa from torch.Generator().manual_seed({SEED}); torchattacks after "
        f"torch.manual_seed({SEED}).",
    ]
    if bench.t_deepfool_floor is not None:
        batch = min(bench.chunk, len(bench.x))
        ceiling = batch / bench.t_deepfool_floor
        line = (f"DeepFool floor: the first iteration alone (one forward, 9 class backward passes through "
                f"its graph, {batch} images) takes {bench.t_deepfool_floor * 1e3:.1f} ms, so no exact "
                f"10-class DeepFool can exceed {ceiling:.0f} images/s on this machine")
        peers = [r for r in rows
                 if r.attack == "DeepFool" and r.implementation in ("art", "foolbox", "torchattacks")]
        if peers:
            line += "; that ceiling is " + ", ".join(
                f"{ceiling / r.images_per_s:.1f}x {r.implementation} ({r.batching})" for r in peers)
        out.append(line + ".")
    out += [f"* {r.implementation} {r.attack} ({r.batching}): {r.note}." for r in rows if r.note]
    bad = [r for r in rows if r.out_of_bounds or r.non_finite]
    out.append("Out-of-bounds or non-finite outputs: " + (
        ", ".join(f"{r.implementation} {r.attack} ({r.batching})" for r in bad) if bad else "none."))
    return out


def metadata(bench: Bench, args: argparse.Namespace, wall: float) -> dict[str, Any]:
    return {
        "model": MODEL, "split": SPLIT, "command": args.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "n": len(bench.x), "chunk": bench.chunk, "clean_accuracy": float(bench.correct.float().mean()),
        "t_fb_seconds": bench.t_fb, "t_fb_measured": list(bench.t_fb_measured), "fb_reps": FB_REPS,
        "t_deepfool_floor_seconds": bench.t_deepfool_floor,
        "wall_seconds": wall,
        "skip_torchattacks": args.skip_torchattacks, "repeats": bench.repeats,
        "cpu_count": os.cpu_count(),
    }


def write(out: Path, meta: dict[str, Any], rows: list[Row], text_table: str, note_lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attacks-{MODEL}"
    md = [
        f"# Attack benchmark: {MODEL}", "",
        f"Command: `{meta['command']}`", "",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, CPU, {meta['threads']} threads ({meta['cpu_count']} cores)",
        f"- {meta['n']} images of {SPLIT} (clean accuracy {meta['clean_accuracy']:.1%}), "
        f"adversa chunk size {meta['chunk']}",
        f"- total wall time of the benchmark: {meta['wall_seconds']:.0f} s", "",
        text_table, "", "## Notes", "",
        *[line if line.startswith("*") else f"- {line}" for line in note_lines], "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=512, help="number of test images (default 512)")
    parser.add_argument("--chunk", type=int, default=128, help="chunk size (default 128)")
    parser.add_argument("--skip-torchattacks", action="store_true", help="benchmark adversa only")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per row (median kept)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    parser.add_argument("--model", default=MODEL, help="hosted model (default fmnist-cnn)")
    parser.add_argument("--peers", default="art,foolbox,reference",
                        help="comma-separated extra peers: art, foolbox, reference ('' for none)")
    parser.add_argument("--peer-n", type=int, default=128,
                        help="images for the slow rows: the per-image reference and peers' DeepFool")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    global MODEL
    MODEL = args.model
    args.command = command_line("attacks", argv)
    start = time.perf_counter()
    bench = load(args.n, args.chunk, FB_REPS, args.repeats)
    pending = all_pendings(bench, args.skip_torchattacks)
    pending += peer_pendings(bench, [p for p in args.peers.split(",") if p], args.peer_n)
    runs = run_interleaved(pending, bench.repeats)
    row = next(i for i, r in enumerate(runs) if r.implementation == "adversa" and r.attack == "DeepFool")
    if args.peer_n < len(bench.x):
        runs.insert(row + 1, same_images(runs[row], args.peer_n))
    bench = replace(bench, t_deepfool_floor=deepfool_floor(bench))
    bench = remeasure(bench)
    rows = [score(bench, run) for run in runs]
    meta = metadata(bench, args, time.perf_counter() - start)
    text_table, note_lines = table(rows), notes(bench, rows)
    print(f"{MODEL}: n={meta['n']}, chunk={meta['chunk']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"t_fb={bench.t_fb * 1e3:.2f} ms, wall {meta['wall_seconds']:.0f} s")
    print(text_table)
    print("\n".join(note_lines))
    write(args.out, meta, rows, text_table, note_lines)


if __name__ == "__main__":
    main()
