"""Feature-squeezing detection (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples
in Deep Neural Networks", NDSS 2018).

A sample's score is the largest L1 distance between the model's softmax on the input and on a
squeezed copy of it, over several squeezers (each a ``Preprocess`` pipeline, e.g. 1-bit depth,
then a 2x2 median). Adversarial inputs tend to move more under squeezing than clean ones; a sample
is flagged when its score exceeds a threshold calibrated on clean data to a target false-positive
rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from workers.defenses.preprocess import Bounds, Preprocess


def squeeze_logits_and_scores(
    module: nn.Module,
    x: torch.Tensor,
    squeezers: Sequence[Sequence[Mapping[str, Any]]],
    bounds: Bounds,
    batch_size: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on ``x`` ``(N, K)`` and the feature-squeezing scores ``(N,)``.

    ``module`` maps ``(N, C, H, W)`` inputs in ``bounds`` to logits; ``squeezers`` is a list of
    pipelines, each a list of step dicts (see ``workers.defenses.preprocess.build_step``). Score:
    ``max_s || softmax(module(x)) - softmax(module(s(x))) ||_1``, in [0, 2]. Computed without
    gradients, ``batch_size`` samples at a time, on the device of ``x``.
    """
    if not squeezers:
        raise ValueError("expected at least one squeezer, got none")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    pipelines = [Preprocess(steps, bounds) for steps in squeezers]
    logits_chunks, score_chunks = [], []
    with torch.no_grad():
        for chunk in x.split(batch_size):  # an empty x is one empty chunk
            logits = module(chunk)
            probs = logits.softmax(dim=1)
            distances = [
                (probs - module(pipeline(chunk)).softmax(dim=1)).abs().sum(dim=1) for pipeline in pipelines
            ]
            logits_chunks.append(logits)
            score_chunks.append(torch.stack(distances).amax(dim=0))
    return torch.cat(logits_chunks), torch.cat(score_chunks)


def squeeze_scores(
    module: nn.Module,
    x: torch.Tensor,
    squeezers: Sequence[Sequence[Mapping[str, Any]]],
    bounds: Bounds,
    batch_size: int = 500,
) -> torch.Tensor:
    """Feature-squeezing scores ``(N,)``; see ``squeeze_logits_and_scores``."""
    return squeeze_logits_and_scores(module, x, squeezers, bounds, batch_size)[1]


def calibrate_threshold(clean_scores: torch.Tensor, fpr: float) -> float:
    """The smallest threshold that flags (``score > threshold``) at most ``fpr`` of ``clean_scores``.

    With ``k`` the largest count such that ``k / n <= fpr``, this is the ``k + 1``-th largest score:
    at most ``k`` scores lie strictly above it, and any lower threshold has at least ``k + 1`` above.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"expected fpr in (0, 1), got {fpr}")
    scores = clean_scores.detach().flatten().to(device="cpu", dtype=torch.float64)
    n = scores.numel()
    if n == 0:
        raise ValueError("expected at least one clean score, got none")
    if torch.isnan(scores).any():
        raise ValueError("expected clean scores without NaN, got NaN")
    # floor(fpr * n) can be off by one in floating point (0.29 * 100 < 29): settle k on k / n <= fpr.
    k = math.floor(fpr * n)
    while (k + 1) / n <= fpr:
        k += 1
    while k > 0 and k / n > fpr:
        k -= 1
    return float(scores.sort().values[n - k - 1])


def detection_rate(scores: torch.Tensor, threshold: float) -> float:
    """Fraction of ``scores`` strictly above ``threshold`` (compared in float64); 0 for no scores."""
    if scores.numel() == 0:
        return 0.0
    return float((scores.detach().to(torch.float64) > threshold).double().mean())
