"""Feature squeezing: scores, chunking, threshold calibration at a false-positive rate."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.unit.support import BOUNDS, batch, tiny_model
from workers.defenses.preprocess import Preprocess
from workers.defenses.squeeze import (
    calibrate_threshold,
    detection_rate,
    squeeze_logits_and_scores,
    squeeze_scores,
)

SQUEEZERS = [[{"name": "bit-depth", "bits": 1}], [{"name": "median", "size": 2}]]


class Constant(nn.Module):
    """The same logits for every input: squeezing cannot change its prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype, device=x.device).expand(x.shape[0], 3)


def test_scores_are_zero_when_squeezing_changes_nothing() -> None:
    x, _ = batch(6)
    scores = squeeze_scores(Constant(), x, SQUEEZERS, BOUNDS)
    assert scores.shape == (6,)
    assert torch.equal(scores, torch.zeros(6, dtype=x.dtype))


def test_scores_are_the_largest_l1_distance_and_logits_are_the_models() -> None:
    model = tiny_model().module
    x, _ = batch(10)
    logits, scores = squeeze_logits_and_scores(model, x, SQUEEZERS, BOUNDS, batch_size=4)
    torch.testing.assert_close(logits, model(x))
    probs = model(x).softmax(1)
    distances = torch.stack(
        [(probs - model(Preprocess(steps, BOUNDS)(x)).softmax(1)).abs().sum(1) for steps in SQUEEZERS]
    )
    torch.testing.assert_close(scores, distances.amax(0))
    assert (scores > 0).all() and (scores <= 2).all()
    assert (distances[0] != distances[1]).any()  # both squeezers matter to the maximum


def test_scores_do_not_depend_on_the_chunking() -> None:
    model = tiny_model().module
    x, _ = batch(9)
    whole = squeeze_scores(model, x, SQUEEZERS, BOUNDS)
    torch.testing.assert_close(squeeze_scores(model, x, SQUEEZERS, BOUNDS, batch_size=2), whole)
    torch.testing.assert_close(squeeze_scores(model, x[3:4], SQUEEZERS, BOUNDS), whole[3:4])


def test_an_empty_batch_gives_empty_results() -> None:
    logits, scores = squeeze_logits_and_scores(
        tiny_model().module, torch.zeros(0, 1, 6, 6, dtype=torch.float64), SQUEEZERS, BOUNDS
    )
    assert logits.shape == (0, 4) and scores.shape == (0,)


def test_scores_need_a_squeezer() -> None:
    x, _ = batch(2)
    with pytest.raises(ValueError, match="expected at least one squeezer"):
        squeeze_scores(Constant(), x, [], BOUNDS)
    with pytest.raises(ValueError, match="expected bit-depth bits"):
        squeeze_scores(Constant(), x, [[{"name": "bit-depth", "bits": 0}]], BOUNDS)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.29, 0.5])
@pytest.mark.parametrize("n", [100, 997])
def test_threshold_meets_the_fpr_and_is_tight(fpr: float, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    clean = torch.rand(n, generator=g)
    threshold = calibrate_threshold(clean, fpr)
    assert detection_rate(clean, threshold) <= fpr
    assert detection_rate(clean, math.nextafter(threshold, -math.inf)) > fpr


def test_threshold_with_ties_and_a_single_score() -> None:
    clean = torch.tensor([0.0] * 90 + [0.3] * 10)
    assert calibrate_threshold(clean, 0.05) == pytest.approx(0.3, abs=1e-7)  # flagging any 0.3 would be 10%
    assert calibrate_threshold(clean, 0.1) == 0.0
    assert calibrate_threshold(torch.tensor([0.7]), 0.5) == pytest.approx(0.7)


def test_detection_rate_counts_strictly_above() -> None:
    scores = torch.tensor([0.125, 0.25, 0.25, 0.875])
    assert detection_rate(scores, 0.25) == 0.25
    assert detection_rate(scores, 0.2) == 0.75
    assert detection_rate(scores, 0.0) == 1.0
    assert detection_rate(torch.empty(0), 0.5) == 0.0


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1])
def test_calibration_rejects_bad_arguments(fpr: float) -> None:
    with pytest.raises(ValueError, match="expected fpr in \\(0, 1\\)"):
        calibrate_threshold(torch.rand(10, generator=torch.Generator().manual_seed(0)), fpr)


def test_calibration_rejects_empty_and_nan_scores() -> None:
    with pytest.raises(ValueError, match="expected at least one clean score"):
        calibrate_threshold(torch.empty(0), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold(torch.tensor([0.1, float("nan")]), 0.1)
