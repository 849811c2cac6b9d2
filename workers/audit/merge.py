"""Merge the chunks of an audit into its result: robust-accuracy curves (per attack and the worst
case), per-class table, minimal perturbations, detector and transfer figures, and the
gradient-masking checks with their evidence. numpy only (no torch).

Every proportion also gets its sample count and 95% Wilson interval in ``result["intervals"]``,
which mirrors the figures it qualifies (``intervals.robust_accuracy["linf:0.1"]`` for
``robust_accuracy["linf:0.1"]``): 100 images cannot tell 0.40 from 0.50, and a gate may say so."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.gate import EPS_REL_TOL, eps_key
from workers.audit.intervals import interval


@dataclass(frozen=True)
class Tolerances:
    """When a check warns (fractions are of the initially correct samples)."""

    single_step_only: float = 0.01
    black_box_only: int = 0
    more_steps: float = 0.01
    unbounded_success: float = 0.99
    zero_gradients: float = 0.01


@dataclass
class Chunk:
    """One chunk's per-sample arrays (numpy) and evidence counters: what the battery returns, what
    a chunk job stores and what the merge reads back (torch-free, so the merge needs no torch)."""

    labels: np.ndarray
    clean_pred: np.ndarray
    # norm -> (stages, eps, n) bool: robust to that stage at that eps (initially wrong: False)
    robust: dict[str, np.ndarray] = field(default_factory=dict)
    # norm -> (eps, n) int: index of the first stage that broke the sample at that eps, -1 none
    broken_by: dict[str, np.ndarray] = field(default_factory=dict)
    # norm -> (eps, k, C, H, W) worst-case example of the first k samples at every eps, and
    # (eps, k) its predicted class; the k clean images
    images: dict[str, np.ndarray] = field(default_factory=dict)
    image_preds: dict[str, np.ndarray] = field(default_factory=dict)
    clean_images: np.ndarray | None = None
    # minimal stage name -> (n,) perturbation norm of a successful example (inf: none; nan: wrong)
    minimal: dict[str, np.ndarray] = field(default_factory=dict)
    # norm -> (eps, n) bool: the worst-case example is flagged by the detector; (stages, eps, n):
    # each stage's own example is
    flagged: dict[str, np.ndarray] = field(default_factory=dict)
    flagged_by_stage: dict[str, np.ndarray] = field(default_factory=dict)
    clean_flagged: np.ndarray | None = None
    # norm -> (eps, n) bool: the adaptive adversary (the oblivious worst case or the joint attack on
    # model and detector, ``battery.adaptive_evasions``) has a misclassified, unflagged example
    evaded_adaptive: dict[str, np.ndarray] = field(default_factory=dict)
    transfer: dict[str, np.ndarray] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    bpda: bool = False
    eot: bool = False
    # False: the inputs came without labels and ``labels`` are the model's own clean predictions
    labelled: bool = True
    # what was attacked: the input bounds and the shape of one input (None: a chunk from before
    # they were recorded); the Linf eps of the transfer attack (None: none ran)
    bounds: tuple[float, float] | None = None
    input_shape: tuple[int, ...] | None = None
    transfer_eps: float | None = None
    started_at: float | None = None  # Unix time the chunk job started


def _cat(parts: Sequence[np.ndarray], axis: int = -1) -> np.ndarray:
    return np.concatenate(list(parts), axis=axis)


def _rate(hits: np.ndarray, total: int) -> float | None:
    return round(float(hits.sum()) / total, 4) if total else None


def _interval(hits: np.ndarray, total: int) -> dict[str, Any] | None:
    """The 95% Wilson interval that goes with ``_rate(hits, total)``."""
    return interval(int(hits.sum()), total)


def merge(chunks: Sequence[Chunk], grids: Mapping[str, Sequence[float]], stages: Mapping[str, Sequence[str]],
          minimal_norms: Mapping[str, str], classes: Sequence[str], tolerances: Tolerances | None = None,
          detector: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The audit result (the fields ``render_report`` and ``evaluate_gate`` read).

    ``stages[norm]`` names the bounded attacks in suite order; ``minimal_norms`` maps each minimal
    attack to the norm its perturbation is measured in.
    """
    tol = tolerances or Tolerances()
    labels = _cat([c.labels for c in chunks])
    clean_pred = _cat([c.clean_pred for c in chunks])
    correct = labels == clean_pred
    n, n_correct = int(labels.size), int(correct.sum())
    counters: dict[str, float] = {}
    for c in chunks:
        for key, value in c.counters.items():
            if key in ("random_max_logit_diff", "median_gradient_norm") or key.startswith(
                    ("more_steps_eps", "more_steps_steps", "more_steps_restarts")):
                counters[key] = max(counters.get(key, 0.0), value)
            else:
                counters[key] = counters.get(key, 0.0) + value
    # Without labels, "correct" means "the model's own prediction": clean accuracy is 1 by
    # construction and says nothing, so it is null (robust accuracy still measures how often an
    # attack changes the prediction).
    labelled = all(c.labelled for c in chunks)
    result: dict[str, Any] = {"n": n, "labels": "given" if labelled else "predicted",  # as attack scores
                              "clean_accuracy": _rate(correct, n) if labelled else None, "curves": {},
                              "robust_accuracy": {}, "bpda": any(c.bpda for c in chunks),
                              "eot": any(c.eot for c in chunks)}
    intervals: dict[str, Any] = {"clean_accuracy": _interval(correct, n) if labelled else None,
                                 "robust_accuracy": {}, "curves": {}}
    worst_by_norm: dict[str, np.ndarray] = {}
    for norm, grid in grids.items():
        labels_eps = [eps_key(norm, e).split(":", 1)[1] for e in grid]
        curve: dict[str, Any] = {"eps": [float(e) for e in grid], "labels": labels_eps, "attacks": {}}
        bands: dict[str, Any] = {"attacks": {}}
        columns = []
        if stages.get(norm):
            robust = _cat([c.robust[norm] for c in chunks])  # (stages, eps, n)
            for s, name in enumerate(stages[norm]):
                curve["attacks"][name] = [_rate(robust[s, e], n) for e in range(len(grid))]
                bands["attacks"][name] = [_interval(robust[s, e], n) for e in range(len(grid))]
            columns.append(np.asarray(robust.all(0))[None])
        for name, metric in minimal_norms.items():
            if metric != norm:
                continue
            sizes = _cat([c.minimal[name] for c in chunks])
            held: np.ndarray = np.stack([correct & ~(sizes <= e) for e in grid])  # failures count as robust
            curve["attacks"][name] = [_rate(held[e], n) for e in range(len(grid))]
            bands["attacks"][name] = [_interval(held[e], n) for e in range(len(grid))]
            columns.append(held[None])
        if not columns:
            continue
        worst: np.ndarray = np.asarray(np.concatenate(columns, 0).all(0))
        worst_by_norm[norm] = worst
        curve["worst_case"] = [_rate(worst[e], n) for e in range(len(grid))]
        bands["worst_case"] = [_interval(worst[e], n) for e in range(len(grid))]
        result["curves"][norm] = curve
        intervals["curves"][norm] = bands
        for e, eps in enumerate(grid):
            result["robust_accuracy"][eps_key(norm, eps)] = _rate(worst[e], n)
            intervals["robust_accuracy"][eps_key(norm, eps)] = _interval(worst[e], n)

    result["per_class"] = []
    for k, name in enumerate(classes):
        mask = labels == k
        if not mask.any():
            continue
        row: dict[str, Any] = {"class": k, "name": name, "n": int(mask.sum()),
                               "clean_accuracy": _rate(correct[mask], int(mask.sum())) if labelled else None,
                               "robust_accuracy": {}}
        row["intervals"] = {"clean_accuracy": _interval(correct[mask], int(mask.sum())) if labelled else None,
                            "robust_accuracy": {}}
        for norm, worst in worst_by_norm.items():
            for e, eps in enumerate(grids[norm]):
                row["robust_accuracy"][eps_key(norm, eps)] = _rate(worst[e][mask], int(mask.sum()))
                row["intervals"]["robust_accuracy"][eps_key(norm, eps)] = _interval(worst[e][mask],
                                                                                    int(mask.sum()))
        result["per_class"].append(row)

    result["minimal"] = None
    if minimal_norms:
        result["minimal"] = {}
        intervals["minimal_success_rate"] = {}
        for name, metric in minimal_norms.items():
            sizes = _cat([c.minimal[name] for c in chunks])[correct]
            found = sizes[np.isfinite(sizes)]
            intervals["minimal_success_rate"][name] = _interval(np.isfinite(sizes), n_correct)
            result["minimal"][name] = {
                "success_rate": _rate(np.isfinite(sizes), n_correct),
                f"median_{metric}": round(float(np.median(found)), 5) if found.size else None,
                f"mean_{metric}": round(float(found.mean()), 5) if found.size else None,
            }

    result["detector"] = None
    if detector is not None and worst_by_norm:
        info = _detector_info(detector, counters)
        clean_flagged = _cat([c.clean_flagged for c in chunks if c.clean_flagged is not None])
        info["clean_rejection_rate"] = _rate(clean_flagged, n)
        intervals["clean_rejection_rate"] = _interval(clean_flagged, n)
        intervals["detection_rate"], intervals["detect_reject_accuracy"] = {}, {}
        intervals["adaptive_detect_reject_accuracy"] = {}
        for norm, worst in worst_by_norm.items():
            flagged = _cat([c.flagged[norm] for c in chunks])
            parts = [c.evaded_adaptive.get(norm) for c in chunks]
            evaded = _cat([p for p in parts if p is not None]) if all(p is not None for p in parts) else None
            for e, eps in enumerate(grids[norm]):
                broken = correct & ~worst[e]
                key = eps_key(norm, eps)
                info["detection_rate"][key] = _rate(flagged[e] & broken, int(broken.sum()))
                intervals["detection_rate"][key] = _interval(flagged[e] & broken, int(broken.sum()))
                # An attacked input counts as stopped if it is classified correctly or rejected.
                stopped = worst[e] | (broken & flagged[e])
                info["detect_reject_accuracy"][key] = _rate(stopped, n)
                intervals["detect_reject_accuracy"][key] = _interval(stopped, n)
                if evaded is not None:  # the adaptive adversary also has the oblivious examples
                    adaptive = stopped & ~evaded[e]
                    info["adaptive_detect_reject_accuracy"][key] = _rate(adaptive, n)
                    intervals["adaptive_detect_reject_accuracy"][key] = _interval(adaptive, n)
            by_stage = [c.flagged_by_stage.get(norm) for c in chunks]
            if stages.get(norm) and all(f is not None for f in by_stage):
                flags = _cat([f for f in by_stage if f is not None])  # (stages, eps, n)
                robust = _cat([c.robust[norm] for c in chunks])
                for s, name in enumerate(stages[norm]):
                    rates = info["detection_rate_by_attack"].setdefault(name, {})
                    for e, eps in enumerate(grids[norm]):
                        hit = correct & ~robust[s, e]
                        rates[eps_key(norm, eps)] = _rate(flags[s, e] & hit, int(hit.sum()))
        result["detector"] = info

    transfers = sorted({name for c in chunks for name in c.transfer})
    transfer_eps = next((c.transfer_eps for c in chunks if c.transfer_eps is not None), None)
    result["transfer"] = [
        {"surrogate": name, "eps_label": None if transfer_eps is None else eps_key("linf", transfer_eps),
         "success_rate": _rate(_cat([c.transfer[name] for c in chunks]), n_correct)}
        for name in transfers] or None
    if transfers:
        intervals["transfer_success_rate"] = {
            name: _interval(_cat([c.transfer[name] for c in chunks]), n_correct) for name in transfers}
    result["intervals"] = intervals
    attacked = next(((c.bounds, c.input_shape) for c in chunks if c.bounds is not None), None)
    reach = {norm: budget for norm in grids
             if attacked is not None and (budget := reach_eps(norm, *attacked)) is not None}
    result["masking_checks"] = masking_checks(counters, result, grids, stages, n_correct, tol, reach)
    result["counters"] = counters
    return result


def _detector_info(detector: Mapping[str, Any], counters: Mapping[str, float]) -> dict[str, Any]:
    """The detector section's frame: the detector's settings and which attack each figure answers.

    ``detection_rate``, ``detection_rate_by_attack`` and ``detect_reject_accuracy``: *oblivious*,
    the suite's examples, made without knowledge of the detector. ``adaptive_detect_reject_accuracy``:
    *adaptive*, an attacker who also knows the detector (``workers.attacks.squeeze_adaptive``,
    and the oblivious examples where those already pass it): the figure to trust."""
    settings = {k: v for k, v in detector.items() if k != "adaptive_steps"}
    steps = detector.get("adaptive_steps")
    return {
        **settings, "detection_rate": {}, "detect_reject_accuracy": {}, "detection_rate_by_attack": {},
        "adaptive_detect_reject_accuracy": {},
        "evaluations": {
            "oblivious": "the suite's worst-case example per sample; the attacks do not know the detector "
                         "(detection_rate, detection_rate_by_attack, detect_reject_accuracy)",
            "adaptive": "squeeze-adaptive: PGD on model and detector jointly, BPDA through the squeezers "
                        "(Carlini & Wagner 2017; Tramer et al. 2020), or the oblivious example where that "
                        "already passes the detector (adaptive_detect_reject_accuracy)"},
        "adaptive": {"attack": "squeeze-adaptive", "steps": steps,
                     "sample_eps_attacked": int(counters.get("adaptive_attacked", 0.0)),
                     "sample_eps_evaded": int(counters.get("adaptive_evaded", 0.0)),
                     "seconds": round(counters.get("seconds_adaptive", 0.0), 3)},
    }


def _check(name: str, status: bool | str, evidence: str, **values: Any) -> dict[str, Any]:
    """A check's row; ``status`` True/False for warn/pass, or ``"n/a"`` where the audit could not
    tell (no evidence either way: it counts as neither)."""
    if isinstance(status, bool):
        status = "warn" if status else "pass"
    return {"name": name, "status": status, "evidence": evidence, "values": values}


def reach_eps(norm: str, bounds: tuple[float, float] | None, input_shape: Sequence[int] | None) -> float | None:
    """The budget that reaches every point of the input box from any input: there, an attack
    must succeed on every sample (of a model that does not predict one class everywhere), as the
    unbounded attack must. The range of the bounds in Linf, times sqrt(C x H x W) in L2; None when
    the bounds (or, for L2, the input shape) are not known."""
    if bounds is None:
        return None
    span = bounds[1] - bounds[0]
    if norm == "linf":
        return span
    if norm == "l2" and input_shape is not None:
        return span * math.sqrt(math.prod(input_shape))
    return None


def masking_checks(counters: Mapping[str, float], result: Mapping[str, Any],
                   grids: Mapping[str, Sequence[float]], stages: Mapping[str, Sequence[str]], n_correct: int,
                   tol: Tolerances, reach: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Each check as pass/warn/n/a with the evidence (Carlini et al. 2019's checklist).

    ``reach[norm]``: see ``reach_eps``; growth of success with eps is judged at grid points from
    there on, where it must be total, and is n/a on a grid that stops short of it (a robust
    model's curve may genuinely level off above zero there).
    """
    checks = []
    base = max(n_correct, 1)
    single = {k.split("@", 1)[1]: v for k, v in counters.items() if k.startswith("single_step_only@")}
    if single:
        where, worst = max(single.items(), key=lambda kv: kv[1])
        checks.append(_check(
            "iterative-not-weaker-than-single-step", worst > max(1.0, tol.single_step_only * base),
            f"FGSM broke {int(worst)} sample(s) that no iterative attack broke (worst at {where}); "
            f"tolerance: 1 sample or {tol.single_step_only:.0%} of {n_correct} correct", by_eps=single))
    for norm, grid in grids.items():
        curve = result["curves"].get(norm)
        if not curve:
            continue
        checks.append(_growth_check(norm, grid, curve["worst_case"], (reach or {}).get(norm),
                                    int(result["n"]), n_correct, tol))
    attacked = counters.get("unbounded_attacked", 0.0)
    if attacked:
        rate = counters.get("unbounded_broken", 0.0) / attacked
        checks.append(_check(
            "unbounded-attack-succeeds", rate < tol.unbounded_success,
            f"PGD over the whole input range (no random start) broke {rate:.1%} of {int(attacked)} samples "
            f"(expected at least {tol.unbounded_success:.0%}): below that, gradients do not lead anywhere",
            success_rate=round(rate, 4)))
    black = {k.split("@", 1)[1]: v for k, v in counters.items() if k.startswith("black_box_only@")}
    if black:
        total = sum(black.values())
        where = max(black.items(), key=lambda kv: kv[1])[0]
        checks.append(_check(
            "white-box-beats-black-box", total > tol.black_box_only,
            f"black-box attacks broke {int(total)} sample-eps pair(s) that every white-box attack failed "
            f"on (most at {where})", by_eps=black))
    for norm in grids:
        key = f"more_steps_attacked@{norm}"
        if key in counters:
            checks.append(_more_steps_check(norm, counters, base, tol))
    zero = counters.get("zero_gradients", 0.0)
    checks.append(_check(
        "gradients-not-vanishing", zero > tol.zero_gradients * base,
        f"{int(zero)} of {n_correct} correct samples have an exactly zero input gradient of the "
        f"cross-entropy ({int(counters.get('tiny_gradients', 0.0))} below 1e-6 per unit of the input range; "
        f"median norm "
        f"{counters.get('median_gradient_norm', 0.0):.3g}; mean L1 of the logits "
        f"{counters.get('mean_l1_logits', 0.0) / max(counters.get('n', 1.0), 1.0):.3g})",
        zero=int(zero)))
    diff = counters.get("random_max_logit_diff", 0.0)
    checks.append(_check(
        "deterministic-forward-pass", diff > 1e-5,
        "the same inputs gave the same logits" if diff <= 1e-5 else
        f"the same inputs gave logits up to {diff:.3g} apart: the model is randomized, white-box "
        "stages used EOT", max_logit_diff=diff))
    return {"status": "warn" if any(c["status"] == "warn" for c in checks) else "pass", "checks": checks}


def _growth_check(norm: str, grid: Sequence[float], worst_case: Sequence[float | None], reach: float | None,
                  n: int, n_correct: int, tol: Tolerances) -> dict[str, Any]:
    name = f"success-grows-with-eps-{norm}"
    at = [e for e, eps in enumerate(grid) if reach is not None and eps >= reach * (1 - EPS_REL_TOL)]
    if not at:
        where = "is not known" if reach is None else f"is {eps_key(norm, reach)}"
        return _check(name, "n/a", f"the {norm} grid ends at {eps_key(norm, grid[-1])}, which does not reach "
                                   f"every input (the budget that does {where}): robust accuracy may "
                                   "genuinely stay above zero below it; see unbounded-attack-succeeds",
                      curve=list(worst_case))
    e = at[0]
    robust = worst_case[e] or 0.0
    survived = round(robust * n)
    success = 1.0 - survived / n_correct if n_correct else 1.0
    return _check(name, success < tol.unbounded_success,
                  f"the worst case broke {success:.1%} of {n_correct} correct samples at "
                  f"{eps_key(norm, grid[e])}, a budget that reaches every input "
                  f"(expected at least {tol.unbounded_success:.0%})",
                  curve=list(worst_case), success_rate=round(success, 4))


def _more_steps_check(norm: str, counters: Mapping[str, float], base: int, tol: Tolerances) -> dict[str, Any]:
    name = f"more-steps-and-restarts-{norm}"
    attacked = counters[f"more_steps_attacked@{norm}"]
    broken = counters.get(f"more_steps_broken@{norm}", 0.0)
    ce = counters.get(f"more_steps_broken_ce@{norm}", broken)
    margin = counters.get(f"more_steps_broken_margin@{norm}", 0.0)
    where = eps_key(norm, counters.get(f"more_steps_eps@{norm}", 0.0))
    values = {"broken": int(broken), "broken_ce": int(ce), "broken_margin": int(margin),
              "attacked": int(attacked)}
    if not attacked:
        return _check(name, "n/a", f"no sample survived the suite at {where}: there was nothing left for "
                                   "more steps and restarts to attack", **values)
    steps, restarts = counters.get(f"more_steps_steps@{norm}"), counters.get(f"more_steps_restarts@{norm}")
    budget = ("5x the steps and 3 restarts" if steps is None or restarts is None
              else f"{int(steps)} steps and {int(restarts)} restart(s)")
    return _check(
        name, broken > max(1.0, tol.more_steps * base),
        f"PGD with {budget} at {where} broke {int(ce)} of {int(attacked)} samples that "
        f"survived the suite with the cross-entropy, then {int(margin)} more with the logit margin (a loss "
        f"that a saturated softmax cannot flatten) (tolerance: 1 sample or {tol.more_steps:.0%})", **values)


def worst_case_rows(chunks: Sequence[Chunk], grids: Mapping[str, Sequence[float]],
                    stages: Mapping[str, Sequence[str]]) -> tuple[list[str], list[list[Any]]]:
    """Per-sample worst case: for each norm, the smallest eps broken and by which attack."""
    labels = _cat([c.labels for c in chunks])
    clean_pred = _cat([c.clean_pred for c in chunks])
    header = ["index", "label", "clean_pred"]
    columns: list[list[Any]] = []
    for norm, grid in grids.items():
        if not stages.get(norm):
            continue
        broken_by = _cat([c.broken_by[norm] for c in chunks])  # (eps, n)
        header += [f"{norm}_min_eps", f"{norm}_attack"]
        first = np.where((broken_by >= 0).any(0), (broken_by >= 0).argmax(0), -1)
        columns.append(["" if f < 0 else eps_key(norm, grid[f]).split(":", 1)[1] for f in first])
        columns.append(["" if f < 0 else stages[norm][broken_by[f, i]] for i, f in enumerate(first)])
    rows = []
    for i in range(labels.size):
        rows.append([i, int(labels[i]), int(clean_pred[i]), *[col[i] for col in columns]])
    return header, rows


def nan_to_none(value: Any) -> Any:
    """JSON cannot hold NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(v) for v in value]
    return value
