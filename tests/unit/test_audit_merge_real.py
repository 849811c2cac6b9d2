"""Audits end to end without Redis: a request checked by the gateway (``check_audit``), chunk jobs
(``run_battery`` -> ``_save`` -> blob store) and the merge job (``_load`` -> ``merge`` -> gate ->
report), on tiny seeded perceptrons published into a temporary registry. Every result below is
what a client would receive; none is typed by hand."""

from __future__ import annotations

import io
import math
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import workers.jobs
from contracts.gate import eps_key, evaluate_gate, metric_keys, parse_eps_key, parse_gate
from contracts.junit import junit_xml
from models.architectures import build
from models.manifest import DETECTOR_FILE, DetectorCard, Lineage, ModelCard
from models.registry import publish, sha256_hex, weights_bytes
from service.cli import _print_summary
from service.errors import Problem
from service.routes.audits import check_audit
from service.settings import Settings
from workers.attacks.cw import CarliniWagnerL2Spec
from workers.attacks.deepfool import DeepFoolSpec
from workers.audit.report import render_report
from workers.audit_jobs import _audit_chunk, _audit_merge, build_plan
from workers.defenses.squeeze import calibrate_threshold, squeeze_scores
from workers.jobs import Context, make_context
from workers.settings import WorkerSettings
from workers.specs import AuditChunkJob, AuditMergeJob, AuditRequest, AuditSpec, InputRef

SHAPE = (1, 6, 6)
CLASSES = ("a", "b", "c", "d")
TEAM = "t"


def _publish(root: Path, name: str, seed: int = 0, logit_scale: float = 1.0) -> ModelCard:
    """A seeded ``mlp`` on 6x6 inputs; ``logit_scale`` multiplies its logits (1e6: the softmax
    saturates and cross-entropy gradients are exactly zero, as for a distilled network)."""
    torch.manual_seed(seed)
    body = build("mlp", SHAPE, len(CLASSES))
    with torch.no_grad():
        body[-1].weight.mul_(logit_scale)
        body[-1].bias.mul_(logit_scale)
    data = weights_bytes(body)
    card = ModelCard(name=name, version=1, team=TEAM, architecture="mlp", input_shape=SHAPE, mean=(0.0,),
                     std=(1.0,), classes=CLASSES, sha256=sha256_hex(data), batch_size={"cpu": 16},
                     lineage=Lineage(recipe="test", data="-", seed=seed, created="2026-12-04T00:00:00Z"))
    return publish(root, card, data)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    var = tmp_path_factory.mktemp("var")
    settings = WorkerSettings(var_dir=var, device="cpu")
    _publish(settings.models_root, "tiny-net", seed=0)
    _publish(settings.models_root, "tiny-surrogate", seed=0, logit_scale=2.0)  # same boundaries: transfers
    _publish(settings.models_root, "tiny-saturated", seed=0, logit_scale=1e6)
    context = make_context(settings)
    previous, threads = workers.jobs._context, torch.get_num_threads()
    workers.jobs.install_context(context)
    torch.set_num_threads(1)  # 8 x 36 inputs: a second thread only adds contention
    yield context
    workers.jobs._context = previous
    torch.set_num_threads(threads)


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *SHAPE)).astype(np.float32)


def _own_labels(ctx: Context, model: str, x: np.ndarray) -> np.ndarray:
    _, handle = ctx.cache.get(model)
    return handle.logits(torch.from_numpy(x)).argmax(1).numpy()


def _spec(ctx: Context, request: dict[str, Any], n: int, labels: np.ndarray | None) -> AuditSpec:
    inputs: dict[str, Any] = {"array": "checked elsewhere"}
    body = AuditRequest.model_validate({"inputs": inputs, **request})
    card = ctx.cache.resolve(body.model)
    return check_audit(body, card, n, labels, ctx.cache.index, TEAM, Settings())


def run_audit(ctx: Context, request: dict[str, Any], x: np.ndarray, y: np.ndarray | None,
              chunk_size: int = 8) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What ``POST /v1/audits`` queues and the workers run, in process: the merge job's result and
    the chunk jobs' results."""
    n = x.shape[0]
    spec = _spec(ctx, request, n, y)
    card = ctx.cache.resolve(request["model"])
    audit_id = uuid.uuid4().hex
    buffer = io.BytesIO()
    np.savez(buffer, **({"x": x} if y is None else {"x": x, "y": y.astype(np.int64)}))  # type: ignore[arg-type]
    ctx.store.put(f"inputs/{audit_id}.npz", buffer.getvalue())
    ref = InputRef(kind="blob", n=n, key=f"inputs/{audit_id}.npz", has_labels=y is not None)
    bounds = list(range(0, n, chunk_size)) + [n]
    chunk_ids, chunks = [], []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        chunk_ids.append(f"{audit_id}c{i}")
        job = AuditChunkJob(job_id=chunk_ids[-1], audit_id=audit_id, team=TEAM, model=card.ref, inputs=ref,
                            start=start, stop=stop, index=i, seed=0, audit=spec)
        chunks.append(_audit_chunk(job, None))
    merge = AuditMergeJob(job_id=audit_id, audit_id=audit_id, team=TEAM, model=card.ref, chunk_ids=chunk_ids,
                          seed=0, audit=spec)
    return _audit_merge(merge, None), chunks


def _checks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result["masking_checks"]["checks"]}


def _lines(result: dict[str, Any]) -> list[tuple[bool, str]]:
    return [(line["passed"], line["detail"]) for line in result["gate"]["lines"]]


# --- 1. the minimal suite with a Linf grid ------------------------------------------------------------


def test_the_minimal_suite_files_its_linf_deepfool_under_its_own_key(ctx: Context) -> None:
    x = _inputs(4)
    y = _own_labels(ctx, "tiny-net@1", x)
    result, _ = run_audit(ctx, {"model": "tiny-net", "suite": "minimal", "norms": ["l2", "linf"],
                                "eps": {"l2": [0.5, 4.0], "linf": [0.05, 0.5]},
                                "thresholds": ["median_perturbation@linf >= 0", "median_perturbation@l2 >= 0"]},
                          x, y)
    assert set(result["minimal"]) == {"deepfool", "deepfool-linf", "carlini-wagner-l2"}
    assert result["minimal_attacks"] == ["deepfool", "carlini-wagner-l2", "deepfool-linf"]
    assert set(result["curves"]["linf"]["attacks"]) == {"deepfool-linf"}
    assert set(result["curves"]["l2"]["attacks"]) == {"deepfool", "carlini-wagner-l2"}
    linf, l2 = result["minimal"]["deepfool-linf"], result["minimal"]["deepfool"]
    assert linf["success_rate"] == l2["success_rate"] == 1.0
    # Each measured in its own norm: the Linf size of a perturbation is below its L2 size on 36 pixels.
    assert set(linf) == {"success_rate", "median_linf", "mean_linf"}
    assert 0 < linf["median_linf"] < l2["median_l2"]
    assert result["gate"]["verdict"] == "pass"


# --- 2. transfer lines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [[0.01, 0.02], [0.01, 0.3]])  # the transfer eps off and on the grid
def test_a_transfer_line_is_checked_at_the_transfer_eps_and_can_pass_or_fail(ctx: Context, grid: list[float]
                                                                            ) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-net@1", x)
    request = {"model": "tiny-net", "suite": "quick", "steps": 2, "eps": {"linf": grid},
               "surrogates": ["tiny-surrogate"], "transfer_eps": 0.3,
               "thresholds": ["transfer_success_rate@linf:0.3 >= 0", "transfer_success_rate@linf:0.3 > 1"]}
    result, _ = run_audit(ctx, request, x, y)
    assert result["transfer"] == [{"surrogate": "tiny-surrogate@1", "eps_label": "linf:0.3",
                                   "success_rate": result["transfer"][0]["success_rate"]}]
    rate = result["transfer"][0]["success_rate"]
    assert 0 < rate <= 1
    # a proportion of the 8 correctly classified inputs, with its 95% interval
    band = result["intervals"]["transfer_success_rate"]["tiny-surrogate@1"]
    assert band["n"] == 8 and band["k"] == round(rate * 8) and band["lower"] < rate <= band["upper"]
    ci = f"(95% CI {band['lower']:.4f}-{band['upper']:.4f}, n=8)"
    (passed, detail), (failed, why) = _lines(result)
    assert passed and detail == f"measured {rate:.6g} (surrogate tiny-surrogate@1) {ci} >= 0"
    assert not failed and why == f"measured {rate:.6g} (surrogate tiny-surrogate@1) {ci}, expected > 1"


@pytest.mark.parametrize(("line", "extra", "message"), [
    ("transfer_success_rate@linf:0.01 <= 0.5", {}, "expected the transfer eps linf:0.3, got linf:0.01"),
    ("transfer_success_rate@l2:0.3 <= 0.5", {}, "expected linf (the transfer attack is Linf PGD), got l2"),
    ("transfer_success_rate@linf:0.3 <= 0.5", {"surrogates": []}, "expected surrogates for a transfer line"),
    ("robust_accuracy@linf:0.3 >= 0.5", {}, "expected an eps of the linf grid [linf:0.01, linf:0.02], "
                                            "got linf:0.3"),
    ("robust_accuracy@linf:0.3.lower >= 0.5", {}, "expected an eps of the linf grid [linf:0.01, linf:0.02], "
                                                  "got linf:0.3"),
    ("robust_accuracy@linf:0.01.mean >= 0.5", {}, "thresholds[0]: expected .lower or .upper (a bound of the "
                                                  "95% interval) after the metric, got .mean in "
                                                  "'robust_accuracy@linf:0.01.mean >= 0.5'"),
    ("median_perturbation@l2.lower >= 0.5", {}, "median_perturbation has no interval"),
])
def test_the_gateway_checks_transfer_lines_against_the_transfer_eps(ctx: Context, line: str,
                                                                   extra: dict[str, Any], message: str) -> None:
    request = {"model": "tiny-net", "suite": "quick", "eps": {"linf": [0.01, 0.02]},
               "surrogates": ["tiny-surrogate"], "transfer_eps": 0.3, "thresholds": [line], **extra}
    with pytest.raises(Problem) as info:
        _spec(ctx, request, 8, None)
    assert info.value.status == 422 and message in info.value.detail


# --- 3. custom suites keep the caller's DeepFool and C&W -------------------------------------------------


CUSTOM = [{"name": "pgd", "eps": 0.1, "steps": 2},
          {"name": "deepfool", "norm": "linf", "max_iter": 7, "overshoot": 0.05, "candidates": 4},
          {"name": "deepfool", "norm": "l2", "max_iter": 9, "candidates": 4},
          {"name": "carlini-wagner-l2", "binary_search_steps": 2, "max_iter": 5}]


def test_a_custom_suite_runs_the_callers_minimal_attacks_one_key_per_norm(ctx: Context) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-net@1", x)
    request = {"model": "tiny-net", "attacks": CUSTOM, "norms": ["linf", "l2"],
               "eps": {"linf": [0.05, 0.3], "l2": [0.5, 2.0]}}
    spec = _spec(ctx, request, 8, y)
    minimal = {stage.result_key: stage for stage in build_plan(spec, None, (), 8, len(CLASSES)).minimal}
    assert set(minimal) == {"deepfool-linf", "deepfool", "carlini-wagner-l2"}
    assert minimal["deepfool-linf"].norm == "linf" and minimal["deepfool"].norm == "l2"
    assert minimal["deepfool-linf"].spec == DeepFoolSpec(norm="linf", max_iter=7, overshoot=0.05, candidates=4)
    assert minimal["deepfool"].spec == DeepFoolSpec(norm="l2", max_iter=9, candidates=4)
    assert minimal["carlini-wagner-l2"].spec == CarliniWagnerL2Spec(binary_search_steps=2, max_iter=5)

    result, _ = run_audit(ctx, request, x, y)
    assert set(result["minimal"]) == {"deepfool-linf", "deepfool", "carlini-wagner-l2"}
    assert "median_linf" in result["minimal"]["deepfool-linf"] and "median_l2" in result["minimal"]["deepfool"]
    assert set(result["curves"]["linf"]["attacks"]) == {"fgsm", "pgd", "deepfool-linf"}
    assert set(result["curves"]["l2"]["attacks"]) == {"fgsm", "deepfool", "carlini-wagner-l2"}
    # Every gradient spent is accounted for by the caller's budgets (C&W's default 9 x 100 iterations
    # alone would spend 900 per sample).
    assert result["counters"]["gradients"] < 300 * 8


# --- 4. unlabelled inputs ------------------------------------------------------------------------------


def test_unlabelled_inputs_report_no_clean_accuracy_and_their_gate_line_fails(ctx: Context) -> None:
    x = _inputs(8)
    request = {"model": "tiny-net", "suite": "quick", "steps": 2, "eps": {"linf": [0.01, 0.05]},
               "thresholds": ["clean_accuracy >= 0.9", "robust_accuracy@linf:0.01 >= 0"]}
    result, _ = run_audit(ctx, request, x, None)
    (clean_passed, clean_detail), (robust_passed, _) = _lines(result)
    assert not clean_passed and result["gate"]["verdict"] == "fail"
    assert result["clean_accuracy"] is None and result["labels"] == "predicted"
    assert result["per_class"] and all(row["clean_accuracy"] is None for row in result["per_class"])
    assert clean_detail.startswith("not measured: clean_accuracy is null: the inputs came without labels")
    assert robust_passed  # robust accuracy against the model's own predictions is still measured

    labelled, _ = run_audit(ctx, request, x, _own_labels(ctx, "tiny-net@1", x))
    assert labelled["labels"] == "given" and labelled["clean_accuracy"] == 1.0
    assert labelled["gate"]["verdict"] == "pass"


# --- 6. eps labels round-trip ---------------------------------------------------------------------------


def test_long_decimal_and_fraction_eps_labels_match_their_own_measurements(ctx: Context) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-net@1", x)
    grid = [8 / 255, 0.123456789]
    request = {"model": "tiny-net", "suite": "quick", "steps": 2, "eps": {"linf": grid},
               "thresholds": ["robust_accuracy@linf:0.123456789 >= 0", "robust_accuracy@linf:8/255 >= 0",
                              "robust_accuracy@linf:0.123456789 < 0"]}
    result, _ = run_audit(ctx, request, x, y)
    (long_ok, _), (fraction_ok, _), (below, why) = _lines(result)
    assert long_ok and fraction_ok and not below
    assert why.startswith("measured ") and why.endswith("expected < 0")  # measured, then judged
    assert list(result["robust_accuracy"]) == ["linf:8/255", "linf:0.123456789"]
    assert result["curves"]["linf"]["labels"] == ["8/255", "0.123456789"]
    for key, eps in zip(result["robust_accuracy"], grid, strict=True):
        parsed = parse_eps_key(key)
        assert parsed is not None and parsed[1] == eps


@pytest.mark.parametrize("eps", [0.123456789, 8 / 255, 0.1, 0.1 * 3, 1 / 3, 2.5e-7, 12.75, 4.0, 0.05 * 255])
def test_eps_keys_round_trip(eps: float) -> None:
    parsed = parse_eps_key(eps_key("linf", eps))
    assert parsed is not None and math.isclose(parsed[1], eps, rel_tol=1e-9)


# --- 9 and 10. masking checks ------------------------------------------------------------------------------


def test_a_robust_model_on_a_short_grid_is_not_reported_as_masking(ctx: Context) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-net@1", x)
    short, _ = run_audit(ctx, {"model": "tiny-net", "suite": "quick", "steps": 2,
                               "eps": {"linf": [0.001, 0.002]}}, x, y)
    assert short["robust_accuracy"]["linf:0.002"] > 0.5  # genuinely robust at that budget
    check = _checks(short)["success-grows-with-eps-linf"]
    assert check["status"] == "n/a" and "does not reach" in check["evidence"]

    full, _ = run_audit(ctx, {"model": "tiny-net", "suite": "quick", "steps": 2,
                              "eps": {"linf": [0.002, 1.0]}}, x, y)
    assert _checks(full)["success-grows-with-eps-linf"]["status"] == "pass"


def test_a_saturated_model_fails_growth_where_success_must_be_total(ctx: Context) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-saturated@1", x)
    result, _ = run_audit(ctx, {"model": "tiny-saturated", "suite": "quick", "steps": 2,
                                "eps": {"linf": [0.1, 1.0]}}, x, y)
    check = _checks(result)["success-grows-with-eps-linf"]
    assert check["status"] == "warn" and "linf:1" in check["evidence"]


def test_more_steps_uses_a_margin_loss_that_saturation_cannot_flatten(ctx: Context) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-saturated@1", x)
    result, _ = run_audit(ctx, {"model": "tiny-saturated", "suite": "quick", "steps": 2,
                                "eps": {"linf": [0.01, 0.02]}}, x, y)
    check = _checks(result)["more-steps-and-restarts-linf"]
    # The cross-entropy has no gradient to follow: the suite and its rerun with more steps and
    # restarts break nothing (only random starts could), the margin breaks several.
    assert check["values"]["attacked"] >= 4 and _checks(result)["gradients-not-vanishing"]["status"] == "warn"
    assert check["status"] == "warn" and "margin" in check["evidence"]
    assert check["values"]["broken_ce"] == 0 and check["values"]["broken_margin"] >= 2


def test_more_steps_on_no_survivors_is_not_applicable(ctx: Context) -> None:
    x = _inputs(8)
    y = _own_labels(ctx, "tiny-net@1", x)
    result, _ = run_audit(ctx, {"model": "tiny-net", "suite": "quick", "steps": 5,
                                "eps": {"linf": [0.5, 1.0]}}, x, y)
    check = _checks(result)["more-steps-and-restarts-linf"]
    assert check["values"]["attacked"] == 0 and check["status"] == "n/a"


# --- the audit's time -------------------------------------------------------------------------------------


def test_the_audit_reports_its_own_time_and_the_merges(ctx: Context) -> None:
    x = _inputs(16)
    y = _own_labels(ctx, "tiny-net@1", x)
    result, chunks = run_audit(ctx, {"model": "tiny-net", "suite": "quick", "steps": 2,
                                     "eps": {"linf": [0.01, 0.1]}}, x, y)
    assert len(chunks) == 2 and result["seconds"] >= sum(c["seconds"] for c in chunks)
    assert 0 < result["merge_seconds"] <= result["seconds"]



# --- the detector: oblivious and adaptive detect-and-reject ------------------------------------------------


GUARD = (({"name": "bit-depth", "bits": 2},), ({"name": "median", "size": 2},))


@pytest.fixture(scope="module")
def guarded(ctx: Context) -> str:
    """``tiny-guarded``: the tiny net with a feature-squeezing detector, its threshold calibrated on
    64 clean inputs (not the audited ones) for 10% false positives, stored beside its card."""
    card = _publish(ctx.settings.models_root, "tiny-guarded", seed=0)
    _, handle = ctx.cache.get(card.ref)
    clean = torch.from_numpy(_inputs(64, seed=9))
    threshold = calibrate_threshold(squeeze_scores(handle.module, clean, GUARD, handle.bounds), 0.1)
    detector = DetectorCard(model=card.ref, squeezers=GUARD, threshold=threshold, fpr=0.1,
                            lineage=Lineage(base_model=card.ref, recipe="feature-squeezing", data="-", seed=0,
                                            created="2026-12-05T00:00:00Z"))
    detector.write(ctx.settings.models_root / card.name / str(card.version) / DETECTOR_FILE)
    return card.name


def test_detector_figures_under_oblivious_and_adaptive_attacks_and_their_gate_report_and_junit(
        ctx: Context, guarded: str) -> None:
    x = _inputs(16)
    y = _own_labels(ctx, f"{guarded}@1", x)
    request = {"model": guarded, "suite": "quick", "steps": 5, "eps": {"linf": [0.05, 0.1]},
               "adaptive_steps": 10,
               "thresholds": ["detect_reject_accuracy@linf:0.1 >= 0",
                              "adaptive_detect_reject_accuracy@linf:0.1 >= 0",
                              "adaptive_detect_reject_accuracy@linf:0.1 >= 1",
                              "adaptive_detect_reject_accuracy@linf:0.1.upper <= 1"]}
    result, chunks = run_audit(ctx, request, x, y)
    detector = result["detector"]
    assert detector["adaptive"]["attack"] == "squeeze-adaptive" and detector["adaptive"]["steps"] == 10
    assert set(detector["evaluations"]) == {"oblivious", "adaptive"}
    oblivious, adaptive = detector["detect_reject_accuracy"], detector["adaptive_detect_reject_accuracy"]
    assert list(oblivious) == list(adaptive) == ["linf:0.05", "linf:0.1"]
    # The adaptive adversary has the oblivious examples too: never more stopped; here strictly fewer.
    assert all(adaptive[k] <= oblivious[k] for k in oblivious)
    assert adaptive["linf:0.1"] < oblivious["linf:0.1"]
    run = detector["adaptive"]
    assert 0 < run["sample_eps_evaded"] <= run["sample_eps_attacked"] <= 2 * 16
    assert result["counters"]["seconds_adaptive"] > 0
    for key, rate in adaptive.items():  # n and the 95% Wilson interval, like every other accuracy
        band = result["intervals"]["adaptive_detect_reject_accuracy"][key]
        assert band["n"] == 16 and band["k"] == round(rate * 16) and band["lower"] <= rate <= band["upper"]

    lines = result["gate"]["lines"]
    assert [line["passed"] for line in lines] == [True, True, False, True]
    assert lines[2]["detail"].startswith(f"measured {adaptive['linf:0.1']:.6g} (95% CI ")
    assert lines[2]["detail"].endswith("expected >= 1")
    assert {f"adaptive_detect_reject_accuracy@{k}" for k in adaptive} <= set(metric_keys(result))

    page = render_report(result, None, CLASSES)
    section = page[page.index('<section id="detector">'):].split("</section>")[0]
    assert "Oblivious" in section and "Adaptive" in section and "squeeze-adaptive" in section
    assert "detect-and-reject accuracy (adaptive)" in section
    assert f"{100 * adaptive['linf:0.1']:.1f}%" in section and f"{100 * oblivious['linf:0.1']:.1f}%" in section

    properties = {p.get("name"): p.get("value") for p in ET.fromstring(junit_xml(result, "s")).iter("property")}
    assert properties["adaptive_detect_reject_accuracy@linf:0.1"] == str(adaptive["linf:0.1"])
    assert properties["detect_reject_accuracy@linf:0.1"] == str(oblivious["linf:0.1"])
    assert properties["adaptive_detect_reject_accuracy@linf:0.1.interval"].endswith("n=16")

    console = Console(record=True, width=200)
    _print_summary(result, result["gate"], "report", console)
    summary = console.export_text()
    assert "detect/reject accuracy @ linf:0.1 (adaptive attack)" in summary
    assert "detect/reject accuracy @ linf:0.1 (oblivious attack)" in summary


def test_an_audit_without_the_adaptive_figures_fails_its_adaptive_line_and_steps_are_bounded(
        ctx: Context, guarded: str) -> None:
    x = _inputs(8)
    result, _ = run_audit(ctx, {"model": guarded, "suite": "quick", "steps": 2, "eps": {"linf": [0.1]},
                                "adaptive_steps": 2}, x, _own_labels(ctx, f"{guarded}@1", x))
    result["detector"]["adaptive_detect_reject_accuracy"] = {}  # as a chunk stored before they existed
    verdict = evaluate_gate(parse_gate(["adaptive_detect_reject_accuracy@linf:0.1 >= 0"]), result)
    assert verdict["verdict"] == "fail"
    assert "the adaptive attack on the detector did not run" in verdict["lines"][0]["detail"]
    with pytest.raises(Problem) as info:
        _spec(ctx, {"model": guarded, "adaptive_steps": 5000}, 8, None)
    assert info.value.status == 422 and "adaptive_steps" in info.value.detail
    with pytest.raises(Problem) as info:
        _spec(ctx, {"model": guarded, "thresholds": ["adaptive_detect_reject_accuracy@linf:0.5 >= 0.1"]}, 8,
              None)
    assert info.value.status == 422 and "expected an eps of the linf grid" in info.value.detail
